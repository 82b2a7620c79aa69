"""Hierarchical bootstrap of within-site AUCs, where case-level scores exist (benchmarks, simulation).

The question a federation answers for a hospital is "does my AUC go up?", so the primary paired
endpoint is the mean over sites, with equal site weights, of the within-site AUC difference of two
models on the same held-out cases. Where the cases' scores are at hand (a benchmark, a simulated
federation whose sites all live on one machine), its interval comes from resampling both levels
of the design: sites with replacement, then, within each drawn site, its cases (stratified by
class, so each resample keeps the site's class counts). In a real federation cases never leave a
site and ``shared.evaluation.rocstats.site_mean`` gives the t interval instead.

A site may hold several independent cohorts (``Block``: e.g. one per cohort seed) and, per
cohort, several replicates: rows of scores, each with a mask of the cases it is evaluated on
(a replicate's held-out cases). A site's value for a model is the mean of its AUCs over all rows;
a resample reweights the cohort's cases once and every row sees the same weights (the same
patients), which is what makes the replicate average's case-level uncertainty honest.

Scores are ranked once per row; a resample only changes case weights, and the weighted
Mann-Whitney AUC (ties count 1/2) is then a few cumulative sums.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import norm

from shared.plumbing.errors import IchfedError


@dataclasses.dataclass(frozen=True)
class Block:
    """One cohort of a site: labels ``(n,)``, per model scores ``(R, n)`` (or ``(n,)``: the same in
    every row) and ``mask`` ``(R, n)`` of the cases each row is evaluated on (None: all cases)."""

    labels: np.ndarray
    scores: Mapping[str, np.ndarray]
    mask: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class SiteScores:
    """A site's case-level scores, one ``Block`` per independent cohort."""

    name: str
    blocks: Sequence[Block]


@dataclasses.dataclass(frozen=True)
class BootstrapEstimate:
    """A statistic over sites, its bootstrap SE and percentile CI, and the per-site values behind it."""

    estimate: float | None
    se: float | None
    ci_low: float | None
    ci_high: float | None
    n_boot: int
    k: int
    site_values: dict[str, float | None]
    method: str = "hierarchical bootstrap (sites, then cases within site); equal site weights; percentile CI"

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)


class _Ranked:
    """One model's scores in one block, ranked once: what every resample reuses."""

    def __init__(self, scores: np.ndarray, pos: np.ndarray, rows: int) -> None:
        s = np.broadcast_to(np.asarray(scores, np.float64), (rows, pos.size))
        self.order = np.argsort(s, axis=1, kind="stable").astype(np.int32)
        ss = np.take_along_axis(s, self.order, 1)
        n = pos.size
        idx = np.broadcast_to(np.arange(n, dtype=np.int32), ss.shape)
        first = np.ones(ss.shape, bool)
        first[:, 1:] = ss[:, 1:] != ss[:, :-1]
        last = np.ones(ss.shape, bool)
        last[:, :-1] = first[:, 1:]
        start = np.maximum.accumulate(np.where(first, idx, 0), axis=1)
        self.end = np.minimum.accumulate(np.where(last, idx, n - 1)[:, ::-1], axis=1)[:, ::-1].astype(np.int32)
        self.below = (start - 1).astype(np.int32)  # -1: nothing below the tie group
        self.pos = pos[self.order]

    def aucs(self, weights: np.ndarray) -> np.ndarray:
        """Weighted AUC of every row; ``weights`` ``(R, n)`` (0 outside the row's mask)."""
        w = np.take_along_axis(weights, self.order, 1)
        wp = np.where(self.pos, w, 0.0)
        wn = w - wp
        cn = np.cumsum(wn, axis=1)
        below = np.where(self.below >= 0, np.take_along_axis(cn, np.maximum(self.below, 0), 1), 0.0)
        upto = np.take_along_axis(cn, self.end, 1)
        den = wp.sum(1) * wn.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, (wp * (below + upto)).sum(1) * 0.5 / den, np.nan)


