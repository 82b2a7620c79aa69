"""nnU-Net raw dataset export: a site-layout cohort becomes ``DatasetXXX_<name>`` for nnU-Net training.

Channel ``CT``, labels background / ICH / PHE, ``.nii.gz``, written with nnU-Net's own
``generate_dataset_json``. Training on it is ``shared.training.segment_train``.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import SimpleITK as sitk

from shared.plumbing.errors import IchfedError
from shared.plumbing.files import staged_dir

log = logging.getLogger(__name__)

LABELS = {"background": 0, "ICH": 1, "PHE": 2}
CHANNELS = {"0": "CT"}
FILE_ENDING = ".nii.gz"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_CASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset, e.g. ``Dataset501_ICH``."""
    return f"Dataset{dataset_id:03d}_{name}"


def export_dataset(site, raw_root: Path, dataset_id: int = 501, name: str = "ICH") -> Path:
    """Write the cases of ``site`` (a ``shared.imaging.sitedata.SiteData``) that have a mask as an nnU-Net raw dataset.

    Images are read with ``shared.imaging.ingest.read_image`` (NIfTI, DICOM folder or zip -> float32 HU) and
    masks with ``shared.imaging.sitedata.read_mask`` (geometry checked against the image). Cases without a
    mask are skipped. The dataset folder is built beside its target and swapped in, so a failed
    export leaves the previous one intact. Returns ``raw_root/DatasetXXX_name``.
    """
    from tqdm import tqdm

    from shared.imaging.ingest import read_image
    from shared.imaging.sitedata import read_mask

    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise IchfedError(f"dataset_id: must be an integer between 1 and 999, got {dataset_id!r}")
    if not _NAME_RE.fullmatch(name):
        raise IchfedError(f"name: must be letters, digits, '-' or '_', got {name!r}")
    raw_root = Path(raw_root)
    folder = raw_root / dataset_folder_name(dataset_id, name)
    if raw_root.is_dir():
        clash = [p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.name != folder.name]
        if clash:
            raise IchfedError(f"{raw_root}: dataset id {dataset_id} is already used by {clash[0]}")
    cases = [c for c in site.cases if c.mask_path is not None]
    skipped = len(site.cases) - len(cases)
    if skipped:
        log.info("%s: %d case(s) without a mask are not used for segmentation training", site.root, skipped)
    if not cases:
        raise IchfedError(f"{site.root}: no case has an ICH/PHE mask; nnU-Net training needs masks")
    for case in cases:
        if not _CASE_RE.fullmatch(str(case.case_id)):
            raise IchfedError(f"{site.root}: case_id {case.case_id!r} cannot be an nnU-Net file name")

    with staged_dir(folder, replace=True, mode=None) as staging:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        for case in tqdm(cases, desc="export nnU-Net dataset", unit="case", disable=None, file=sys.stderr):
            image = read_image(case.image_path).image
            mask = read_mask(case.mask_path, like=image)  # checks geometry and values {0, 1, 2}
            sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(staging / "imagesTr" / f"{case.case_id}_0000{FILE_ENDING}"), True)
            sitk.WriteImage(sitk.Cast(mask, sitk.sitkUInt8), str(staging / "labelsTr" / f"{case.case_id}{FILE_ENDING}"), True)
        from nnunetv2.dataset_conversion.generate_dataset_json import (
            generate_dataset_json,
        )

        generate_dataset_json(str(staging), channel_names=CHANNELS, labels=LABELS,
                              num_training_cases=len(cases), file_ending=FILE_ENDING,
                              dataset_name=folder.name, converted_by="ichfed",
                              description="Non-contrast head CT; labels ICH and perihematomal edema (PHE)",
                              license="site-internal")
    log.info("wrote nnU-Net raw dataset %s (%d cases)", folder, len(cases))
    return folder
