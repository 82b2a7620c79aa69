"""A site's runtime: its configuration, its fine-tune / held-out split, preprocessing with the
cache, and evaluation of a head on its own cases.

Everything here stays at the site. What leaves is decided in ``client/privacy.py``; this
module returns per-site aggregates only (and keeps per-case arrays in memory and on disk).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared import protocol as P
from shared.atomic import write_json
from shared.config import from_dict, load_toml
from shared.errors import IchfedError

from .cache import CachedCase, CaseCache, cache_key, content_hash
from .finetune import Head, p_neoplastic

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SiteConfig:
    """``site_configs/<name>.toml``. Relative paths are relative to the TOML file's folder."""

    name: str
    data_dir: Path
    state_dir: Path
    public_key: Path | None = None  # the coordinator's Ed25519 key; without it no bundle is trusted
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fine_tune_fraction: float = dataclasses.field(default=0.2, metadata={"range": (0.01, 0.99)})
    local_epochs: int = dataclasses.field(default=20, metadata={"range": (1, 100_000)})
    learning_rate: float = dataclasses.field(default=1e-3, metadata={"range": (1e-8, 10.0)})
    batch_size: int = dataclasses.field(default=16, metadata={"range": (1, 65_536)})
    # The floor (protocol.MIN_CASES_FLOOR) is part of the privacy boundary: a config cannot lower it.
    min_cases_for_metrics: int = dataclasses.field(default=5, metadata={"range": (P.MIN_CASES_FLOOR, 1_000_000)})
    seed: int = dataclasses.field(default=0, metadata={"range": (0, 2**31 - 1)})
    audit_outgoing: bool = True  # keep a copy of every reply in <state_dir>/outgoing/

    def __post_init__(self) -> None:
        if not P.SITE_NAME_RE.match(self.name):
            raise IchfedError(
                f"site config: 'name' must be 1-64 letters, digits, '.', '_' or '-' (got {self.name!r})"
            )
        if self.min_cases_for_metrics < P.MIN_CASES_FLOOR:  # also when built in code, not only from TOML
            raise IchfedError(f"site config: 'min_cases_for_metrics' cannot be below {P.MIN_CASES_FLOOR} "
                              f"(got {self.min_cases_for_metrics})")


def load_site_config(path: str | os.PathLike) -> SiteConfig:
    """Read and validate a site TOML; resolve its paths against the file's folder."""
    p = Path(path)
    data = load_toml(p)
    cfg = from_dict(SiteConfig, data, source=str(p))
    base = p.resolve().parent

    def resolve(q: Path | None) -> Path | None:
        return None if q is None else (q if q.is_absolute() else (base / q)).resolve()

    return dataclasses.replace(
        cfg, data_dir=resolve(cfg.data_dir), state_dir=resolve(cfg.state_dir), public_key=resolve(cfg.public_key)
    )


