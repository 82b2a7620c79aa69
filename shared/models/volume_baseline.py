"""The simplest model a reviewer would compare the CNN with: a logistic regression on lesion volumes.

The paper's own point is that perihematomal edema (PHE) is larger in neoplastic bleeds while the ICH volume is
similar, so two numbers per case already carry much of the signal. ``VolumeBaseline`` reads ICH ml, PHE ml and
their ratio, on a log scale (volumes are right-skewed over two orders of magnitude), standardised, and fits
scikit-learn's L2-regularised ``LogisticRegression``. Every bootstrap fits it beside the CNN on the same
training cases and reports both on the same test cases (``server/bootstrap_evaluation.py``).

Example
-------
>>> import numpy as np
>>> ich = np.array([5.0, 6.0, 7.0, 5.5, 6.5, 6.0]); phe = np.array([25.0, 30.0, 28.0, 8.0, 9.0, 10.0])
>>> model = VolumeBaseline.fit(ich, phe, np.array([1, 1, 1, 0, 0, 0]))
>>> bool(model.p_neoplastic([6.0], [27.0])[0] > 0.5 > model.p_neoplastic([6.0], [9.0])[0])
True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

FEATURES = ("log_ich_ml", "log_phe_ml", "log_phe_ich_ratio")
# Volumes below this (ml) are treated as this: it keeps the logarithm and the ratio finite for a lesion
# without edema or a case where segmentation found almost nothing.
FLOOR_ML = 0.1


def volume_features(ich_ml: Sequence[float] | np.ndarray, phe_ml: Sequence[float] | np.ndarray) -> np.ndarray:
    """(n, 3) float64: log ICH ml, log PHE ml, log(PHE/ICH), each volume floored at ``FLOOR_ML``."""
    ich = np.maximum(np.asarray(ich_ml, np.float64), FLOOR_ML)
    phe = np.maximum(np.asarray(phe_ml, np.float64), FLOOR_ML)
    if ich.shape != phe.shape or ich.ndim != 1:
        raise ValueError(f"volume_features: ich_ml and phe_ml must be 1-D of one length, got {ich.shape}, {phe.shape}")
    return np.stack([np.log(ich), np.log(phe), np.log(phe / ich)], axis=1)


@dataclasses.dataclass(frozen=True)
class VolumeBaseline:
    """Standardised log-volume features -> logistic regression; plain numbers, so it serialises to JSON."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    C: float

    @classmethod
    def fit(cls, ich_ml: Sequence[float], phe_ml: Sequence[float], y: Sequence[int], C: float = 1.0,
            ) -> "VolumeBaseline":
        """Fit on cases' volumes and labels (1 neoplastic); ``C`` is scikit-learn's inverse L2 strength."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        x, y = volume_features(ich_ml, phe_ml), np.asarray(y, int)
        if len(set(y.tolist())) < 2:
            raise ValueError("VolumeBaseline.fit: needs cases of both classes")
        scaler = StandardScaler().fit(x)
        lr = LogisticRegression(C=C, max_iter=1000).fit(scaler.transform(x), y)
        return cls(mean=tuple(map(float, scaler.mean_)), scale=tuple(map(float, scaler.scale_)),
                   coef=tuple(map(float, lr.coef_[0])), intercept=float(lr.intercept_[0]), C=float(C))

    def p_neoplastic(self, ich_ml: Sequence[float], phe_ml: Sequence[float]) -> np.ndarray:
        """p(neoplastic) for each case."""
        from scipy.special import expit

        z = (volume_features(ich_ml, phe_ml) - np.asarray(self.mean)) / np.asarray(self.scale)
        return expit(z @ np.asarray(self.coef) + self.intercept)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the report and the bundle manifest."""
        return {"model": "logistic regression on standardised log volumes", "features": list(FEATURES),
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VolumeBaseline":
        """Inverse of ``to_dict``."""
        return cls(mean=tuple(d["mean"]), scale=tuple(d["scale"]), coef=tuple(d["coef"]),
                   intercept=float(d["intercept"]), C=float(d["C"]))