class _PreparedBlock:
    def __init__(self, block: Block, models: Sequence[str]) -> None:
        y = np.asarray(block.labels)
        if y.ndim != 1 or not np.isin(y, (0, 1)).all():
            raise IchfedError("labels: need a 1-D array of 0/1 labels")
        pos = y == 1
        rows = max([np.atleast_2d(block.scores[m]).shape[0] for m in models] +
                   ([np.atleast_2d(block.mask).shape[0]] if block.mask is not None else []))
        mask = np.ones((rows, y.size), bool) if block.mask is None else np.broadcast_to(
            np.atleast_2d(np.asarray(block.mask, bool)), (rows, y.size))
        scores = {}
        for m in models:
            s = np.atleast_2d(np.asarray(block.scores[m], np.float64))
            if s.shape[1] != y.size or s.shape[0] not in (1, rows):
                raise IchfedError(f"scores of '{m}': need ({rows}, {y.size}) or ({y.size},) scores")
            s = np.where(mask, np.broadcast_to(s, mask.shape), 0.0) if s.shape[0] == rows else s
            if not np.isfinite(s).all():
                raise IchfedError(f"scores of '{m}': not finite where the mask uses them")
            scores[m] = s  # a case outside a row's mask has weight 0 there: its value is irrelevant
        self.mask = mask.astype(np.float64)
        self.ranked = {m: _Ranked(scores[m], pos, rows) for m in models}
        self.classes = [np.flatnonzero(pos), np.flatnonzero(~pos)]
        self.n = y.size

    def values(self, weights: np.ndarray | None) -> np.ndarray:
        """Per model, the mean over rows of the AUC at case ``weights`` (None: every case once)."""
        w = self.mask if weights is None else self.mask * weights[None, :]
        return np.array([np.nanmean(r.aucs(w)) for r in self.ranked.values()])

    def resample(self, rng: np.random.Generator) -> np.ndarray:
        """Case weights of one stratified resample (multiplicities, each class keeps its count)."""
        w = np.zeros(self.n)
        for idx in self.classes:
            if idx.size:
                w[idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size))
        return w


@dataclasses.dataclass
class SiteBootstrap:
    """Per-site model AUCs (``point``: ``(S, M)``) and their hierarchical resamples
    (``draws``: ``(B, S, M)``, the sites of each resample in its drawn order)."""

    names: list[str]
    models: list[str]
    point: np.ndarray
    draws: np.ndarray

    def _col(self, model: str) -> int:
        if model not in self.models:
            raise IchfedError(f"model: '{model}' is not one of {self.models}")
        return self.models.index(model)

    def difference(self, a: str, b: str, alpha: float = 0.05) -> BootstrapEstimate:
        """Mean over sites (equal weights) of AUC(a) - AUC(b), with its bootstrap interval."""
        ia, ib = self._col(a), self._col(b)
        site = self.point[:, ia] - self.point[:, ib]
        stat = np.nanmean(self.draws[:, :, ia] - self.draws[:, :, ib], axis=1)
        return self._summary(float(np.nanmean(site)), stat, site, alpha)

    def mean(self, model: str, alpha: float = 0.05) -> BootstrapEstimate:
        """Mean over sites (equal weights) of AUC(model)."""
        i = self._col(model)
        return self._summary(float(np.nanmean(self.point[:, i])), np.nanmean(self.draws[:, :, i], axis=1),
                             self.point[:, i], alpha)

    def gap_closed(self, arm: str, reference: str, oracle: str, alpha: float = 0.05) -> BootstrapEstimate:
        """Share of the oracle's gain closed by ``arm``: mean(arm - reference) / mean(oracle - reference).

        None where the oracle's mean gain is not positive (no gap to close)."""
        ia, ir, io = self._col(arm), self._col(reference), self._col(oracle)
        num_site = self.point[:, ia] - self.point[:, ir]
        den_site = self.point[:, io] - self.point[:, ir]
        den = float(np.nanmean(den_site))
        with np.errstate(invalid="ignore", divide="ignore"):
            site = np.where(den_site > 0, num_site / den_site, np.nan)
            stat = (np.nanmean(self.draws[:, :, ia] - self.draws[:, :, ir], axis=1)
                    / np.nanmean(self.draws[:, :, io] - self.draws[:, :, ir], axis=1))
        stat = np.where(np.isfinite(stat), stat, np.nan)
        est = float(np.nanmean(num_site)) / den if den > 0 else None
        return self._summary(est, stat, site, alpha)

    def _summary(self, estimate: float | None, stat: np.ndarray, site: np.ndarray, alpha: float) -> BootstrapEstimate:
        values = {n: (None if not np.isfinite(v) else float(v)) for n, v in zip(self.names, site)}
        ok = stat[np.isfinite(stat)]
        if estimate is None or not math.isfinite(estimate) or ok.size < 2:
            return BootstrapEstimate(estimate if estimate is None or math.isfinite(estimate) else None,
                                     None, None, None, int(stat.size), len(self.names), values)
        lo, hi = np.quantile(ok, [alpha / 2.0, 1.0 - alpha / 2.0])
        return BootstrapEstimate(float(estimate), float(ok.std(ddof=1)), float(lo), float(hi), int(stat.size),
                                 len(self.names), values)


