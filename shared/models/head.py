"""The classifier's last layer as one type: ``Head``, the currency between client and server.

The bundle's ResNet ends in ``nn.Linear(512, 2)`` (MONAI's ``fc``). Everything that moves or
scores that layer goes through ``Head``: the server's FedAvg record, a site's fine-tuned update,
the weights file of a bundle, and p(neoplastic) in ``ichfed predict``, the reader, the site
pipeline and bootstrap. One scorer (``log_probs``: a linear map and a log-softmax in torch, as the
model's own forward) means a case gives the same number wherever it is scored.

Arrays travel under the message keys of ``shared.federation.protocol`` (``HEAD_WEIGHT`` / ``HEAD_BIAS``),
optionally behind a prefix, so several heads can share one record (``"fold3.weight"``). ``HeadSet``
is that record: the main head and the cross-fit fold heads, the one form in which heads move
between server and sites, into checkpoints and into a federated bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator, Mapping
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

    Values are not checked for finiteness here (a received update may hold NaN; :meth:`problem`
    says why it cannot be used, and the server refuses it); the (2, F) form is.
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

    def digest(self) -> str:
        """sha256 of the float32 bytes of ``weight`` then ``bias``: the head's identity (bundle names)."""
        return hashlib.sha256(np.ascontiguousarray(self.weight).tobytes()
                              + np.ascontiguousarray(self.bias).tobytes()).hexdigest()

    def problem(self, prefix: str = "", n_features: int = P.HEAD_FEATURES) -> str | None:
        """Why this head cannot be the bundle ResNet-34's last layer, or None.

        The fit check of a head that moves (site replies, the server's admission of updates, a
        derived bundle): the shapes by :func:`check_head_shapes` (the one shape check, also of
        every bundle's head file) and every value finite. ``prefix`` names the head (``"fold2."``);
        ``n_features`` is what the bundle's head reads (512, or 515 for a hybrid head).
        """
        try:
            check_head_shapes(self.weight, self.bias, f"{prefix.rstrip('.')} head" if prefix else "main head",
                              n_features)
        except IchfedError as e:
            return str(e)
        for key, arr in ((P.HEAD_WEIGHT, self.weight), (P.HEAD_BIAS, self.bias)):
            if not np.all(np.isfinite(arr)):
                return f"'{prefix}{key}' holds NaN or Inf"
        return None

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


@dataclasses.dataclass(frozen=True, eq=False)
class HeadSet:
    """The main head and the cross-fit fold heads of one HEAD record (``folds`` empty: no cross-fit).

    The one head record end to end: the server's initial and aggregated heads, a site's trained
    update, a checkpoint's weights and the record a message carries (``protocol.head_keys(K)``:
    ``weight`` / ``bias`` and ``fold<k>.weight`` / ``fold<k>.bias``).
    """

    main: Head
    folds: tuple[Head, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "folds", tuple(self.folds))
        if len(self.folds) > P.MAX_CROSS_FIT_FOLDS:
            raise IchfedError(f"head record: {len(self.folds)} fold heads, at most {P.MAX_CROSS_FIT_FOLDS}")

    @property
    def n_folds(self) -> int:
        """K, the number of cross-fit fold heads."""
        return len(self.folds)

    @classmethod
    def replicate(cls, head: Head, n_folds: int) -> HeadSet:
        """``head`` as the main head and as each of ``n_folds`` fold heads (a run's first record)."""
        return cls(main=head.copy(), folds=tuple(head.copy() for _ in range(n_folds)))

    def items(self) -> Iterator[tuple[str, Head]]:
        """``(prefix, head)`` pairs: ``("", main)`` then ``("fold<k>.", fold k)``."""
        yield "", self.main
        for k, fold in enumerate(self.folds):
            yield P.fold_prefix(k), fold

    # -- records -----------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every head under its record key (``protocol.head_keys(K)``, main head first); copies."""
        out: dict[str, np.ndarray] = {}
        for prefix, head in self.items():
            out.update(head.to_arrays(prefix))
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> HeadSet:
        """From a mapping holding exactly ``protocol.head_keys(K)`` for some K (numpy, torch or Flower
        arrays); any other set of keys, or a head not of the form (2, F) / (2,), is an ``IchfedError``."""
        keys = list(arrays.keys())
        k = P.cross_fit_folds(keys)
        if k is None:
            raise IchfedError(f"head record: keys {sorted(keys)} are not a main head plus 0..{P.MAX_CROSS_FIT_FOLDS} "
                              "fold heads")
        return cls(main=Head.from_arrays(arrays),
                   folds=tuple(Head.from_arrays(arrays, P.fold_prefix(i)) for i in range(k)))

    def to_record(self) -> ArrayRecord:
        """A Flower ``ArrayRecord`` of :meth:`to_arrays` (float32, C-contiguous)."""
        from flwr.app import Array, ArrayRecord

        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in self.to_arrays().items()})

    @classmethod
    def from_record(cls, record: ArrayRecord) -> HeadSet:
        """From a Flower ``ArrayRecord`` (see :meth:`from_arrays`); an undecodable array is an ``IchfedError``."""
        try:
            arrays = {k: record[k].numpy() for k in record.keys()}
        except Exception as e:  # the bytes came from another process: a decoding failure is its problem
            raise IchfedError(f"head record: arrays unreadable ({type(e).__name__})") from None
        return cls.from_arrays(arrays)

    # -- checks ------------------------------------------------------------------------------
    def problem(self, n_features: int = P.HEAD_FEATURES) -> str | None:
        """Why some head of the set cannot be the ResNet-34's last layer (:meth:`Head.problem`), or None."""
        return next((why for prefix, head in self.items() if (why := head.problem(prefix, n_features))), None)

    def distances(self, other: HeadSet) -> dict[str, float]:
        """``{prefix: L2 distance}`` of each head from the same head of ``other`` (same K)."""
        if other.n_folds != self.n_folds:
            raise IchfedError(f"head record: {self.n_folds} fold heads against {other.n_folds}")
        return {prefix: head.distance(ref) for (prefix, head), (_, ref) in zip(self.items(), other.items())}

    def digest(self) -> str:
        """sha256 over every head in record order: the identity of the whole record (replay checks)."""
        h = hashlib.sha256()
        for _, head in self.items():
            h.update(head.digest().encode("ascii"))
        return h.hexdigest()

    def allclose(self, other: HeadSet, atol: float = 0.0) -> bool:
        """The same K and every head :meth:`Head.allclose`."""
        return self.n_folds == other.n_folds and all(
            a.allclose(b, atol) for (_, a), (_, b) in zip(self.items(), other.items()))
