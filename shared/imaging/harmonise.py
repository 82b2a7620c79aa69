"""Noise harmonisation before segmentation: a scan noisier than the development scanner's is smoothed in-plane.

Why (issue 19, measured in docs/segmentation.md "Across scanners"): the demo nnU-Net, trained on the
development scanner (noise ~5 HU by ``noise_hu``), read the ``hamburg-like`` profile (sharp kernel, noise
~10 HU, tilt) at a median ICH Dice of 0.28 with 22 components per case; the same model on the same scans
after an in-plane Gaussian of 2.2 mm scored 0.91 with 1.5 components. Stronger augmentation during training
did not close that gap; smoothing the development scanner's own scans lowers its Dice (0.92 to 0.78 at
2.2 mm), so the step must act only on scans that are clearly noisier than what the model trained on.

The rule (``Harmonisation``): measure the scan's noise; when it exceeds ``trigger`` x the development noise,
smooth with the smallest of ``SIGMAS_MM`` that brings the noise to at most ``reach`` x the development noise.
The development noise is measured by bootstrap on its training scans and stored next to the model
(``harmonisation.json``, verified like the weights); a model folder without that file is used as nnU-Net
gives it (the ``paper`` recipe keeps nnU-Net's defaults).

Example
-------
>>> import numpy as np, SimpleITK as sitk
>>> rng = np.random.default_rng(0)
>>> noisy = sitk.GetImageFromArray((35 + rng.normal(0, 12, (8, 64, 64))).astype(np.float32))
>>> h = Harmonisation(development_noise_hu=4.0)
>>> _, sigma = h(noisy)
>>> sigma > 0
True
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from shared.plumbing.errors import IchfedError

FILE_NAME = "harmonisation.json"
SIGMAS_MM = (0.8, 1.2, 1.6, 2.2, 2.8, 3.4)  # tried in order; in-plane Gaussian sigma, physical mm
SOFT_TISSUE = (0.0, 60.0)  # HU window both pixels of a measured difference lie in (parenchyma, blood)


def noise_hu(array: np.ndarray) -> float:
    """High-frequency noise SD (HU) of a CT volume (z, y, x): from differences of in-plane neighbouring pixels
    that are both soft tissue, sqrt(pi/2) x their mean absolute deviation / sqrt(2) (the SD of one pixel's
    white noise). NaN when the scan holds no soft tissue.

    Neighbour differences see the fine-grained noise of a sharp kernel or a thin, noisy slice, which
    smoothing removes at little cost to a bleed's edge. They barely see a smooth kernel's blobby noise,
    and that is deliberate: smoothing such a scan further erased its lesions (measured with a patch-SD
    estimator that did trigger there: ``community-hospital`` ICH Dice 0.49 -> 0.37, ``lowdose-mobile``
    0.38 -> 0.21, docs/segmentation.md). Mean absolute deviation, not the MAD: CT values are integers,
    and a median of integer differences moves in ~1 HU steps.
    """
    a = np.asarray(array, np.float32)
    left, right = a[..., :-1], a[..., 1:]
    lo, hi = SOFT_TISSUE
    inside = (left > lo) & (left < hi) & (right > lo) & (right < hi)
    d = (right - left)[inside]
    if d.size < 100:
        return float("nan")
    return float(math.sqrt(math.pi / 2.0) * np.mean(np.abs(d - np.median(d))) / math.sqrt(2.0))


def smooth_inplane(image: sitk.Image, sigma_mm: float) -> sitk.Image:
    """``image`` (float32) after a Gaussian of ``sigma_mm`` in x and y only (slices stay independent)."""
    img = sitk.Cast(image, sitk.sitkFloat32)
    if sigma_mm <= 0:
        return img
    f = sitk.SmoothingRecursiveGaussianImageFilter()
    f.SetSigma([float(sigma_mm), float(sigma_mm), 1e-3])  # ~no smoothing across 5 mm slices
    return f.Execute(img)


@dataclasses.dataclass(frozen=True)
class Harmonisation:
    """Smooth a scan noisier than the development scanner's until its noise is near it.

    Parameters
    ----------
    development_noise_hu : ``noise_hu`` of the development scans (their median); None turns the step off.
    trigger : smooth only above ``trigger`` x the development noise (a development scan is left alone).
    reach : smooth until the noise is at most ``reach`` x the development noise (measured: the sharp,
        noisy profiles segment best when smoothed below the development level, correlated residual noise
        being more lesion-like than white noise of the same SD).
    sigmas_mm : the in-plane Gaussian sigmas tried, smallest first.
    """

    development_noise_hu: float | None = None
    trigger: float = 1.5
    reach: float = 0.5
    sigmas_mm: Sequence[float] = SIGMAS_MM

    def __post_init__(self) -> None:
        d = self.development_noise_hu
        if d is not None and not (math.isfinite(float(d)) and float(d) > 0):
            raise IchfedError(f"{FILE_NAME}: development_noise_hu must be a positive number, got {d!r}")
        if not (self.trigger >= 1.0 and 0.0 < self.reach <= self.trigger):
            raise IchfedError(f"{FILE_NAME}: need trigger >= 1 and 0 < reach <= trigger")

    @property
    def active(self) -> bool:
        """Whether the step can change a scan at all."""
        return self.development_noise_hu is not None

    def __call__(self, image: sitk.Image) -> tuple[sitk.Image, float]:
        """(the image to segment, the sigma applied in mm; 0.0 when the scan was left as it is)."""
        if not self.active:
            return image, 0.0
        noise = noise_hu(sitk.GetArrayFromImage(image))
        if not math.isfinite(noise) or noise <= self.trigger * self.development_noise_hu:
            return image, 0.0
        goal = self.reach * self.development_noise_hu
        for sigma in self.sigmas_mm:
            smoothed = smooth_inplane(image, sigma)
            if noise_hu(sitk.GetArrayFromImage(smoothed)) <= goal:
                return smoothed, float(sigma)
        return smoothed, float(self.sigmas_mm[-1])  # as close as the table goes

    @classmethod
    def fit(cls, arrays: Sequence[np.ndarray], **kwargs: Any) -> Harmonisation:
        """The step for a model trained on these (development) scans: their median noise."""
        values = [v for v in (noise_hu(a) for a in arrays) if math.isfinite(v)]
        if not values:
            raise IchfedError("harmonisation: no development scan holds soft tissue to measure noise in")
        return cls(development_noise_hu=float(np.median(values)), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """What ``harmonisation.json`` holds."""
        return {"development_noise_hu": self.development_noise_hu, "trigger": self.trigger, "reach": self.reach,
                "sigmas_mm": list(self.sigmas_mm)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Harmonisation:
        """Inverse of ``to_dict``; a malformed file is an ``IchfedError`` naming it."""
        try:
            return cls(development_noise_hu=float(d["development_noise_hu"]), trigger=float(d["trigger"]),
                       reach=float(d["reach"]), sigmas_mm=tuple(float(s) for s in d["sigmas_mm"]))
        except (KeyError, TypeError, ValueError):
            raise IchfedError(f"{FILE_NAME}: needs development_noise_hu, trigger, reach and sigmas_mm") from None


def write_harmonisation(model_dir: Path, h: Harmonisation) -> Path:
    """Write ``harmonisation.json`` into an nnU-Net model folder (atomically)."""
    from shared.plumbing.atomic import write_json

    path = Path(model_dir) / FILE_NAME
    write_json(path, h.to_dict())
    return path


def read_harmonisation(data: bytes | None) -> Harmonisation:
    """The step stored in a model folder (``data``: the file's verified bytes); off when there is none."""
    if data is None:
        return Harmonisation()
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IchfedError(f"{FILE_NAME}: not valid JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise IchfedError(f"{FILE_NAME}: expected a JSON object")
    return Harmonisation.from_dict(parsed)
