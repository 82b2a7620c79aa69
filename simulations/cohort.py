"""Write a synthetic site: ``cases.csv``, ``images/<case_id>.nii.gz`` (int16 HU), ``masks/<case_id>.nii.gz``.

Case ``k`` of a cohort depends only on (seed, profile name, k, scale, background): its random
generator is ``numpy.random.SeedSequence([seed, crc32(profile name)], spawn_key=(k,))``, so
asking for more cases appends cases without changing the earlier ones, and two sites given the
same seed still get different patients. Cases are generated and written one at a time, so peak
memory does not grow with the number of cases. Every file is written atomically; NIfTI files
are gzip-compressed by SimpleITK with no timestamp, so a seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import logging
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.plumbing.atomic import write_bytes, write_json, write_text
from shared.plumbing.config import to_dict
from shared.plumbing.errors import IchfedError
from shared.plumbing.progress import bar

from .lesions import ICH, PHE, CasePlan, insert_lesions, sample_plan
from .phantom import make_phantom
from .profiles import Profile, load_profile
from .scanner import Grid, acquire, get_scale, quantise

log = logging.getLogger(__name__)

CSV_COLUMNS = ["case_id", "label", "etiology", "ich_ml", "phe_ml", "ivh_ml", "n_lesions", "ivh", "age", "profile"]
LABEL_NAMES = {1: "neoplastic", 0: "non-neoplastic"}
BACKGROUNDS = ("phantom", "real")


@dataclasses.dataclass(frozen=True)
class CaseRecord:
    """One row of ``cases.csv``: truth measured from the written mask, not from the plan."""

    case_id: str
    label: int  # 1 neoplastic, 0 non-neoplastic
    etiology: str
    ich_ml: float  # label 1 (parenchymal bleeds plus any intraventricular blood)
    phe_ml: float  # label 2
    ivh_ml: float
    n_lesions: int
    ivh: bool
    age: float
    profile: str

    def row(self) -> dict[str, str]:
        """The CSV row with fixed formatting (byte-stable across runs)."""
        return {
            "case_id": self.case_id,
            "label": LABEL_NAMES[self.label],
            "etiology": self.etiology,
            "ich_ml": f"{self.ich_ml:.3f}",
            "phe_ml": f"{self.phe_ml:.3f}",
            "ivh_ml": f"{self.ivh_ml:.3f}",
            "n_lesions": str(self.n_lesions),
            "ivh": "yes" if self.ivh else "no",
            "age": f"{self.age:.0f}",
            "profile": self.profile,
        }


@dataclasses.dataclass
class Case:
    """A generated case in memory."""

    record: CaseRecord
    plan: CasePlan
    grid: Grid
    mask: np.ndarray  # uint8 (z, y, x)
    image: np.ndarray | None  # int16 HU (z, y, x); None when generated mask-only
    # Bleeds painted with each class cue (``Lesions.cues``): {"fluid_level": n, "calcification": n}.
    cues: dict[str, int] = dataclasses.field(default_factory=dict)

    def images(self) -> tuple[sitk.Image | None, sitk.Image]:
        """(image, mask) as SimpleITK images with identical geometry."""
        img = self.grid.to_image(self.image) if self.image is not None else None
        return img, self.grid.to_image(self.mask)


@dataclasses.dataclass(frozen=True)
class CohortSummary:
    """What ``write_cohort`` produced."""

    out: Path
    profile: str
    scale: str
    background: str
    seed: int
    n_cases: int
    n_neoplastic: int
    n_non_neoplastic: int
    median_ich_ml: dict[str, float | None]  # per class name
    median_phe_ml: dict[str, float | None]
    seconds: float

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


def case_id(profile_name: str, index: int) -> str:
    """Stable, site-unique case identifier."""
    return f"{profile_name}-{index:05d}"


STREAMS = ("plan", "anatomy", "lesions", "scanner", "fleet")  # append only: indices key the streams


def case_rng(seed: int, profile_name: str, index: int, stream: str = "plan") -> np.random.Generator:
    """The generator of one part of case ``index``; independent of how many cases are requested.

    Separate streams keep, e.g., the anatomy of a case unchanged when lesion drawing changes.
    """
    ss = np.random.SeedSequence([int(seed), zlib.crc32(profile_name.encode())],
                                spawn_key=(int(index), STREAMS.index(stream)))
    return np.random.default_rng(ss)


def make_case(profile: str | Profile, index: int, seed: int, scale: str = "demo", background: str = "phantom",
              mask_only: bool = False) -> Case:
    """Generate case ``index`` of the cohort (seed, profile, scale, background) in memory.

    ``mask_only`` skips the image (scanner model, HU painting) for fast volume statistics.
    """
    prof = load_profile(profile)
    if background not in BACKGROUNDS:
        raise IchfedError(f"background: must be one of {', '.join(BACKGROUNDS)}, got {background!r}")
    get_scale(scale)
    plan = sample_plan(prof, case_rng(seed, prof.name, index, "plan"))
    scanner = (prof.scanner_fleet.draw(case_rng(seed, prof.name, index, "fleet")) if prof.scanner_fleet is not None
               else prof.scanner)
    grid = Grid.for_profile(scale, scanner)
    anatomy_rng, lesion_rng, scanner_rng = (case_rng(seed, prof.name, index, s) for s in STREAMS[1:4])
    if background == "real":
        from .real_head import make_real_head

        head = make_real_head(grid, anatomy_rng, age=plan.age)
    else:
        head = make_phantom(grid, anatomy_rng, age=plan.age, atrophy_scale=prof.population.atrophy_scale,
                            tilt_deg=scanner.gantry_tilt_deg)
    les = insert_lesions(head, plan, lesion_rng, mask_only=mask_only)
    image = None
    if not mask_only:
        image = quantise(les.hu) if head.kind == "real" else acquire(les.hu, grid, scanner, scanner_rng)
    n_ich = int(np.count_nonzero(les.mask == ICH))
    n_phe = int(np.count_nonzero(les.mask == PHE))
    record = CaseRecord(
        case_id=case_id(prof.name, index),
        label=plan.label,
        etiology=plan.etiology,
        ich_ml=n_ich * grid.voxel_ml,
        phe_ml=n_phe * grid.voxel_ml,
        ivh_ml=les.ivh_voxels * grid.voxel_ml,
        n_lesions=les.n_lesions,
        ivh=les.ivh_voxels > 0,
        age=plan.age,
        profile=prof.name,
    )
    return Case(record=record, plan=plan, grid=grid, mask=les.mask, image=image, cues=les.cues)


def write_nifti(img: sitk.Image, path: Path) -> None:
    """Write a gzip-compressed NIfTI atomically and byte-stably.

    SimpleITK writes the uncompressed NIfTI; we gzip it ourselves at level 1 with a zero
    timestamp and no file name, about four times faster than SimpleITK's own compression
    (which ignores the compression level for NIfTI) and identical bytes on every run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, raw_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.nii", dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(img, raw_name, False)
        raw = Path(raw_name).read_bytes()
    finally:
        Path(raw_name).unlink(missing_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0, filename="") as gz:
        gz.write(raw)
    write_bytes(path, buf.getvalue())


