"""The end-to-end case pipeline: ingest -> segment -> crop + volumetrics -> embed -> head.

``ichfed predict``, the reader page and the site runtime all go through ``Predictor`` so that
a case gives the same numbers everywhere. The model is loaded once per ``Predictor``. A case's
result is a ``shared.prediction.PredictionResult``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk

from shared.imaging.crop import Crop, make_crop
from shared.imaging.ingest import Ingested, IngestOptions, read_image
from shared.imaging.quality import quality_flags
from shared.imaging.volumetrics import Volumetrics, measure
from shared.prediction import BundleRef, PredictionResult

if TYPE_CHECKING:  # shared.models.segment imports nnU-Net's stack; loaded when a Predictor is built
    from shared.models.segment import Segmentation
    from shared.plumbing.config import CropSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prepared:
    """What the classifier needs from one case, plus what the reader shows."""

    mask: sitk.Image
    crop: Crop
    volumetrics: Volumetrics
    # Named failed plausibility checks (shared.imaging.quality.FLAGS); [] when plausible.
    quality_flags: list[str] = dataclasses.field(default_factory=list)
    # What the intracranial mask removed from nnU-Net's labels; None for a given mask.
    extracranial_ml_removed: float | None = None
    intracranial: sitk.Image | None = None


def prepare(image: sitk.Image, crop_spec: CropSpec, mask: sitk.Image | None = None,
            segmentation: Segmentation | None = None) -> Prepared:
    """Crop, measure and check one case from a given ``mask`` or a ``segmentation`` (one of them).

    The one segmentation-to-crop step: ``Predictor.preprocess`` and the bootstrap's validation and
    test crops both come from here, so the threshold is chosen on crops made as at inference.
    """
    if mask is None:
        if segmentation is None:
            raise ValueError("prepare: give a mask or a segmentation")
        mask = segmentation.labels
    vol = measure(image, mask)
    removed = segmentation.extracranial_ml_removed if segmentation is not None else None
    return Prepared(mask=mask, crop=make_crop(image, mask, crop_spec), volumetrics=vol,
                    quality_flags=quality_flags(image, mask, vol, removed,
                                                segmentation.intracranial_found if segmentation else True),
                    extracranial_ml_removed=removed,
                    intracranial=segmentation.intracranial if segmentation is not None else None)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 4)


class Predictor:
    """A loaded bundle ready to read cases.

    ``threshold`` overrides the bundle's threshold (a site's locally calibrated one); it is a
    probability of the neoplastic class, and a case is called neoplastic when ``p >= threshold``.
    ``use_mirroring`` and ``tile_step_size`` go to nnU-Net's predictor (``shared.models.segment.Segmenter``).
    A site's overlay (``client.overlay``) adds ``norm_stats`` (``shared.models.batchnorm_stats.NormStats``:
    the site's BatchNorm statistics, applied to the backbone after checking they fit it) and
    ``calibration`` (the site's re-fitted ``Calibration.to_dict()``, else the bundle's), which gives
    ``p_calibrated``; the threshold still applies to ``p_neoplastic``, on which it was chosen.
    """

    def __init__(
        self,
        bundle: Any,
        device: str = "auto",
        threshold: float | None = None,
        use_mirroring: bool | None = None,
        tile_step_size: float = 0.5,
        norm_stats: Any = None,
        calibration: dict[str, Any] | None = None,
    ) -> None:
        from shared.evaluation.calibration import Calibration
        from shared.models.classifier import backbone_and_head
        from shared.models.head import Head
        from shared.models.segment import Segmenter
        from shared.plumbing import rules
        from shared.plumbing.device import pick_device

        self.bundle = bundle
        self.device = pick_device(device)
        self.crop_spec = bundle.crop_spec
        # A given (site) threshold meets the one threshold rule, as the bundle's did when it was read.
        self.threshold = rules.threshold(threshold, "threshold") if threshold is not None else float(bundle.threshold.p)
        self.threshold_source = "site" if threshold is not None else "bundle"
        self.segmenter = Segmenter(bundle.nnunet_dir, device=str(self.device.type), use_mirroring=use_mirroring,
                                   tile_step_size=tile_step_size, file_hashes=bundle.nnunet_file_hashes)
        model = bundle.build_classifier(self.device)
        model.eval()
        self.backbone, fc = backbone_and_head(model)
        self.head = Head.from_linear(fc)
        self.head_inputs = bundle.head_inputs  # the embedding, or the embedding + the lesion volumes (hybrid)
        self.norm_stats_source = "bundle"
        if norm_stats is not None:
            from shared.models.batchnorm_stats import apply

            apply(self.backbone, norm_stats, where="site overlay norm_stats")
            self.norm_stats_source = "site"
        self.calibration_source = "site" if calibration else "bundle"
        self.calibration = Calibration.from_dict(calibration or bundle.manifest.calibration)

    # -- stages ---------------------------------------------------------------------------
    def segment(self, image: sitk.Image) -> sitk.Image:
        """Label map (0 background, 1 ICH, 2 PHE) on the image's own grid."""
        return self.segmenter.predict(image)

    def segment_case(self, image: sitk.Image) -> Segmentation:
        """Labels plus the intracranial mask and the volume it removed (``Segmenter.segment_case``)."""
        return self.segmenter.segment_case(image)

    def preprocess(self, image: sitk.Image, mask: sitk.Image | None = None,
                   segmentation: Segmentation | None = None) -> Prepared:
        """Segment (unless a mask or a segmentation is given), crop, measure and check one case.

        A given ``mask`` (ground truth) is used as is; predicted labels always come from
        ``segment_case``, so they are kept inside the skull wherever this is called from.
        """
        if mask is None:
            segmentation = segmentation or self.segment_case(image)
        return prepare(image, self.crop_spec, mask=mask, segmentation=segmentation)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Frozen-backbone features (N, 512) for crops (N, z, y, x)."""
        from shared.models.classifier import embed

        return embed(self.backbone, crops, self.device)

    def head_features(self, crops: np.ndarray, volumetrics: list[Volumetrics]) -> np.ndarray:
        """What the head reads for crops (N, z, y, x) and their cases' volumes: the embedding, followed by the
        standardised log volumes for a hybrid bundle (``shared.models.head_inputs``)."""
        return self.head_inputs.features(self.embed(crops), [v.ich_ml for v in volumetrics],
                                         [v.phe_ml for v in volumetrics])

    def p_neoplastic(self, features: np.ndarray) -> np.ndarray:
        """Probability of the neoplastic class for each feature row (``Head.p_neoplastic``)."""
        return self.head.p_neoplastic(features, self.device)

    # -- whole cases ----------------------------------------------------------------------
    def predict_image(
        self, ingested: Ingested, progress: Callable[[str], None] | None = None
    ) -> tuple[PredictionResult, sitk.Image, sitk.Image]:
        """Run the pipeline on an ingested image; returns the result, the HU image and the label map.

        ``progress(stage)`` is told when "segmentation" and then "classification" start (the reader page).
        """
        timer = _Timer()
        image = ingested.image
        if progress is not None:
            progress("segmentation")
        with timer.stage("segmentation"):
            segmentation = self.segment_case(image)
        if progress is not None:
            progress("classification")
        with timer.stage("crop"):
            prepared = self.preprocess(image, segmentation=segmentation)
        result = self._result(ingested, prepared, timer)
        return result, image, prepared.mask

    def read_case(
        self, path: str | os.PathLike, progress: Callable[[str], None] | None = None,
        ingest_options: IngestOptions | None = None,
    ) -> tuple[PredictionResult, sitk.Image, sitk.Image]:
        """Read one image (NIfTI, DICOM folder or zip) and run ``predict_image`` on it, ingest timed.

        The one reading path of ``predict`` and the reader page, so both give the same result.
        ``ingest_options`` accepts what ingestion refuses by default (``--allow-missing-slices``,
        ``--nifti-geometry``); the result's ``ingest_notes`` then say so.
        """
        t0 = time.perf_counter()
        ingested = read_image(path, ingest_options)
        ingest_s = time.perf_counter() - t0
        result, image, mask = self.predict_image(ingested, progress=progress)
        timings = {"ingest": round(ingest_s, 4), **result.timings}
        return dataclasses.replace(result, timings=timings), image, mask

    def predict(self, path: str | os.PathLike, save_masks_dir: str | os.PathLike | None = None,
                ingest_options: IngestOptions | None = None) -> PredictionResult:
        """Read, segment and classify one image; ``.to_dict()`` is the JSON of ``ichfed predict``."""
        result, _, mask = self.read_case(path, ingest_options=ingest_options)
        if save_masks_dir is not None:
            from shared.plumbing.atomic import atomic_path

            out = Path(save_masks_dir) / mask_file_name(Path(path))
            with atomic_path(out) as tmp:
                sitk.WriteImage(mask, str(tmp), useCompression=True)
            result = dataclasses.replace(result, mask_path=str(out))
        return result

    def _result(self, ingested: Ingested, prepared: Prepared, timer: _Timer) -> PredictionResult:
        vol = prepared.volumetrics
        crop = prepared.crop
        scores: dict[str, Any] = {}
        if crop.lesion_found:
            with timer.stage("classification"):
                p = float(self.p_neoplastic(self.head_features(crop.array[None], [vol]))[0])
            scores = {
                "p_neoplastic": round(p, 6),
                "log_p_neoplastic": round(math.log(max(p, 1e-300)), 6),
                "p_calibrated": round(float(self.calibration(p)[()]), 6),
                "label": "neoplastic" if p >= self.threshold else "non-neoplastic",
            }
        manifest = self.bundle.manifest
        return PredictionResult(
            source=ingested.source,
            lesion_found=bool(crop.lesion_found),
            n_components=int(crop.n_components),
            ich_ml=_round(vol.ich_ml, 3),
            phe_ml=_round(vol.phe_ml, 3),
            ich_mean_hu=_round(vol.ich_mean_hu, 1),
            phe_mean_hu=_round(vol.phe_mean_hu, 1),
            threshold=round(self.threshold, 6),
            threshold_source=self.threshold_source,
            calibration_source=self.calibration_source,
            norm_stats_source=self.norm_stats_source,
            quality_flags=tuple(prepared.quality_flags),
            extracranial_ml_removed=_round(prepared.extracranial_ml_removed, 3),
            postprocessing=self.segmenter.postprocessing.name,
            ingest_notes=tuple(ingested.notes),  # what ingestion accepted or changed (e.g. a missing slice)
            timings=dict(timer.timings),
            bundle=BundleRef(name=manifest.name, version=manifest.version, hash=self.bundle.hash,
                             model=self.bundle.model_kind),
            **scores,
        )


def _round(v: float | None, nd: int) -> float | None:
    return None if v is None else round(float(v), nd)


def mask_file_name(image_path: Path) -> str:
    """The file name ``predict(save_masks_dir=...)`` gives the label map of ``image_path``."""
    return f"{_stem(Path(image_path))}_mask.nii.gz"


def _stem(p: Path) -> str:
    name = p.name
    for suffix in (".nii.gz", ".nii", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
