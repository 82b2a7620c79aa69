"""Every weight a bundle carries is a number: checked at ``bundle sign``, ``bundle verify``, ``bundle
upgrade`` and whenever a bundle's weights are deserialised for use.

A signed bundle whose head held NaN passed ``bundle verify`` and then answered p = NaN,
"non-neoplastic"; a head of 1e30 answered p = 1.0; ``bundle upgrade`` signed a NaN head and a
(5, 512) one, and crashed with a ``KeyError`` traceback on a v1 bundle without a head. Now:

* every floating tensor of the classifier (backbone and head) must be finite;
* the head must be ``fc.weight`` (2, F) and ``fc.bias`` (2,), every value within
  ``shared.models.head.MAX_HEAD_ABS``; F is 512, or 515 for a hybrid head (the manifest's
  ``classifier.head_inputs``, ``shared.models.head_inputs``).

(That the backbone fits the 3D ResNet-34 exactly is checked where it is built, ``Bundle.build_classifier``.)

Each failure is one ``IchfedError`` line naming the file and the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.bundle.manifest import HEAD_KEYS
from shared.models.head import check_head_shapes, check_head_values
from shared.plumbing.errors import BundleVerificationError
from shared.plumbing.verified import read_verified


def check_finite(state: Mapping[str, Any], where: str) -> None:
    """Raise naming ``where`` and the first tensor holding NaN or infinity."""
    import torch

    for name, t in state.items():
        t = torch.as_tensor(t)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise BundleVerificationError(f"{where}: tensor {name!r} holds {bad} NaN or infinite value(s)")


def check_head_state(state: Mapping[str, Any], where: str, n_features: int = 512) -> None:
    """The head in ``state`` (``fc.weight`` / ``fc.bias``): present, (2, n_features) / (2,), finite, bounded."""
    missing = [k for k in HEAD_KEYS if k not in state]
    if missing:
        raise BundleVerificationError(f"{where}: no head ({', '.join(missing)} missing)")
    weight, bias = (state[k] for k in HEAD_KEYS)
    try:
        check_head_shapes(weight, bias, where, n_features)
        check_head_values(weight, bias, where)
    except BundleVerificationError:
        raise
    except Exception as e:  # IchfedError from the head checks: the same line, as a bundle error
        raise BundleVerificationError(str(e)) from None


def check_state(state: Mapping[str, Any], where: str, n_features: int = 512) -> None:
    """What every use of a bundle's classifier checks: the head as ``check_head_state``, then all finite."""
    check_head_state(state, where, n_features)
    check_finite(state, where)


def check_bundle_weights(root: str | Path, files: Mapping[str, str], classifier_file: str,
                         head_file: str | None, n_features: int = 512) -> None:
    """The full weight check of a bundle folder (``bundle sign``, ``bundle verify``, ``bundle upgrade``).

    ``files`` is the manifest's sha256 listing: the weights are read from bytes checked against it.
    """
    from shared.models.classifier import load_weights

    root = Path(root)
    state = dict(load_weights(root / classifier_file, data=read_verified(root, classifier_file, files)))
    where = str(root / classifier_file)
    if head_file is not None:
        clash = sorted(k for k in HEAD_KEYS if k in state)
        if clash:
            raise BundleVerificationError(f"{where}: the backbone file holds head tensors {clash}")
        check_finite(state, where)
        head = load_weights(root / head_file, data=read_verified(root, head_file, files))
        where = str(root / head_file)
        if sorted(head) != sorted(HEAD_KEYS):
            raise BundleVerificationError(f"{where}: holds {sorted(head)}, expected exactly {list(HEAD_KEYS)}")
        check_state(head, where, n_features)
        state.update(head)
    else:
        check_state(state, where, n_features)
