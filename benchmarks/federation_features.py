"""The feature cache of ``bench_federation.py``: every site's cases embedded once, kept on disk.

A site is a profile (``PROFILES``: the five shifted built-in profiles and three with a stronger
scanner shift, ``benchmarks/profiles/strong-*.toml``) and a cohort seed; the real-background
site is the ``--real-profile`` population on the real GE head CT. Cases are generated in memory
(``simulations.cohort.make_case``: case k depends only on seed, profile and k) and cropped from
their true masks (``shared.pipeline.prepare``: no nnU-Net in the loop) or, with ``masks =
"predicted"``, segmented by the bundle's nnU-Net as at a site (``Predictor.preprocess``).

Per site and seed the cache holds (``<work>/features/<key>/<site>-seed<s>.npz``):

- ``labels``, ``lesion`` (a lesion was found), ``ich_ml`` / ``phe_ml`` of the mask used;
- ``feats``: the bundle head's inputs: the backbone's embeddings (the bundle's BatchNorm statistics),
  followed, for a hybrid head, by the standardised log volumes (``shared.models.head_inputs``);
- ``feats_site``: the same cases embedded with the site's own statistics (AdaBN), estimated by
  ``client.adaptation.site_norm_stats`` on ``n_unlabelled`` further scans of the same site whose
  labels are never read (the site's unlabelled cases), the same for every replicate;
- ``twin_feats`` / ``twin_lesion``: the same patients (the same case plans: label, etiology,
  lesion volumes, age) imaged on the development scanner (``charite-like``'s scanner), the
  reference model's no-shift oracle (not for the real-background site).

Crops are not kept: at demo scale they are 3.2 MB each. The key covers the bundle's backbone and
segmenter, the crop spec, the masks, the scale and every design number, so a new reference
classifier or design never reuses stale features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench_federation")

HERE = Path(__file__).resolve().parent
SHIFTED = ("hamburg-like", "community-hospital", "lowdose-mobile", "oncology-referral", "young-neurovascular")
STRONG = tuple(str(HERE / "profiles" / f"{n}.toml") for n in ("strong-sharp-hot", "strong-smooth-cold",
                                                               "strong-thin-sharp"))
PROFILES = SHIFTED + STRONG
DEVELOPMENT = "charite-like"
CACHE_VERSION = 2  # 2: head inputs (hybrid heads read the volumes too), not bare embeddings
BATCH = 8


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """One benchmark site: its name, profile (name or TOML path), background and cohort seed."""

    name: str
    profile: str
    background: str
    seed: int


@dataclasses.dataclass
class SiteData:
    """One site's cached cases (see the module doc); ``norm_stats`` is the site's ``NormStats``."""

    spec: SiteSpec
    labels: np.ndarray
    lesion: np.ndarray
    ich_ml: np.ndarray
    phe_ml: np.ndarray
    feats: np.ndarray
    feats_site: np.ndarray
    twin_feats: np.ndarray | None
    twin_lesion: np.ndarray | None
    norm_stats: Any
    n_stats: int

    @property
    def n(self) -> int:
        return int(len(self.labels))


def site_specs(n_sites: int, seed: int, real_profile: str | None) -> list[SiteSpec]:
    """The simulated sites (first ``n_sites`` of ``PROFILES``) and the real-background one, for cohort ``seed``."""
    from simulations.profiles import load_profile

    specs = []
    for i, profile in enumerate(PROFILES[:n_sites]):
        specs.append(SiteSpec(load_profile(profile).name, profile, "phantom", seed * 7_919 + 1_000 * (i + 1)))
    if real_profile:
        name = load_profile(real_profile).name
        specs.append(SiteSpec(f"{name}-real", real_profile, "real", seed * 7_919 + 999))
    return specs


def cache_key(bundle, masks: str, scale: str, n_cases: int, n_unlabelled: int) -> str:
    """What every cached feature depends on (a new classifier or design never reuses stale ones)."""
    m = bundle.manifest
    blob = {"version": CACHE_VERSION, "backbone": m.files[m.classifier_file], "crop": bundle.crop_spec.key(),
            "masks": masks, "segmenter": bundle.nnunet_file_hashes if masks == "predicted" else None,
            "scale": scale, "n_cases": n_cases, "n_unlabelled": n_unlabelled}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def load_or_build(folder: Path, spec: SiteSpec, bundle, *, n_cases: int, n_unlabelled: int, scale: str, masks: str,
                  device: str, models: "Models") -> SiteData:
    """The site's cached cases, built (and written atomically) when absent."""
    from simulations.profiles import load_profile

    path = folder / f"{spec.name}-seed{spec.seed}.npz"
    profile_blob = json.dumps(dataclasses.asdict(load_profile(spec.profile)), sort_keys=True)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["profile"]) == profile_blob:
                return _from_npz(spec, z, models)
    data = build_site(spec, bundle, n_cases=n_cases, n_unlabelled=n_unlabelled, scale=scale, masks=masks,
                      device=device, models=models)
    from shared.models import batchnorm_stats
    from shared.plumbing.atomic import atomic_path

    arrays = {k: getattr(data, k) for k in ("labels", "lesion", "ich_ml", "phe_ml", "feats", "feats_site",
                                             "twin_feats", "twin_lesion") if getattr(data, k) is not None}
    arrays |= {"profile": np.array(profile_blob), "n_stats": np.array(data.n_stats)}
    if data.norm_stats is not None:
        arrays["norm_stats"] = np.frombuffer(batchnorm_stats.to_bytes(data.norm_stats), np.uint8)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return data