def bootstrap_sites(sites: Sequence[SiteScores], models: Sequence[str], n_boot: int = 2000,
                    seed: int = 0, resample_sites: bool = True) -> SiteBootstrap:
    """Every site's replicate-mean AUC per model, and ``n_boot`` hierarchical resamples of them.

    Parameters
    ----------
    sites : the sites' case-level scores (every block must hold every model)
    models : the models (keys of each block's ``scores``) to compute
    n_boot : resamples; each draws ``len(sites)`` sites with replacement, then each drawn site's
        cases within every block (stratified by class)
    seed : the resampling seed
    resample_sites : False keeps the sites fixed and resamples only cases (the case-level share
        of the variance, e.g. for a design that changes the number of cases)
    """
    if not sites:
        raise IchfedError("sites: need at least one site")
    if n_boot < 0:
        raise IchfedError(f"n_boot: must be >= 0, got {n_boot}")
    models = list(models)
    prepared = [[_PreparedBlock(b, models) for b in s.blocks] for s in sites]
    for s, blocks in zip(sites, prepared):
        if not blocks:
            raise IchfedError(f"site {s.name}: no cohort blocks")
    point = np.array([np.mean([b.values(None) for b in blocks], axis=0) for blocks in prepared])
    rng = np.random.default_rng(seed)
    draws = np.empty((n_boot, len(sites), len(models)))
    for i in range(n_boot):
        drawn = rng.integers(0, len(sites), size=len(sites)) if resample_sites else range(len(sites))
        for j, k in enumerate(drawn):
            draws[i, j] = np.mean([b.values(b.resample(rng)) for b in prepared[k]], axis=0)
    return SiteBootstrap([s.name for s in sites], models, point, draws)


def detectable_difference(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true difference a two-sided level-``alpha`` test with standard error ``se`` detects
    with probability ``power``: ``(z_{1-alpha/2} + z_{power}) * se`` (2.80 x se at 5 % / 80 %).

    Meaningful only with an ``se`` that reflects the design's real variability (a pilot's or the
    run's own hierarchical-bootstrap SE), never one from a single meta-analysis."""
    if not (se >= 0 and math.isfinite(se)) or not 0 < alpha < 1 or not 0 < power < 1:
        raise IchfedError(f"detectable_difference: need se >= 0, alpha and power in (0, 1); got {se}, {alpha}, {power}")
    return float((norm.ppf(1.0 - alpha / 2.0) + norm.ppf(power)) * se)
