"""The classifier's last layer as one type: ``Head``, the currency between client and server.

The bundle's ResNet ends in ``nn.Linear(512, 2)`` (MONAI's ``fc``). Everything that moves or
scores that layer goes through ``Head``: the server's FedAvg record, a site's fine-tuned update,
the weights file of a bundle, and p(neoplastic) in ``ichfed predict``, the reader, the site
pipeline and bootstrap. One scorer (``log_probs``: a linear map and a log-softmax in torch, as the
model's own forward) means a case gives the same number wherever it is scored.

Arrays travel under the message keys of ``shared.federation.protocol`` (``HEAD_WEIGHT`` / ``HEAD_BIAS``),
optionally behind a prefix, so several heads can share one record (``"fold3.weight"``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.federation import protocol as P
from shared.plumbing.errors import IchfedError

if TYPE_CHECKING:  # torch and flwr are heavy; imported where used
    from flwr.app import ArrayRecord
    from torch import nn

STATE_PREFIX = "fc."  # where the head lives in the classifier's state dict (MONAI's ``fc``)
#: the largest |value| a bundle's head weight or bias may hold. Adam moves a weight by about the
#: learning rate per step at most, so no recipe of ichfed's reaches it (docs/security.md, "Models
#: that are not numbers"); a head beyond it is corrupt or hostile and would only give p = 0 or 1.
MAX_HEAD_ABS = 100.0


def _as_numpy(value: Any) -> np.ndarray:
    """A float32 copy of a numpy array, torch tensor or Flower ``Array``."""
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    elif not isinstance(value, np.ndarray) and hasattr(value, "numpy"):  # flwr Array
        value = value.numpy()
    return np.array(value, dtype=np.float32, copy=True)


@dataclasses.dataclass(frozen=True, eq=False)
class Head:
    """Final-layer weights: ``weight`` (2, F) and ``bias`` (2,), float32, F = 512 for the bundle's ResNet.

    Values are not checked for finiteness here (a received update may hold NaN; the server's
    ``check_update`` says why it is refused); shapes are.
    """

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        w, b = _as_numpy(self.weight), _as_numpy(self.bias)
        if w.ndim != 2 or w.shape[0] != P.HEAD_CLASSES:
            raise IchfedError(f"head {P.HEAD_WEIGHT}: expected shape ({P.HEAD_CLASSES}, F), got {w.shape}")
        if b.shape != (P.HEAD_CLASSES,):
            raise IchfedError(f"head {P.HEAD_BIAS}: expected shape ({P.HEAD_CLASSES},), got {b.shape}")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)

    @property
    def n_features(self) -> int:
        """F, the feature length the head reads."""
        return int(self.weight.shape[1])

    def copy(self) -> Head:
        """An independent copy."""
        return Head(self.weight, self.bias)

    # -- torch ------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Head:
        """From an ``nn.Linear(F, 2)`` (copied; later training of ``layer`` does not change it)."""
        return cls(weight=layer.weight, bias=layer.bias)

    def to_linear(self, device: Any = "cpu") -> nn.Linear:
        """A new ``nn.Linear(F, 2)`` holding these weights, on ``device`` (trainable)."""
        import torch

        layer = torch.nn.Linear(self.n_features, P.HEAD_CLASSES)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.weight))
            layer.bias.copy_(torch.from_numpy(self.bias))
        return layer.to(device)

    # -- state dicts and bundles -------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], prefix: str = STATE_PREFIX) -> Head:
        """From a classifier state dict (tensors or arrays) holding ``<prefix>weight`` / ``<prefix>bias``."""
        try:
            return cls(weight=state[f"{prefix}weight"], bias=state[f"{prefix}bias"])
        except KeyError as e:
            raise IchfedError(f"classifier weights: no {e.args[0]!r}") from None

    def to_state_dict(self, prefix: str = STATE_PREFIX) -> dict[str, np.ndarray]:
        """``{"<prefix>weight": ..., "<prefix>bias": ...}`` as float32 numpy arrays (copies)."""
        return {f"{prefix}weight": self.weight.copy(), f"{prefix}bias": self.bias.copy()}

    @classmethod
    def from_bundle(cls, bundle: Any) -> Head:
        """The head of a loaded ``shared.bundle.Bundle`` (weights verified against its manifest now).

        The one way server and sites read a bundle's head (the reference head of a run). Layout v2
        reads only the small head file; v1 reads it out of the whole classifier.
        """
        return cls.from_state_dict(bundle.head_weights())

    # -- messages ----------------------------------------------------------------------------
    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The arrays under their message keys, ``<prefix>weight`` / ``<prefix>bias`` (copies)."""
        return {prefix + P.HEAD_WEIGHT: self.weight.copy(), prefix + P.HEAD_BIAS: self.bias.copy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], prefix: str = "") -> Head:
        """From a mapping of key -> array (numpy or Flower ``Array``); reads exactly
        ``<prefix>weight`` / ``<prefix>bias`` and ignores other keys (other heads' prefixes)."""
        keys = (prefix + P.HEAD_WEIGHT, prefix + P.HEAD_BIAS)
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise IchfedError(f"head arrays: missing {', '.join(map(repr, missing))}")
        return cls(weight=arrays[keys[0]], bias=arrays[keys[1]])

    def to_record(self, prefix: str = "") -> ArrayRecord:
        """A Flower ``ArrayRecord`` of :meth:`to_arrays` (float32, C-contiguous)."""
        from flwr.app import Array, ArrayRecord

        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in self.to_arrays(prefix).items()})

    @classmethod
    def from_record(cls, record: ArrayRecord, prefix: str = "") -> Head:
        """From a Flower ``ArrayRecord`` (see :meth:`from_arrays`)."""
        return cls.from_arrays({k: record[k] for k in record.keys()}, prefix)

    # -- scoring -----------------------------------------------------------------------------
    def log_probs(self, features: Any, device: Any = "cpu") -> np.ndarray:
        """Log-softmax class scores (N, 2), float64, for (N, F) features (numpy or tensor).

        Computed in float32 in torch exactly as the model's ``fc`` + log-softmax, then widened:
        the single implementation of the classifier's score.
        """
        import torch
        import torch.nn.functional as F

        x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features, np.float32))
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise IchfedError(f"features: expected shape (N, {self.n_features}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros((0, P.HEAD_CLASSES), dtype=np.float64)
        with torch.no_grad():
            x = x.to(device, dtype=torch.float32)
            w = torch.from_numpy(self.weight).to(x.device)
            b = torch.from_numpy(self.bias).to(x.device)
            lp = torch.log_softmax(F.linear(x, w, b), dim=1)
        return lp.double().cpu().numpy()

    def p_neoplastic(self, features: Any, device: Any = "cpu") -> np.ndarray:
        """p(neoplastic) (N,) float64: ``exp`` of the class-1 column of :meth:`log_probs`."""
        return np.exp(self.log_probs(features, device)[:, 1])

    # -- geometry ----------------------------------------------------------------------------
    def norm(self) -> float:
        """L2 norm over weight and bias (float64)."""
        return math.sqrt(float(np.sum(self.weight.astype(np.float64) ** 2) + np.sum(self.bias.astype(np.float64) ** 2)))

    def distance(self, other: Head) -> float:
        """L2 norm of ``self - other`` over weight and bias: a site's update norm."""
        if self.weight.shape != other.weight.shape:
            raise IchfedError(f"head: shapes {self.weight.shape} and {other.weight.shape} differ")
        dw = self.weight.astype(np.float64) - other.weight
        db = self.bias.astype(np.float64) - other.bias
        return math.sqrt(float(np.sum(dw**2) + np.sum(db**2)))

    def allclose(self, other: Head, atol: float = 0.0) -> bool:
        """Same shapes and values within ``atol`` (exact by default)."""
        return (self.weight.shape == other.weight.shape and bool(np.allclose(self.weight, other.weight, rtol=0, atol=atol))
                and bool(np.allclose(self.bias, other.bias, rtol=0, atol=atol)))


# -- checks on a head that is to be used (bundle sign, verify, load) ------------------------------
def check_head_values(weight: Any, bias: Any, where: str) -> None:
    """Raise ``IchfedError`` naming ``where`` unless every value is finite and within ``MAX_HEAD_ABS``.

    A received update may hold NaN and is judged elsewhere (the server's ``check_update``); a head
    that is signed, verified or used for a prediction must be numbers of a trained head's size.
    """
    for key, value in ((P.HEAD_WEIGHT, weight), (P.HEAD_BIAS, bias)):
        arr = _as_numpy(value).astype(np.float64)
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise IchfedError(f"{where}: head {key} holds {bad} NaN or infinite value(s)")
        top = float(np.max(np.abs(arr))) if arr.size else 0.0
        if top > MAX_HEAD_ABS:
            raise IchfedError(f"{where}: head {key} holds a value of magnitude {top:.3g}, above the bound of "
                              f"{MAX_HEAD_ABS:g} for a trained head")


def check_head_shapes(weight: Any, bias: Any, where: str, n_features: int = P.HEAD_FEATURES) -> None:
    """Raise ``IchfedError`` naming ``where`` unless the head is ``(2, n_features)`` / ``(2,)``."""
    for key, value, shape in ((P.HEAD_WEIGHT, weight, (P.HEAD_CLASSES, n_features)), (P.HEAD_BIAS, bias, (P.HEAD_CLASSES,))):
        got = tuple(getattr(value, "shape", ()))
        if got != shape:
            raise IchfedError(f"{where}: head {key} has shape {got}, expected {shape}")
