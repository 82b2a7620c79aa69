"""ICH (label 1) and perihematomal edema (label 2) segmentation of one CT with a trained nnU-Net v2.

``Segmenter``: ``nnUNetPredictor`` initialised by hand. nnU-Net's own loader calls
``torch.load(weights_only=False)``, i.e. full pickle; here checkpoints are read with
``weights_only=True`` (``shared.models.segment_model``) and the network is rebuilt from ``plans.json``.
Prediction runs in the calling process (no worker pools), so it works inside a Flower client and a
web request. ``Segmenter.segment_case`` adds the post-processing (soft-tissue gate, intracranial
mask) and returns a ``Segmentation``.

The other jobs of the segmentation model have their own modules: ``shared.training.segment_dataset``
(raw dataset export), ``shared.training.segment_train`` (nnU-Net training, ``RECIPES``),
``shared.models.segment_model`` (model folders and their checks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from shared.models.model_policy import check_plans
from shared.models.segment_model import (
    CHECKPOINT,
    REORIENT_READERS,
    load_checkpoint,
    network_from_plans,
    validate_model_folder,
    verified_reader,
)
from shared.plumbing.device import pick_device
from shared.plumbing.errors import IchfedError
from shared.plumbing.files import read_json

log = logging.getLogger(__name__)


class Segmenter:
    """ICH/PHE segmentation of one CT at a time with a trained nnU-Net, in the calling process.

    ``device``: ``auto`` | ``cpu`` | ``cuda`` (via ``shared.plumbing.device.pick_device``). ``use_mirroring``:
    nnU-Net's mirroring test-time augmentation; default on for CUDA, off on CPU (8x the work).
    ``folds``: which ``fold_*`` to ensemble; default the numbered folds if any, else ``all``.
    ``num_threads``: torch CPU threads during ``predict`` (restored afterwards); default unchanged.
    ``tile_step_size``: nnU-Net's sliding-window step as a fraction of the patch (its default 0.5;
    larger means fewer, less overlapping patches: faster, slightly less accurate at patch borders).
    ``file_hashes``: sha256 by path relative to ``model_dir`` (a bundle's verified manifest); when
    given, dataset.json, plans.json and the checkpoints are read once into memory, checked against
    it and built from those bytes, so a file swapped after verification is refused, not used.
    Thread-safe: concurrent ``predict`` calls are serialised.
    """

    def __init__(self, model_dir: Path, device: str = "auto", use_mirroring: bool | None = None,
                 folds: Sequence[int | str] | None = None, num_threads: int | None = None,
                 tile_step_size: float = 0.5, file_hashes: dict[str, str] | None = None):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import (
            determine_num_input_channels,
        )
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        if not 0.0 < float(tile_step_size) <= 1.0:
            raise IchfedError(f"tile_step_size: must be in (0, 1], got {tile_step_size}")
        self.model_dir = validate_model_folder(model_dir, check_weights=False)
        self.device = pick_device(device)
        self.use_mirroring = self.device.type == "cuda" if use_mirroring is None else bool(use_mirroring)
        self.num_threads = num_threads
        self.folds = self._pick_folds(folds)
        self._lock = threading.Lock()
        from shared.models.postprocess import FILE_NAME as POSTPROCESSING
        from shared.models.postprocess import read_rule

        read = verified_reader(self.model_dir, file_hashes)
        # The postprocessing rule changes the labels as much as the weights do, so it is verified
        # like them: a rule file not in the verified manifest is refused (read() raises).
        present = (self.model_dir / POSTPROCESSING).exists() or (file_hashes or {}).get(POSTPROCESSING)
        self.postprocessing = read_rule(self.model_dir, read(POSTPROCESSING) if present else None)
        self.harmonisation = _read_harmonisation(self.model_dir, read, file_hashes)
        dataset_json = read_json(self.model_dir / "dataset.json", read("dataset.json"))
        plans = read_json(self.model_dir / "plans.json", read("plans.json"))
        check_plans(plans, self.model_dir / "plans.json")  # the bytes used, not the ones validated above
        metas = [load_checkpoint(self.model_dir / f"fold_{f}" / CHECKPOINT, read(f"fold_{f}/{CHECKPOINT}"))
                 for f in self.folds]
        first = metas[0]
        plans_manager = PlansManager(plans)
        try:
            configuration_manager = plans_manager.get_configuration(first["configuration"])
        except Exception:
            raise IchfedError(f"{self.model_dir / 'plans.json'}: no configuration {first['configuration']!r}") from None
        self.configuration = first["configuration"]
        self.trainer_name = first["trainer_name"]
        self._reader = plans.get("image_reader_writer", "SimpleITKIO")
        n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
        n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        network = network_from_plans(self.trainer_name, plans_manager, configuration_manager, n_in, n_out)
        self._check_weights_fit(network, metas)
        network.to(self.device).eval()

        # nnU-Net prints its set-up remarks; they belong in the debug log, not on stdout
        with contextlib.redirect_stdout(_LogWriter(log)):
            self._predictor = nnUNetPredictor(
                tile_step_size=float(tile_step_size), use_gaussian=True, use_mirroring=self.use_mirroring,
                perform_everything_on_device=self.device.type == "cuda", device=self.device,
                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            self._predictor.manual_initialization(
                network, plans_manager, configuration_manager, [m["network_weights"] for m in metas],
                dataset_json, self.trainer_name, first["inference_allowed_mirroring_axes"])
        log.info("nnU-Net segmenter %s (%s, folds %s) on %s, mirroring %s", self.model_dir, self.configuration,
                 ",".join(self.folds), self.device.type, "on" if self.use_mirroring else "off")

    def _check_weights_fit(self, network, metas: list[dict]) -> None:
        """Every fold's weights load into ``network`` (built from plans.json), or a one-line error."""
        for f, meta in zip(self.folds, metas):
            try:
                network.load_state_dict(meta["network_weights"])
            except RuntimeError as e:
                raise IchfedError(f"{self.model_dir}/fold_{f}/{CHECKPOINT}: weights do not fit the network in plans.json "
                                  f"({str(e).splitlines()[0][:160]})") from None

    def _pick_folds(self, folds: Sequence[int | str] | None) -> tuple[str, ...]:
        available = sorted(p.parent.name[5:] for p in self.model_dir.glob(f"fold_*/{CHECKPOINT}"))
        if folds is None:
            numbered = [f for f in available if f != "all"]
            return tuple(sorted(numbered, key=int)) if numbered else ("all",)
        chosen = tuple(str(f) for f in folds)
        missing = [f for f in chosen if f not in available]
        if not chosen or missing:
            raise IchfedError(f"folds: {', '.join(missing) or 'none given'} not in {self.model_dir} (available: {', '.join(available)})")
        return chosen

    def predict(self, image: sitk.Image) -> sitk.Image:
        """Segment ``image`` (float HU); return uint8 labels 0/1 ICH/2 PHE with the image's exact geometry.

        The labels are gated to soft tissue, kept inside the intracranial space and postprocessed
        with the model folder's rule (``segment_case`` returns what each step removed).
        """
        return self.segment_case(image).labels

    def segment_case(self, image: sitk.Image) -> Segmentation:
        """``predict`` plus the intracranial mask and the volume it removed (``Segmentation``)."""
        from shared.imaging.intracranial import (
            intracranial_mask,
            restrict_labels,
            voxel_ml,
        )
        from shared.models.postprocess import apply_rule

        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise IchfedError(f"image: expected a 3D single-channel CT, got {image.GetDimension()}D with "
                              f"{image.GetNumberOfComponentsPerPixel()} component(s)")
        work = image
        orientation = REORIENT_READERS.get(self._reader)
        if orientation is not None:
            work = sitk.DICOMOrient(image, orientation)
        # A scan far noisier than the development scanner's is smoothed in-plane first (shared.imaging.harmonise);
        # the intracranial mask below reads the original HU.
        harmonised, smoothing_mm = self.harmonisation(work)
        array = sitk.GetArrayFromImage(harmonised).astype(np.float32, copy=False)[None]
        properties = {
            "spacing": [abs(s) for s in work.GetSpacing()[::-1]],
            "sitk_stuff": {"spacing": work.GetSpacing(), "origin": work.GetOrigin(), "direction": work.GetDirection()},
        }
        with self._lock, _torch_threads(self.num_threads):
            seg = self._predictor.predict_single_npy_array(array, properties)
        seg = gate_soft_tissue(np.asarray(seg).astype(np.uint8, copy=False), array[0])
        # Hemorrhage is intracranial: muscle and scalp at blood density are the demo model's
        # commonest error, and a crop centred on them is meaningless.
        inside = intracranial_mask(work)
        # No skull in the image (skull-stripped or cropped input): the mask cannot be trusted, so
        # the labels are kept and the case is flagged (quality "no_intracranial_mask") instead.
        found = inside.volume_ml >= MIN_INTRACRANIAL_ML
        removed = 0
        if found:
            seg, removed = restrict_labels(seg, sitk.GetArrayViewFromImage(inside.mask))
        seg = apply_rule(seg, self.postprocessing, voxel_ml(work))
        labels = _like(seg, work, image, orientation)
        mask = _like(sitk.GetArrayFromImage(inside.mask), work, image, orientation)
        return Segmentation(labels=labels, intracranial=mask, extracranial_ml_removed=removed * voxel_ml(work),
                            postprocessing=self.postprocessing.name, intracranial_found=found,
                            smoothing_mm=smoothing_mm)


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """One case's labels and what was removed on the way (``Segmenter.segment_case``)."""

    labels: sitk.Image
    intracranial: sitk.Image
    extracranial_ml_removed: float
    postprocessing: str
    intracranial_found: bool = True  # False: no skull found, labels not restricted
    smoothing_mm: float = 0.0  # in-plane Gaussian applied before nnU-Net (0: the scan as it came)


# Less intracranial space than this (an adult's is 1200-1700 ml; a scan cut at the vertex or the
# skull base still holds several hundred) means no skull was found.
MIN_INTRACRANIAL_ML = 100.0


def _like(array: np.ndarray, work: sitk.Image, image: sitk.Image, orientation: str | None) -> sitk.Image:
    """A uint8 array on ``work``'s grid back on ``image``'s grid (undoing the reorientation)."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    out.CopyInformation(work)
    if orientation is not None:
        original = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        out = sitk.DICOMOrient(out, original)
    out.CopyInformation(image)
    return out


# Blood and edema are soft tissue. A label on air or bone is always a model error (seen on
# unfamiliar scanners as speckle of "PHE" in the air around the head), so it is removed before
# anything is measured. The window is wide enough for acute clot (up to ~100 HU) plus noise.
SOFT_TISSUE_HU = (-100.0, 200.0)


def gate_soft_tissue(labels: np.ndarray, hu: np.ndarray, window: tuple[float, float] = SOFT_TISSUE_HU) -> np.ndarray:
    """Set labels to background wherever the CT is outside the soft-tissue HU ``window``."""
    outside = (hu < window[0]) | (hu > window[1])
    if outside.any():
        labels = labels.copy()
        labels[outside] = 0
    return labels



def _read_harmonisation(model_dir: Path, read, file_hashes: dict[str, str] | None):
    """The model folder's noise harmonisation, verified like the postprocessing rule (off without the file)."""
    from shared.imaging.harmonise import FILE_NAME, read_harmonisation

    path = model_dir / FILE_NAME
    if file_hashes is not None:
        return read_harmonisation(read(FILE_NAME) if (path.exists() or FILE_NAME in file_hashes) else None)
    return read_harmonisation(path.read_bytes() if path.is_file() else None)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _LogWriter:
    """A file-like sink for nnU-Net's ``print`` output during set-up: lines go to the DEBUG log."""

    def __init__(self, logger: logging.Logger):
        self._logger = logger

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._logger.debug("nnU-Net: %s", line)
        return len(text)

    def flush(self) -> None:
        pass
