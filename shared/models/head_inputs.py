"""What a bundle's last layer reads: the backbone's 512-d embedding, and optionally the lesion volumes.

The paper's head is ``Linear(512, 2)`` on the embedding (``kind = "embedding"``). A *hybrid* head
(``kind = "hybrid"``) reads the embedding followed by the three standardised log volumes of the volume
baseline (``shared.models.volume_baseline.volume_features``: log ICH ml, log PHE ml, log PHE/ICH), so the
reference model starts from what two numbers already carry (issue 19) and a site's last-layer fine-tuning can
re-weight image features against volumes (issue 20). The volumes are measured on the same mask the crop is
cut from (``shared.pipeline.prepare``): predicted at inference and at a site, true in bootstrap training.

The standardisation (mean and scale of the training cases' log volumes) is part of the signed manifest
(``classifier.head_inputs``), so every site feeds the head exactly what it was trained on.

Example
-------
>>> import numpy as np
>>> inputs = HeadInputs.fit([5.0, 8.0, 12.0], [10.0, 20.0, 9.0])
>>> (inputs.kind, inputs.n_features)
('hybrid', 515)
>>> inputs.features(np.zeros((2, 512), np.float32), [5.0, 8.0], [10.0, 20.0]).shape
(2, 515)
>>> HeadInputs().n_features
512
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from shared.models.volume_baseline import FEATURES as VOLUME_FEATURES
from shared.models.volume_baseline import volume_features
from shared.plumbing.errors import IchfedError

EMBEDDING = 512  # the MONAI ResNet-34's feature count


@dataclasses.dataclass(frozen=True)
class HeadInputs:
    """The head's input layout; without ``volume_mean``/``volume_scale`` it is the paper's embedding only."""

    volume_mean: tuple[float, ...] | None = None
    volume_scale: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if (self.volume_mean is None) != (self.volume_scale is None):
            raise IchfedError("head_inputs: volume_mean and volume_scale go together")
        if self.volume_mean is not None:
            for name, values in (("volume_mean", self.volume_mean), ("volume_scale", self.volume_scale)):
                if len(values) != len(VOLUME_FEATURES) or not all(math.isfinite(float(v)) for v in values):
                    raise IchfedError(f"head_inputs: {name} must be {len(VOLUME_FEATURES)} finite numbers")
            if not all(float(s) > 0 for s in self.volume_scale):
                raise IchfedError("head_inputs: volume_scale must be positive")

    @property
    def kind(self) -> str:
        """``"embedding"`` (the paper) or ``"hybrid"`` (embedding + volumes)."""
        return "embedding" if self.volume_mean is None else "hybrid"

    @property
    def n_features(self) -> int:
        """Columns of the head's weight."""
        return EMBEDDING + (0 if self.volume_mean is None else len(VOLUME_FEATURES))

    @classmethod
    def fit(cls, ich_ml: Sequence[float], phe_ml: Sequence[float]) -> HeadInputs:
        """A hybrid layout standardised on these (training) cases' volumes."""
        x = volume_features(ich_ml, phe_ml)
        scale = x.std(axis=0)
        return cls(volume_mean=tuple(map(float, x.mean(axis=0))),
                   volume_scale=tuple(float(s) if s > 1e-6 else 1.0 for s in scale))

    def features(self, embedding: np.ndarray, ich_ml: Sequence[float] | None = None,
                 phe_ml: Sequence[float] | None = None) -> np.ndarray:
        """(n, ``n_features``) float32: the embedding, then (hybrid) the standardised log volumes."""
        emb = np.asarray(embedding, np.float32)
        if emb.ndim != 2 or emb.shape[1] != EMBEDDING:
            raise IchfedError(f"features: expected an (N, {EMBEDDING}) embedding, got {emb.shape}")
        if self.volume_mean is None:
            return emb
        if ich_ml is None or phe_ml is None:
            raise IchfedError("features: this bundle's head reads the lesion volumes; none were given")
        vol = (volume_features(ich_ml, phe_ml) - np.asarray(self.volume_mean)) / np.asarray(self.volume_scale)
        if vol.shape[0] != emb.shape[0]:
            raise IchfedError(f"features: {emb.shape[0]} embeddings but {vol.shape[0]} volume rows")
        return np.hstack([emb, vol.astype(np.float32)])

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``classifier.head_inputs`` (empty for the paper's head)."""
        if self.volume_mean is None:
            return {}
        return {"kind": self.kind, "embedding": EMBEDDING, "volumes": list(VOLUME_FEATURES),
                "volume_mean": list(self.volume_mean), "volume_scale": list(self.volume_scale)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "head_inputs") -> HeadInputs:
        """Inverse of ``to_dict``; ``where`` names the manifest in an error."""
        if not d:
            return cls()
        if not isinstance(d, dict) or d.get("kind") != "hybrid" or d.get("embedding") != EMBEDDING \
                or list(d.get("volumes") or []) != list(VOLUME_FEATURES):
            raise IchfedError(f"{where}: head_inputs must describe the hybrid head "
                              f"(embedding {EMBEDDING} + volumes {list(VOLUME_FEATURES)})")
        try:
            return cls(volume_mean=tuple(float(v) for v in d["volume_mean"]),
                       volume_scale=tuple(float(v) for v in d["volume_scale"]))
        except (KeyError, TypeError, ValueError):
            raise IchfedError(f"{where}: head_inputs needs volume_mean and volume_scale lists") from None
