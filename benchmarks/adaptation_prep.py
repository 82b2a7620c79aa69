"""Preparation for ``bench_adaptation.py``: cohorts, then every case segmented and cropped once.

Each site's cohort has ``cases_per_site`` labelled cases followed by ``unlabelled`` more whose
label the benchmark never reads (a hospital's scans without a confirmed diagnosis). Every case
goes through the shared pipeline (``shared.pipeline.Predictor.preprocess``) once, with the
bundle's nnU-Net (``segmentation="nnunet"``, as at a site) or with the cohort's reference masks
(``"truth"``: about 20x cheaper on CPU, and it keeps segmentation errors out of a comparison of
classifier adaptations); the crops are kept per site in ``<work>/crops/<site>.npz`` with the case IDs,
labels (-1 for the unlabelled) and whether a lesion was found. Everything after this (local
normalisation statistics, embeddings, heads, thresholds, metrics) is cheap and runs per arm and
split seed in ``bench_adaptation.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_adaptation")

UNLABELLED = -1


@dataclasses.dataclass
class SiteCrops:
    """One simulated site: case IDs, labels (-1 unlabelled), lesion flags and crops (zeros without lesion)."""

    name: str
    case_ids: list[str]
    labels: np.ndarray
    lesion_found: np.ndarray
    crops: np.ndarray

    def save(self, path: Path) -> None:
        from shared.plumbing.atomic import atomic_path

        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, case_ids=np.array(self.case_ids), labels=self.labels,
                         lesion_found=self.lesion_found, crops=self.crops)

    @classmethod
    def load(cls, name: str, path: Path) -> "SiteCrops":
        with np.load(path, allow_pickle=False) as z:
            return cls(name=name, case_ids=[str(c) for c in z["case_ids"]], labels=z["labels"].astype(np.int64),
                       lesion_found=z["lesion_found"].astype(bool), crops=z["crops"].astype(np.float32))


def prepare_site(site_dir: Path, n_labelled: int, predictor, out: Path, segmentation: str = "nnunet") -> SiteCrops:
    """Segment and crop every case of ``site_dir`` (cached in ``out``); the first ``n_labelled`` keep labels."""
    from tqdm import tqdm

    from shared.imaging.ingest import read_image
    from shared.imaging.sitedata import read_mask

    name = site_dir.name
    if out.is_file():
        return SiteCrops.load(name, out)
    with open(site_dir / "cases.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    spec = predictor.crop_spec
    shape = (spec.size_xyz[2], spec.size_xyz[1], spec.size_xyz[0])
    ids, labels, found, crops = [], [], [], []
    for k, row in enumerate(tqdm(rows, desc=f"prepare {name}", unit="case", disable=None)):
        image = read_image(site_dir / "images" / f"{row['case_id']}.nii.gz").image
        truth = (read_mask(site_dir / "masks" / f"{row['case_id']}.nii.gz", like=image)
                 if segmentation == "truth" else None)
        prepared = predictor.preprocess(image, mask=truth)
        ok = bool(prepared.crop.lesion_found and prepared.crop.array is not None)
        ids.append(row["case_id"])
        labels.append(int(row["label"] == "neoplastic") if k < n_labelled else UNLABELLED)
        found.append(ok)
        crops.append(prepared.crop.array.astype(np.float32) if ok else np.zeros(shape, np.float32))
    site = SiteCrops(name=name, case_ids=ids, labels=np.array(labels, np.int64), lesion_found=np.array(found),
                     crops=np.stack(crops))
    site.save(out)
    log.info("%s: %d cases prepared, %d without a lesion", name, len(ids), int((~site.lesion_found).sum()))
    return site


def prepare(work: Path, bundle, profiles: list[str], n_labelled: int, n_unlabelled: int, scale: str, seed: int,
            real: str, device: str, segmentation: str = "nnunet") -> list[SiteCrops]:
    """Cohorts (``bench_federated_eval.make_cohorts``, seeded, reused) and their crops, one per profile."""
    from bench_federated_eval import make_cohorts

    site_dirs = make_cohorts(work.parent / "cohorts", profiles, n_labelled + n_unlabelled, scale, seed, real)
    predictor = None
    sites = []
    for d in site_dirs:
        out = work / "crops" / f"{d.name}.npz"
        if predictor is None and not out.is_file():
            from shared.pipeline import Predictor

            predictor = Predictor(bundle, device=device)
        sites.append(prepare_site(d, n_labelled, predictor, out, segmentation))
    return sites
