"""A site's cases as arrays: preprocessing through the cache into frozen-backbone features,
per split part. Everything here stays at the site (per-case arrays in memory and on disk)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from shared.federation import protocol as P
from shared.imaging.quality import FLAGS as QUALITY_FLAGS
from shared.plumbing.errors import IchfedError

from .adaptation import settings
from .cache import AdaptedCache, CachedCase, CaseCache, cache_key, content_hash
from .seeds import split_seed
from .site_config import SiteConfig
from .split import SiteSplit, stratified_split

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Part:
    """One split part's cases as arrays: features of the cases with a segmented lesion, and counts."""

    features: np.ndarray  # (n, F) float32: what the head reads (512-d embedding [+ 3 volume features, hybrid])
    labels: np.ndarray  # (n,) int64
    n_no_lesion: int
    dice_ich: list[float]
    dice_phe: list[float]
    has_masks: bool
    n_no_lesion_pos: int = 0  # neoplastic cases among n_no_lesion (the intention-to-treat line)
    case_ids: tuple[str, ...] = ()  # of the feature rows, when known (cross-fit folds are drawn on them)
    # Cases of the split (with or without a lesion) per quality flag, and with any flag.
    flag_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    n_flagged: int = 0
    # Every case of the part with a reference mask (lesion found or not): its segmentation scored
    # against the mask (shared.evaluation.segmentation), by case ID; stays at the site.
    seg_scores: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(len(self.labels))


@dataclasses.dataclass
class SiteFeatures:
    """The site's fine-tune and held-out parts for one bundle, and how many cases were unusable."""

    fine_tune: Part
    held_out: Part
    n_unusable: int
    # The site's BatchNorm statistics (shared.models.batchnorm_stats.NormStats) the parts were embedded
    # with, and the same parts under the bundle's own statistics (the reference arms); None when off.
    norm_stats: Any = None
    bundle_stats: tuple[Part, Part] | None = None
    min_cases: int = P.MIN_CASES_FLOOR  # the site's minimum: counts below it do not leave the site

    @property
    def reference_parts(self) -> tuple[Part, Part]:
        """(fine-tune, held-out) embedded as the bundle ships: the reference arms score these."""
        return self.bundle_stats or (self.fine_tune, self.held_out)

    def counts(self, num_examples: int) -> dict[str, int]:
        """The site counts every reply carries, with ``num_examples`` (FedAvg's weight key); a count
        of 1..``min_cases``-1 is left out (``client.privacy.floor_counts``)."""
        from .privacy import floor_counts

        kept: dict[str, int] = {}
        floor_counts({P.NUM_EXAMPLES: int(num_examples), P.N_FINE_TUNE: self.fine_tune.n,
                      P.N_HELD_OUT: self.held_out.n, P.N_UNUSABLE: self.n_unusable}, self.min_cases, kept, {})
        return kept


