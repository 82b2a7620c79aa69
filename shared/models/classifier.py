"""The 3D ResNet-34 classifier: the model, its backbone/head split, embeddings, weights I/O.

The model is MONAI's ``resnet34(spatial_dims=3, n_input_channels=1, num_classes=2)``. It reads
the lesion-masked crop as a tensor of shape (N, 1, z, y, x) and gives log-softmax scores for
class 0 (non-neoplastic) and class 1 (neoplastic), as in the paper (NLL loss on log-softmax
outputs, threshold on the probability of the positive class).

Federated sites never train the backbone: ``backbone_and_head`` splits the model into the
frozen feature extractor (everything up to the global-pooled 512-d vector; MONAI's own ResNet
with ``feed_forward=False``) and the final ``nn.Linear(512, 2)`` (MONAI's ``fc``). The two share
parameters with the model they came from, so training the head trains the model's ``fc``.
Scoring features with the head is ``shared.models.head.Head``'s job; training the whole model is
``server.training.classifier_training``'s, its augmentation ``server.training.classifier_augment``'s.

Weights are stored only as safetensors (no pickle).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.plumbing.atomic import atomic_path
from shared.plumbing.errors import IchfedError

if TYPE_CHECKING:  # torch is heavy; import it only where it is used
    import torch
    from torch import nn

log = logging.getLogger(__name__)

N_FEATURES = 512
N_CLASSES = 2


# ----------------------------------------------------------------------------- model


def _resnet34(**kwargs):
    from monai.networks.nets import resnet34

    return resnet34(spatial_dims=3, n_input_channels=1, **kwargs)


def build_model(head_features: int = N_FEATURES):
    """A freshly initialised MONAI 3D ResNet-34 with one input channel and two outputs.

    The network ends in adaptive average pooling, so any crop size of at least ~16 voxels
    per axis works; the paper's crop is (z, y, x) = (20, 200, 200). ``head_features`` > 512 gives a
    hybrid bundle's ``fc`` (``shared.models.head_inputs``): it then reads more than the backbone's
    output, so only ``backbone_and_head`` with the head inputs scores it, never ``model(x)``.
    """
    model = _resnet34(num_classes=N_CLASSES)
    if head_features != N_FEATURES:
        from torch import nn

        model.fc = nn.Linear(int(head_features), N_CLASSES)
    return model


def backbone_and_head(model) -> tuple[nn.Module, nn.Linear]:
    """Split ``model`` into (backbone producing (N, 512) features, head = ``model.fc``).

    The backbone is a MONAI ResNet built with ``feed_forward=False`` (its forward stops after
    the global pool) whose submodules *are* the model's: both share parameters with ``model``,
    the state-dict keys stay the model's, and ``head(backbone(x)) == model(x)``.
    """
    import torch
    from torch import nn

    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear) or fc.in_features < N_FEATURES or fc.out_features != N_CLASSES:
        raise IchfedError("classifier: model must be a MONAI ResNet with fc = Linear(512 [+ volumes], 2)")
    # Built on the meta device: no memory, no random draws; every submodule is then replaced.
    with torch.device("meta"):
        backbone = _resnet34(feed_forward=False)
    children = dict(model.named_children())
    for name, _ in list(backbone.named_children()):
        if name not in children:
            raise IchfedError(f"classifier: model has no {name!r}; not a MONAI ResNet")
        setattr(backbone, name, children[name])
    backbone.no_max_pool = model.no_max_pool
    backbone.train(model.training)
    return backbone, fc


def model_log_probs(model, x) -> torch.Tensor:
    """Log-softmax scores (N, 2) of the full model on an (N, 1, z, y, x) tensor (with gradients)."""
    import torch

    return torch.log_softmax(model(x), dim=1)


def as_batch_tensor(crops: np.ndarray, device):
    """Crops (N, z, y, x) as a float32 (N, 1, z, y, x) tensor on ``device``."""
    import torch

    arr = np.asarray(crops, dtype=np.float32)
    if arr.ndim != 4:
        raise IchfedError(f"crops: expected an array of shape (N, z, y, x), got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(1).to(device)


def embed(backbone, crops: np.ndarray, device, batch_size: int = 8) -> np.ndarray:
    """Compute (N, 512) float32 features for crops of shape (N, z, y, x), without gradients.

    The backbone is put in eval mode (BatchNorm uses its running statistics), so a case's
    features do not depend on which other cases share its batch.
    """
    import torch
    from tqdm import tqdm

    arr = np.asarray(crops, dtype=np.float32)
    if arr.ndim != 4:
        raise IchfedError(f"crops: expected an array of shape (N, z, y, x), got shape {arr.shape}")
    if batch_size < 1:
        raise IchfedError(f"batch_size: must be at least 1, got {batch_size}")
    backbone = backbone.to(device).eval()
    out = np.empty((arr.shape[0], N_FEATURES), dtype=np.float32)
    starts = range(0, arr.shape[0], batch_size)
    with torch.no_grad():
        for s in tqdm(starts, desc="embed", unit="batch", disable=None if len(starts) > 1 else True, leave=False):
            x = as_batch_tensor(arr[s : s + batch_size], device)
            out[s : s + x.shape[0]] = backbone(x).float().cpu().numpy()
    return out


def predict_log_probs(model, crops: np.ndarray, device, batch_size: int = 8) -> np.ndarray:
    """Log-softmax scores (N, 2), float64, of the full model on crops (N, z, y, x), in eval mode.

    The backbone's features scored by ``shared.models.head.Head``: the same numbers as a site's.
    ``device`` is a ``torch.device`` or ``"auto"``/``"cpu"``/``"cuda"``.
    """
    from shared.models.head import Head
    from shared.plumbing.device import pick_device

    dev = pick_device(device) if isinstance(device, str) else device
    backbone, fc = backbone_and_head(model)
    return Head.from_linear(fc).log_probs(embed(backbone, crops, dev, batch_size), dev)


# ----------------------------------------------------------------------------- weights I/O


def save_weights(module_or_state_dict, path: str | Path) -> None:
    """Write a module's (or a state dict's) tensors to ``path`` as safetensors, atomically."""
    from safetensors.torch import save_file

    state = module_or_state_dict.state_dict() if hasattr(module_or_state_dict, "state_dict") else module_or_state_dict
    # safetensors refuses shared or non-contiguous storage; BatchNorm buffers are tiny, copies are cheap.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        # One metadata key only: safetensors writes several in random order, and a site must be
        # able to rebuild a derived bundle's weights byte for byte (shared.bundle.transport).
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_weights(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """Read a safetensors file into a CPU state dict; a missing or corrupt file is an IchfedError.

    ``data``: the file's bytes, already read and hash-checked (``path`` then only names it in errors).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    p = Path(path)
    if data is None and not p.is_file():
        raise IchfedError(f"{p}: weights file not found")
    try:
        return load_file(str(p), device="cpu") if data is None else load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise IchfedError(f"{p}: not a valid safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def load_classifier(path: str | Path, device="cpu", data: bytes | None = None):
    """Build the ResNet-34 and load weights from a safetensors file (strict), in eval mode.

    ``data``: the file's verified bytes (see ``load_weights``).
    """
    state = load_weights(path, data)
    model = build_model()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise IchfedError(f"{path}: weights do not fit the 3D ResNet-34 classifier ({first} {detail})".strip()) from None
    return model.to(device).eval()