def write_site_config(cfg: SiteConfig, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as TOML (absolute paths), atomically."""
    from shared.atomic import write_text

    lines = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, str):
            lines.append(f"{f.name} = {_toml_str(v)}")
        elif isinstance(v, bool):
            lines.append(f"{f.name} = {'true' if v else 'false'}")
        else:
            lines.append(f"{f.name} = {v!r}")
    write_text(path, "\n".join(lines) + "\n")
    return Path(path)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- split ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """Case IDs of the fine-tune and held-out splits. Never leaves the site."""

    fine_tune: tuple[str, ...]
    held_out: tuple[str, ...]


def stratified_split(labels: dict[str, int], fraction: float, seed: int) -> Split:
    """Seeded split with ``fraction`` of each class (rounded, at least one when a class has two or
    more cases, never all of them) in the fine-tune part; the rest is held out.

    Depends only on the case IDs, labels, fraction and seed, so it is stable across rounds,
    restarts and bundle versions.
    """
    rng = np.random.default_rng(seed)
    fine: list[str] = []
    held: list[str] = []
    for label in sorted(set(labels.values())):
        ids = sorted(c for c, y in labels.items() if y == label)
        rng.shuffle(ids)
        k = int(round(fraction * len(ids)))
        if len(ids) >= 2:
            k = min(max(k, 1), len(ids) - 1)
        else:
            k = 0
        fine += ids[:k]
        held += ids[k:]
    return Split(fine_tune=tuple(sorted(fine)), held_out=tuple(sorted(held)))


# -- site features ---------------------------------------------------------------------------


@dataclasses.dataclass
class Part:
    """One split's cases as arrays: features of the cases with a segmented lesion, and counts."""

    features: np.ndarray  # (n, 512) float32
    labels: np.ndarray  # (n,) int64
    n_no_lesion: int
    dice_ich: list[float]
    dice_phe: list[float]
    has_masks: bool
    n_no_lesion_pos: int = 0  # neoplastic cases among n_no_lesion (the intention-to-treat line)

    @property
    def n(self) -> int:
        return int(len(self.labels))


@dataclasses.dataclass
class SiteFeatures:
    fine_tune: Part
    held_out: Part
    n_unusable: int


class SiteRuntime:
    """Preprocesses a site's cases once per bundle (through the cache) and evaluates heads on them."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.cache = CaseCache(Path(config.state_dir) / "cache")
        self._features: dict[str, tuple[tuple, SiteFeatures]] = {}

    # -- data ----------------------------------------------------------------------------
    def read_site(self):
        """The site's cases (``shared.sitedata.read_site``); problems are logged here, never sent."""
        from shared.sitedata import read_site

        site = read_site(self.config.data_dir)
        for problem in site.problems:
            log.warning("site %s: %s%s", self.config.name, f"{problem.case_id}: " if problem.case_id else "", problem.message)
        return site

    def split(self, site) -> Split:
        """The seeded stratified split of ``site``'s cases; recorded in the state folder for audit."""
        split = stratified_split(
            {c.case_id: int(c.label) for c in site.cases}, self.config.fine_tune_fraction, self.config.seed
        )
        write_json(
            Path(self.config.state_dir) / "split.json",
            {"seed": self.config.seed, "fine_tune_fraction": self.config.fine_tune_fraction,
             "fine_tune": list(split.fine_tune), "held_out": list(split.held_out)},
        )
        return split

    def features(self, bundle) -> SiteFeatures:
        """Features for every case (cached on disk by content + bundle + crop spec; memoised per process)."""
        site = self.read_site()
        stamp = tuple(sorted((c.case_id, _stat(c.image_path), _stat(c.mask_path), c.label) for c in site.cases))
        memo = self._features.get(bundle.hash)
        if memo is not None and memo[0] == stamp:
            return memo[1]
        split = self.split(site)
        by_id = {c.case_id: c for c in site.cases}
        predictor = _LazyPredictor(bundle, self.config.device)
        rows: dict[str, CachedCase] = {}
        unusable = len([p for p in site.problems if p.case_id is not None])
        from tqdm import tqdm

        for case in tqdm(site.cases, desc=f"{self.config.name}: preprocessing", unit="case", disable=None):
            try:
                rows[case.case_id] = self._case(case, bundle, predictor)
            except IchfedError as e:
                # An unreadable case is counted and logged at the site; the run goes on without it.
                log.warning("site %s: case %s unusable: %s", self.config.name, case.case_id, e)
                unusable += 1
            except Exception:  # one case breaking the pipeline must not cost the site its other cases
                log.exception("site %s: case %s failed in preprocessing", self.config.name, case.case_id)
                unusable += 1
        log.info("site %s: cache %d hits, %d misses", self.config.name, self.cache.hits, self.cache.misses)
        feats = SiteFeatures(
            fine_tune=_part([rows[c] for c in split.fine_tune if c in rows], [by_id[c] for c in split.fine_tune if c in rows]),
            held_out=_part([rows[c] for c in split.held_out if c in rows], [by_id[c] for c in split.held_out if c in rows]),
            n_unusable=unusable,
        )
        self._features[bundle.hash] = (stamp, feats)
        return feats

    def _case(self, case, bundle, predictor: "_LazyPredictor") -> CachedCase:
        case_hash = content_hash(case.image_path)
        mask_hash = content_hash(case.mask_path) if case.mask_path is not None else None
        key = cache_key(case_hash, bundle.hash, bundle.crop_spec.key(), mask_hash)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        from shared.ingest import read_image

        ingested = read_image(case.image_path)
        prepared = predictor.get().preprocess(ingested.image)
        crop = prepared.crop
        features = None
        if crop.lesion_found and crop.array is not None:
            features = predictor.get().embed(crop.array[None])[0].astype(np.float32)
        dice_ich = dice_phe = None
        if case.mask_path is not None:
            from shared.metrics import dice
            from shared.sitedata import read_mask

            truth = read_mask(case.mask_path, like=ingested.image)
            dice_ich, dice_phe = dice(prepared.mask, truth, 1), dice(prepared.mask, truth, 2)
        entry = CachedCase(
            lesion_found=features is not None,
            features=features,
            crop=crop.array if features is not None else None,
            dice_ich=dice_ich,
            dice_phe=dice_phe,
            ich_ml=prepared.volumetrics.ich_ml,
            phe_ml=prepared.volumetrics.phe_ml,
        )
        self.cache.put(key, entry)
        return entry

    # -- threshold -------------------------------------------------------------------------
    def calibrate(self, head: Head, part: Part, fallback: float) -> tuple[float, str | None]:
        """The threshold for ``head`` from its scores on ``part`` (the fine-tune split): the midpoint
        rule on the grid (``client.calibrate.site_threshold``).

        For a head that trained on ``part`` these scores are partly in-sample; the final reply's
        local-only arm uses out-of-fold scores instead. Falls back to ``fallback`` (the bundle's
        threshold) with a reason code when ``part`` lacks a class.
        """
        from .calibrate import site_threshold

        t = site_threshold(part.labels, p_neoplastic(head, part.features), fallback)
        return t.p, t.reason

    def save_local_threshold(self, bundle_hash: str, threshold: float, source: str,
                             calibration: dict | None = None) -> Path:
        """Keep the site's threshold (and calibration) for ``bundle_hash`` as its site overlay."""
        from .overlay import SiteOverlay, save_overlay

        return save_overlay(self.config.state_dir, SiteOverlay(
            bundle_hash=bundle_hash, threshold=float(threshold), threshold_source=source,
            calibration=calibration, site=self.config.name))

    # -- evaluation --------------------------------------------------------------------------
    @property
    def min_cases(self) -> int:
        """``min_cases_for_metrics``, never below the protocol's floor."""
        return max(int(self.config.min_cases_for_metrics), P.MIN_CASES_FLOOR)

    def evaluate(self, model: str, head: Head, threshold: float, part: Part,
                 threshold_reason: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        """Aggregate metrics of ``head`` at ``threshold`` on ``part`` (``client.evaluate.arm_metrics``)."""
        from .evaluate import arm_metrics

        return arm_metrics(model, part, p_neoplastic(head, part.features), threshold, min_cases=self.min_cases,
                           seed=self.config.seed, threshold_reason=threshold_reason)


def load_local_threshold(state_dir: str | os.PathLike, bundle_hash: str) -> float | None:
    """The threshold of the site's overlay for ``bundle_hash``, or None (see ``client.overlay.load_overlay``)."""
    from .overlay import load_overlay

    overlay = load_overlay(state_dir, bundle_hash)
    return None if overlay is None else overlay.threshold


def _part(rows: list[CachedCase], cases: list) -> Part:
    with_lesion = [(r, c) for r, c in zip(rows, cases) if r.lesion_found]
    feats = (np.stack([r.features for r, _ in with_lesion]).astype(np.float32)
             if with_lesion else np.zeros((0, P.HEAD_FEATURES), np.float32))
    return Part(
        features=feats,
        labels=np.array([int(c.label) for _, c in with_lesion], dtype=np.int64),
        n_no_lesion=len(rows) - len(with_lesion),
        n_no_lesion_pos=sum(int(c.label) == 1 for r, c in zip(rows, cases) if not r.lesion_found),
        dice_ich=[r.dice_ich for r in rows if r.dice_ich is not None],
        dice_phe=[r.dice_phe for r in rows if r.dice_phe is not None],
        has_masks=any(c.mask_path is not None for c in cases),
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