class FeatureStore:
    """Preprocesses a site's cases once per bundle (through the on-disk cache, memoised per process)."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.cache = CaseCache(Path(config.state_dir) / "cache")
        self.adapted = AdaptedCache(Path(config.state_dir) / "cache" / "adapted")
        self._memo: dict[str, tuple[tuple, SiteFeatures]] = {}

    def read_site(self):
        """The site's cases (``shared.imaging.sitedata.read_site``); problems are logged here, never sent."""
        from shared.imaging.sitedata import read_site

        site = read_site(self.config.data_dir, allow_unlabelled=True)
        for problem in site.problems:
            log.warning("site %s: %s%s", self.config.name, f"{problem.case_id}: " if problem.case_id else "",
                        problem.message)
        return site

    def split(self, site) -> SiteSplit:
        """The seeded stratified split of ``site``'s cases; recorded in the state folder for audit."""
        c = self.config
        split = stratified_split({x.case_id: int(x.label) for x in site.labelled}, c.fine_tune_fraction,
                                 split_seed(c.seed))
        split.write(Path(c.state_dir) / "split.json", seed=c.seed, fraction=c.fine_tune_fraction)
        return split

    def features(self, bundle) -> SiteFeatures:
        """Features for every case (cached on disk by content + bundle + crop spec; memoised per process)."""
        site = self.read_site()
        stamp = tuple(sorted((c.case_id, _stat(c.image_path), _stat(c.mask_path), c.label) for c in site.cases))
        memo = self._memo.get(bundle.hash)
        if memo is not None and memo[0] == stamp:
            return memo[1]
        split = self.split(site)
        by_id = {c.case_id: c for c in site.cases}
        predictor = _LazyPredictor(bundle, self.config.device)
        rows: dict[str, CachedCase] = {}
        unusable = len([p for p in site.problems if p.case_id is not None])
        from shared.plumbing.progress import bar

        adapt = settings(self.config)
        # Unlabelled cases are preprocessed only for the site's BatchNorm statistics.
        cases = site.cases if adapt.local_norm_stats and adapt.unlabelled_for_norm_stats else site.labelled
        keys: dict[str, str] = {}
        for case in bar(cases, desc=f"{self.config.name}: preprocessing", unit="case"):
            try:
                keys[case.case_id], rows[case.case_id] = self._case(case, bundle, predictor,
                                                                    with_crop=adapt.local_norm_stats)
            except IchfedError as e:
                # An unreadable case is counted and logged at the site; the run goes on without it.
                log.warning("site %s: case %s unusable: %s", self.config.name, case.case_id, e)
                unusable += 1
            except Exception:  # one case breaking the pipeline must not cost the site its other cases
                log.exception("site %s: case %s failed in preprocessing", self.config.name, case.case_id)
                unusable += 1
        log.info("site %s: cache %d hits, %d misses", self.config.name, self.cache.hits, self.cache.misses)

        adapted, stats = self._adapt(bundle, rows, keys, split, [c.case_id for c in site.unlabelled], adapt)

        def part(ids: tuple[str, ...], table: dict[str, CachedCase]) -> Part:
            kept = [c for c in ids if c in table]
            return _part([table[c] for c in kept], [by_id[c] for c in kept], bundle.head_inputs)

        feats = SiteFeatures(fine_tune=part(split.fine_tune, adapted), held_out=part(split.held_out, adapted),
                             n_unusable=unusable, norm_stats=stats,
                             bundle_stats=None if stats is None else (part(split.fine_tune, rows),
                                                                      part(split.held_out, rows)),
                             min_cases=self.config.min_cases)
        self._memo = {bundle.hash: (stamp, feats)}  # one bundle at a time: the older one's arrays are dropped
        return feats

    def _adapt(self, bundle, rows: dict[str, CachedCase], keys: dict[str, str], split: SiteSplit,
               unlabelled: list[str], adapt):
        """``rows`` re-embedded with the site's own BatchNorm statistics (``client.adaptation``) and
        those statistics, or ``(rows, None)`` when switched off; crops are dropped afterwards."""
        from shared.plumbing.device import pick_device

        from .adaptation import adapted_features

        crops = {c: r.crop for c, r in rows.items() if r.lesion_found}
        feats, stats = adapted_features(bundle, crops, split.fine_tune, unlabelled, adapt,
                                        str(pick_device(self.config.device)), cache=self.adapted, keys=keys)
        for c, r in rows.items():
            rows[c] = dataclasses.replace(r, crop=None)
        if stats is None:
            return rows, None
        return {c: dataclasses.replace(r, features=feats[c]) if c in feats else r for c, r in rows.items()}, stats

    def _case(self, case, bundle, predictor: "_LazyPredictor", with_crop: bool = False) -> tuple[str, CachedCase]:
        """The case's cache key and entry (computed and stored when absent)."""
        case_hash = content_hash(case.image_path)
        mask_hash = content_hash(case.mask_path) if case.mask_path is not None else None
        key = cache_key(case_hash, bundle.hash, bundle.crop_spec.key(), mask_hash)
        cached = self.cache.get(key, with_crop=with_crop, with_mask=case.mask_path is not None)
        if cached is not None:
            return key, cached
        from shared.imaging.ingest import read_image

        ingested = read_image(case.image_path)
        prepared = predictor.get().preprocess(ingested.image)
        crop = prepared.crop
        features = None
        if crop.lesion_found and crop.array is not None:
            features = predictor.get().embed(crop.array[None])[0].astype(np.float32)
        seg = None
        if case.mask_path is not None:
            import SimpleITK as sitk

            from shared.evaluation.segmentation import score_labels
            from shared.imaging.intracranial import voxel_ml
            from shared.imaging.sitedata import read_mask

            truth = read_mask(case.mask_path, like=ingested.image)
            seg = score_labels(sitk.GetArrayViewFromImage(prepared.mask), sitk.GetArrayViewFromImage(truth),
                               voxel_ml(ingested.image))
        entry = CachedCase(
            lesion_found=features is not None,
            features=features,
            crop=crop.array if features is not None else None,
            dice_ich=seg.ich_dice if seg is not None else None,
            dice_phe=seg.phe_dice if seg is not None else None,
            ich_ml=prepared.volumetrics.ich_ml,
            phe_ml=prepared.volumetrics.phe_ml,
            quality_flags=tuple(prepared.quality_flags),
            seg_score=seg,
        )
        self.cache.put(key, entry)
        return key, entry


def _part(rows: list[CachedCase], cases: list, inputs) -> Part:
    """The cases' head features (``inputs``: the bundle's ``HeadInputs``; the volumes are the cached ones, measured
    on the predicted mask the crop came from) and their counts."""
    with_lesion = [(r, c) for r, c in zip(rows, cases) if r.lesion_found]
    feats = (inputs.features(np.stack([r.features for r, _ in with_lesion]), [r.ich_ml for r, _ in with_lesion],
                             [r.phe_ml for r, _ in with_lesion])
             if with_lesion else np.zeros((0, inputs.n_features), np.float32))
    return Part(
        features=feats,
        labels=np.array([int(c.label) for _, c in with_lesion], dtype=np.int64),
        n_no_lesion=len(rows) - len(with_lesion),
        n_no_lesion_pos=sum(int(c.label) == 1 for r, c in zip(rows, cases) if not r.lesion_found),
        dice_ich=[r.dice_ich for r in rows if r.dice_ich is not None],
        dice_phe=[r.dice_phe for r in rows if r.dice_phe is not None],
        has_masks=any(c.mask_path is not None for c in cases),
        case_ids=tuple(c.case_id for _, c in with_lesion),
        flag_counts={name: sum(name in r.quality_flags for r in rows) for name in QUALITY_FLAGS},
        n_flagged=sum(bool(r.quality_flags) for r in rows),
        seg_scores={c.case_id: r.seg_score for r, c in zip(rows, cases) if r.seg_score is not None},
    )


def _stat(path) -> tuple:
    if path is None:
        return ()
    try:
        st = os.stat(path)
    except OSError:
        return ("missing",)
    return (st.st_size, st.st_mtime_ns)


class _LazyPredictor:
    """Builds the (heavy) ``Predictor`` only when a case is not in the cache."""

    def __init__(self, bundle, device: str) -> None:
        self.bundle = bundle
        self.device = device
        self._p = None

    def get(self):
        if self._p is None:
            from shared.pipeline import Predictor

            self._p = Predictor(self.bundle, device=self.device)
        return self._p