def write_cohort(profile: str | Profile, n_cases: int, seed: int, out: Path, scale: str = "demo",
                 background: str = "phantom") -> CohortSummary:
    """Generate ``n_cases`` cases and write them as a site folder under ``out`` (streamed, atomic)."""
    prof = load_profile(profile)
    if isinstance(n_cases, bool) or not isinstance(n_cases, int) or n_cases < 1:
        raise IchfedError(f"cases: must be a positive integer, got {n_cases!r}")
    if background not in BACKGROUNDS:
        raise IchfedError(f"background: must be one of {', '.join(BACKGROUNDS)}, got {background!r}")
    get_scale(scale)
    out = Path(out)
    _check_out(out)
    t0 = time.perf_counter()
    records: list[CaseRecord] = []
    for k in bar(range(n_cases), desc=f"cohort {prof.name}", unit="case"):
        case = make_case(prof, k, seed, scale=scale, background=background)
        img, msk = case.images()
        write_nifti(img, out / "images" / f"{case.record.case_id}.nii.gz")
        write_nifti(msk, out / "masks" / f"{case.record.case_id}.nii.gz")
        records.append(case.record)
    _remove_stale(out, {r.case_id for r in records})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow(r.row())
    write_text(out / "cases.csv", buf.getvalue())
    summary = _summarise(records, out, prof.name, scale, background, seed, time.perf_counter() - t0)
    write_json(out / "cohort.json", {
        "generator": "ichfed simulations.cohort",
        "profile": to_dict(prof),
        "seed": seed,
        "scale": scale,
        "background": background,
        "n_cases": n_cases,
    })
    log.info("wrote %d cases (%d neoplastic) to %s in %.1f s", n_cases, summary.n_neoplastic, out, summary.seconds)
    return summary


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise IchfedError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "cohort.json").is_file():
        raise IchfedError(f"{out}: folder is not empty and is not a generated cohort; choose an empty folder")


