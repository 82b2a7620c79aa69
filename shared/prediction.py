"""One prediction as a typed record: what ``shared.pipeline.Predictor`` returns for a case.

``PredictionResult.to_dict()`` is the JSON of ``ichfed predict --json`` and the ``result`` the
reader's page reads (``client/reader/static/reader.js``): its keys, their order and their meaning
are a public contract, so the fields below are declared in that order and ``to_dict`` adds nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Label = Literal["neoplastic", "non-neoplastic"]


@dataclasses.dataclass(frozen=True)
class BundleRef:
    """The bundle a prediction came from (manifest name and version, bundle hash) and the model it carries:
    ``resnet34`` (the paper's head on the embedding) or ``resnet34+volumes`` (a hybrid head that also reads
    the lesion volumes, ``shared.models.head_inputs``)."""

    name: str
    version: str
    hash: str
    model: str = "resnet34"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PredictionResult:
    """One case through ingest, segmentation, crop, embedding, head and calibration.

    Volumes are in ml (3 decimals) and densities in HU (1 decimal); a density is None when its
    region is empty. Without a lesion (``lesion_found`` False) nothing is classified: the
    probabilities and ``label`` are None. ``label`` compares ``p_neoplastic`` (not the calibrated
    ``p_calibrated``) with ``threshold``, on which it was chosen. ``*_source`` say whether the
    threshold, calibration and BatchNorm statistics are the bundle's or the site overlay's.
    ``quality_flags`` name failed plausibility checks (``shared.imaging.quality.FLAGS``): a flagged
    case is shown as "not reliable, review", never with a confident label. ``ingest_notes`` say
    what ingestion accepted or changed (a missing slice it was told to accept, the NIfTI form it was
    told to use, a corrected header). ``timings`` are seconds per stage; ``mask_path`` is set only
    when the label map was saved.
    """

    source: str
    lesion_found: bool
    n_components: int = 0
    ich_ml: float | None = None
    phe_ml: float | None = None
    ich_mean_hu: float | None = None
    phe_mean_hu: float | None = None
    p_neoplastic: float | None = None
    log_p_neoplastic: float | None = None
    threshold: float
    threshold_source: Literal["bundle", "site"] = "bundle"
    p_calibrated: float | None = None
    calibration_source: Literal["bundle", "site"] = "bundle"
    norm_stats_source: Literal["bundle", "site"] = "bundle"
    label: Label | None = None
    quality_flags: tuple[str, ...] = ()
    extracranial_ml_removed: float | None = None
    postprocessing: str = "none"
    ingest_notes: tuple[str, ...] = ()
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    bundle: BundleRef
    mask_path: str | None = None

    @property
    def flagged(self) -> bool:
        """Whether a plausibility check failed (the result then needs review)."""
        return bool(self.quality_flags)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (``ichfed predict --json``, the reader's ``result``), keys in field order."""
        out = dataclasses.asdict(self)
        out["quality_flags"] = list(self.quality_flags)
        out["ingest_notes"] = list(self.ingest_notes)
        if self.mask_path is None:
            del out["mask_path"]  # present only when a mask was written, as before
        return out