def _from_npz(spec: SiteSpec, z, models: "Models") -> SiteData:
    from shared.models import batchnorm_stats

    stats = batchnorm_stats.from_bytes(z["norm_stats"].tobytes(), "cached norm stats") if "norm_stats" in z else None
    return SiteData(spec=spec, labels=z["labels"], lesion=z["lesion"].astype(bool), ich_ml=z["ich_ml"],
                    phe_ml=z["phe_ml"], feats=z["feats"], feats_site=z["feats_site"],
                    twin_feats=z["twin_feats"] if "twin_feats" in z else None,
                    twin_lesion=z["twin_lesion"].astype(bool) if "twin_lesion" in z else None,
                    norm_stats=stats, n_stats=int(z["n_stats"]))


class Models:
    """The bundle's backbone (built once) and, for predicted masks, its ``Predictor``."""

    def __init__(self, bundle, masks: str, device: str) -> None:
        from shared.models.classifier import backbone_and_head

        self.bundle, self.device = bundle, device
        self.head_inputs = bundle.head_inputs
        self.backbone = backbone_and_head(bundle.build_classifier("cpu").eval())[0]
        self.predictor = None
        if masks == "predicted":
            from shared.pipeline import Predictor

            self.predictor = Predictor(bundle, device=device)

    def prepare(self, profile, k: int, seed: int, scale: str, background: str):
        """(label, Prepared) of case ``k``: cropped from its true mask, or from nnU-Net's."""
        from shared.pipeline import prepare
        from simulations.cohort import make_case

        case = make_case(profile, k, seed, scale=scale, background=background)
        image, mask = case.images()
        if self.predictor is None:
            return case.record.label, prepare(image, self.bundle.crop_spec, mask=mask)
        return case.record.label, self.predictor.preprocess(image)

    def adapted(self, stats):
        """A copy of the backbone with the site's statistics (as ``client.adaptation.embed_with``)."""
        import copy

        from shared.models import batchnorm_stats

        backbone = copy.deepcopy(self.backbone)
        batchnorm_stats.apply(backbone, stats, where="site norm stats")
        return backbone


def build_site(spec: SiteSpec, bundle, *, n_cases: int, n_unlabelled: int, scale: str, masks: str, device: str,
               models: Models) -> SiteData:
    """Generate, crop and embed one site's cases (see the module doc); unlabelled scans come first."""
    from client.adaptation import site_norm_stats
    from simulations.profiles import load_profile

    profile = load_profile(spec.profile)
    unlabelled = [models.prepare(profile, n_cases + k, spec.seed, scale, spec.background)[1]
                  for k in range(n_unlabelled)]
    crops = [p.crop.array for p in unlabelled if p.crop.array is not None]
    stats = site_norm_stats(bundle, crops, device)
    site_backbone = models.adapted(stats) if stats is not None else models.backbone
    del unlabelled, crops
    rows = _embed_cases(models, profile, spec, range(n_cases), scale, [models.backbone, site_backbone])
    twins = None
    if spec.background == "phantom":
        twin_profile = dataclasses.replace(profile, scanner=load_profile(DEVELOPMENT).scanner)
        twins = _embed_cases(models, twin_profile, spec, range(n_cases), scale, [models.backbone])
    log.info("%s seed %d: %d cases (%d without a lesion), statistics from %d unlabelled crops", spec.name, spec.seed,
             n_cases, int((~rows["lesion"]).sum()), 0 if stats is None else stats.n_cases)
    return SiteData(spec=spec, labels=rows["labels"], lesion=rows["lesion"], ich_ml=rows["ich_ml"],
                    phe_ml=rows["phe_ml"], feats=rows["feats"][0], feats_site=rows["feats"][1],
                    twin_feats=None if twins is None else twins["feats"][0],
                    twin_lesion=None if twins is None else twins["lesion"], norm_stats=stats,
                    n_stats=0 if stats is None else int(stats.n_cases))


def _embed_cases(models: Models, profile, spec: SiteSpec, indices, scale: str, backbones: list) -> dict[str, Any]:
    """Labels, lesion flags, volumes and, per backbone, the head's (n, width) inputs (zeros without a lesion)."""
    from shared.models.classifier import embed

    n = len(indices)
    out = {"labels": np.zeros(n, np.int64), "lesion": np.zeros(n, bool), "ich_ml": np.zeros(n),
           "phe_ml": np.zeros(n), "feats": [np.zeros((n, 512), np.float32) for _ in backbones]}
    batch: list[tuple[int, np.ndarray]] = []

    def flush():
        if batch:
            x = np.stack([c for _, c in batch]).astype(np.float32)
            for f, backbone in zip(out["feats"], backbones):
                f[[i for i, _ in batch]] = embed(backbone, x, models.device)
            batch.clear()

    for i, k in enumerate(indices):
        label, prepared = models.prepare(profile, k, spec.seed, scale, spec.background)
        out["labels"][i], out["ich_ml"][i], out["phe_ml"][i] = label, prepared.volumetrics.ich_ml, \
            prepared.volumetrics.phe_ml
        if prepared.crop.array is not None:
            out["lesion"][i] = True
            batch.append((i, prepared.crop.array))
        if len(batch) >= BATCH:
            flush()
    flush()
    les = out["lesion"]
    for f_i, f in enumerate(out["feats"]):
        head = np.zeros((n, models.head_inputs.n_features), np.float32)
        if les.any():
            head[les] = models.head_inputs.features(f[les], out["ich_ml"][les], out["phe_ml"][les])
        out["feats"][f_i] = head
    return out