def _remove_stale(out: Path, keep: set[str]) -> None:
    # Only files a previous run of this generator wrote (it left cohort.json) reach here.
    for sub in ("images", "masks"):
        for f in (out / sub).glob("*.nii.gz"):
            if f.name[: -len(".nii.gz")] not in keep:
                f.unlink()


def _summarise(records: list[CaseRecord], out: Path, profile: str, scale: str, background: str, seed: int,
               seconds: float) -> CohortSummary:
    med_ich: dict[str, float | None] = {}
    med_phe: dict[str, float | None] = {}
    for lab, name in LABEL_NAMES.items():
        rs = [r for r in records if r.label == lab]
        med_ich[name] = round(float(np.median([r.ich_ml for r in rs])), 2) if rs else None
        med_phe[name] = round(float(np.median([r.phe_ml for r in rs])), 2) if rs else None
    n_neo = sum(r.label for r in records)
    return CohortSummary(out, profile, scale, background, seed, len(records), n_neo, len(records) - n_neo,
                         med_ich, med_phe, round(seconds, 3))


def volume_ratio_auc(profile: str | Profile, n_cases: int = 4000, seed: int = 0) -> dict:
    """How hard a profile's task is: AUC of logistic regression on the true log(PHE/ICH) volume ratio.

    Volumes come from the case plans (the masks realise them to within a voxel); the model is
    fitted on one half and scored on the other so the number is not an in-sample estimate.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    prof = load_profile(profile)
    plans = [sample_plan(prof, case_rng(seed, prof.name, k)) for k in range(n_cases)]
    y = np.array([p.label for p in plans])
    x = np.log(np.array([sum(p.phe_ml) / sum(p.ich_ml) for p in plans]))[:, None]
    half = n_cases // 2
    model = LogisticRegression().fit(x[:half], y[:half])
    auc = float(roc_auc_score(y[half:], model.predict_proba(x[half:])[:, 1]))
    return {"profile": prof.name, "auc": round(auc, 3), "n_cases": n_cases, "seed": seed,
            "prevalence": round(float(y.mean()), 3)}


def write_healthy_head(path: Path, profile: str | Profile = "charite-like", seed: int = 0, scale: str = "ci") -> Path:
    """Write a simulated head with no lesion (phantom anatomy through the profile's scanner model).

    The negative control of every pipeline: it must come out as ``lesion_found: false``.
    """
    prof = load_profile(profile)
    grid = Grid.for_profile(scale, prof.scanner)
    head = make_phantom(grid, case_rng(seed, prof.name, 0, "anatomy"), age=55.0,
                        atrophy_scale=prof.population.atrophy_scale, tilt_deg=prof.scanner.gantry_tilt_deg)
    hu = quantise(acquire(head.hu, grid, prof.scanner, case_rng(seed, prof.name, 0, "scanner")))
    write_nifti(grid.to_image(hu), Path(path))
    return Path(path)
