"""ROC statistics that combine across sites without moving patient-level data.

- :func:`delong_auc` / :func:`delong_paired`: an AUC and its variance, and the paired
  difference of two AUCs on the same cases with the variance of that difference (DeLong,
  DeLong & Clarke-Pearson 1988, computed with the fast midrank algorithm of Sun & Xu 2014).
  A site sends these few numbers; the server meta-analyses them.
- :func:`score_histogram` / :func:`pooled_roc`: per-class counts of scores on a fixed grid,
  which the server sums into one pooled ROC curve. Within a bin the order of a positive and a
  negative is unknown, so such pairs count 1/2 (the trapezoid through the bin edges).
- :func:`site_mean`: the primary paired endpoint where only per-site aggregates exist, the
  mean of the sites' within-site AUC differences with equal site weights and a ``t_{k-1}``
  interval from their spread. (Where case-level scores exist, :mod:`shared.evaluation.site_bootstrap`
  gives the same mean a hierarchical bootstrap interval.)
- :func:`meta_analysis`: inverse-variance fixed effect and DerSimonian-Laird random effects
  (:func:`meta_analysis_auc` pools AUCs on the logit scale); the random-effects CI is
  Hartung-Knapp-Sidik-Jonkman's up to ``HKSJ_MAX_SITES`` sites. statsmodels has this too, but
  is not a dependency; the formulas are a few lines.

Conventions follow :mod:`shared.evaluation.metrics`: ``y_true`` 1 = neoplastic (positive), ``p`` the
probability of the positive class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from scipy.special import expit
from scipy.stats import norm, rankdata
from scipy.stats import t as t_dist

from shared.plumbing.errors import IchfedError

# A variance of exactly 0 (two identically-ranking score sets) would give an infinite
# inverse-variance weight; this floor keeps the arithmetic finite while letting that site dominate.
_VAR_FLOOR = 1e-12


@dataclasses.dataclass(frozen=True)
class AucEstimate:
    """An AUC (or an AUC difference) and its DeLong variance."""

    estimate: float
    variance: float

    @property
    def se(self) -> float:
        """Standard error, ``sqrt(variance)``."""
        return math.sqrt(max(self.variance, 0.0))

    def ci(self, alpha: float = 0.05) -> tuple[float, float]:
        """Normal-theory ``1 - alpha`` confidence interval (not clipped to [0, 1])."""
        z = float(norm.ppf(1.0 - alpha / 2.0))
        return self.estimate - z * self.se, self.estimate + z * self.se


def _labels_scores(y_true: Any, scores: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    if y.ndim != 1 or s.ndim != 2 or s.shape[1] != y.size:
        raise IchfedError(f"y_true/p: need 1-D labels and scores of equal length, got {y.shape} and {s.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise IchfedError("y_true: labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise IchfedError("p: scores must be finite (got NaN or inf)")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    # The structural components' covariance needs two cases per class (ddof=1).
    if n_pos < 2 or n_neg < 2:
        raise IchfedError(
            f"y_true: DeLong variance needs at least 2 cases of each class, got {n_pos} positive, {n_neg} negative"
        )
    return y.astype(np.int64), s


def _delong_components(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of each score row and their DeLong covariance matrix (Sun & Xu 2014)."""
    x_pos, y_neg = s[:, y == 1], s[:, y == 0]
    m, n = x_pos.shape[1], y_neg.shape[1]
    tx = rankdata(x_pos, axis=1)
    ty = rankdata(y_neg, axis=1)
    tz = rankdata(np.concatenate([x_pos, y_neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: fraction of negatives it outranks
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: fraction of positives that outrank it
    s10 = np.atleast_2d(np.cov(v10, ddof=1))
    s01 = np.atleast_2d(np.cov(v01, ddof=1))
    return aucs, s10 / m + s01 / n


def _degenerate_floor(auc: float, m: int, n: int) -> float:
    """Hanley & McNeil (1982) variance at the AUC moved half a case pair away from 0 or 1.

    DeLong's variance is exactly 0 when a site separates its cases perfectly (AUC 1), which
    would give that site infinite weight in a meta-analysis; a dozen perfectly ranked cases
    are not certainty. This floor is what one discordant half-pair would imply.
    """
    a = min(max(auc, 0.5 / (m * n)), 1.0 - 0.5 / (m * n))
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    return (a * (1 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (m * n)


def delong_auc(y_true: Sequence[int], p: Sequence[float]) -> AucEstimate:
    """AUC (equal to sklearn's ``roc_auc_score``, ties counted 1/2) and its DeLong variance.

    Where DeLong's variance is 0 (perfect or fully tied ranking) the Hanley-McNeil variance at
    the AUC moved half a case pair inwards is returned instead (see ``_degenerate_floor``).
    """
    y, s = _labels_scores(y_true, p)
    aucs, cov = _delong_components(y, s)
    var = float(max(cov[0, 0], 0.0))
    if var <= 0.0:
        var = _degenerate_floor(float(aucs[0]), int((y == 1).sum()), int((y == 0).sum()))
    return AucEstimate(float(aucs[0]), var)


def delong_paired(y_true: Sequence[int], p_a: Sequence[float], p_b: Sequence[float]) -> AucEstimate:
    """``AUC(a) - AUC(b)`` on the same cases and its variance (DeLong for correlated ROC curves).

    Two score sets that rank the cases identically (one a monotone rescaling of the other) have
    a difference of exactly 0 on every resample of the cases: variance 0. Only where both rank
    perfectly (AUC 0 or 1) and differ in their order is DeLong's 0 replaced by the Hanley-McNeil
    floor of ``delong_auc``: there a new case could break one ranking and not the other.
    """
    a = np.asarray(p_a, dtype=np.float64)
    b = np.asarray(p_b, dtype=np.float64)
    if a.shape != b.shape:
        raise IchfedError(f"p_a/p_b: the two models must score the same cases, got {a.shape} and {b.shape}")
    y, s = _labels_scores(y_true, np.stack([a, b]))
    aucs, cov = _delong_components(y, s)
    contrast = np.array([1.0, -1.0])
    var = max(float(contrast @ cov @ contrast), 0.0)
    perfect = all(float(v) in (0.0, 1.0) for v in aucs)
    if var <= 0.0 and perfect and not np.array_equal(rankdata(a), rankdata(b)):
        m, n = int((y == 1).sum()), int((y == 0).sum())
        var = (_degenerate_floor(float(aucs[0]), m, n) + _degenerate_floor(float(aucs[1]), m, n)) / 2.0
    return AucEstimate(float(aucs[0] - aucs[1]), var)


def score_histogram(y_true: Sequence[int], p: Sequence[float], bins: int = 50) -> tuple[list[int], list[int]]:
    """Per-class counts of ``p`` in ``bins`` equal bins of [0, 1]: ``(neg_counts, pos_counts)``.

    The last bin is closed (p = 1.0 falls in it), as with ``numpy.histogram``.
    """
    y = np.asarray(y_true)
    s = np.asarray(p, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise IchfedError(f"y_true/p: need 1-D arrays of equal length, got {y.shape} and {s.shape}")
    if bins < 1:
        raise IchfedError(f"bins: must be >= 1, got {bins}")
    if s.size and (not np.isfinite(s).all() or s.min() < 0.0 or s.max() > 1.0):
        raise IchfedError("p: probabilities must be finite and lie in [0, 1]")
    if y.size and not np.isin(y, (0, 1)).all():
        raise IchfedError("y_true: labels must be 0 or 1")
    edges = np.linspace(0.0, 1.0, bins + 1)
    neg, _ = np.histogram(s[y == 0], bins=edges)
    pos, _ = np.histogram(s[y == 1], bins=edges)
    return [int(v) for v in neg], [int(v) for v in pos]


@dataclasses.dataclass(frozen=True)
class PooledRoc:
    """ROC through the bin edges of summed score histograms (from the highest bin down)."""

    fpr: list[float]
    tpr: list[float]
    auc: float | None
    n_pos: int
    n_neg: int

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def pooled_roc(histograms: Sequence[tuple[Sequence[int], Sequence[int]]]) -> PooledRoc:
    """Sum the sites' ``(neg_counts, pos_counts)`` histograms and build one ROC curve and AUC.

    Each pair of a positive and a negative in the same bin counts 1/2, which equals the
    trapezoidal area under the curve through the bin edges. AUC is None when a class is absent.
    """
    if not histograms:
        return PooledRoc([], [], None, 0, 0)
    lengths = {len(h[0]) for h in histograms} | {len(h[1]) for h in histograms}
    if len(lengths) != 1:
        raise IchfedError(f"histograms: all sites must use the same bins, got lengths {sorted(lengths)}")
    neg = np.sum([np.asarray(h[0], dtype=np.float64) for h in histograms], axis=0)
    pos = np.sum([np.asarray(h[1], dtype=np.float64) for h in histograms], axis=0)
    if (neg < 0).any() or (pos < 0).any():
        raise IchfedError("histograms: counts must be non-negative")
    n_neg, n_pos = int(neg.sum()), int(pos.sum())
    if n_neg == 0 or n_pos == 0:
        return PooledRoc([], [], None, n_pos, n_neg)
    # Walk the threshold down from above the top bin: cumulative counts from the top.
    neg_desc, pos_desc = neg[::-1], pos[::-1]
    fpr = np.concatenate([[0.0], np.cumsum(neg_desc) / n_neg])
    tpr = np.concatenate([[0.0], np.cumsum(pos_desc) / n_pos])
    pos_above = np.concatenate([[0.0], np.cumsum(pos_desc)[:-1]])
    auc = float(((pos_above + 0.5 * pos_desc) * neg_desc).sum() / (n_pos * n_neg))
    return PooledRoc([float(v) for v in fpr], [float(v) for v in tpr], auc, n_pos, n_neg)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A pooled estimate, its standard error and ``1 - alpha`` CI."""

    estimate: float
    se: float
    ci_low: float
    ci_high: float


@dataclasses.dataclass(frozen=True)
class MetaResult:
    """Fixed-effect and random-effects summaries of ``k`` site estimates.

    ``random_ci`` names how the random-effects interval was made: ``"hksj"`` (Hartung-Knapp-
    Sidik-Jonkman, a t quantile with k - 1 degrees of freedom, up to ``HKSJ_MAX_SITES`` sites),
    ``"normal"`` (DerSimonian-Laird with a normal quantile, more sites) or ``"single-site"``.
    """

    fixed: Estimate
    random: Estimate
    tau2: float
    i2: float
    q: float
    k: int
    random_ci: str = "hksj"

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (nested ``fixed`` / ``random``)."""
        return dataclasses.asdict(self)


# With few sites the DerSimonian-Laird interval with a normal quantile covers too rarely once the
# sites differ (4 sites, tau = 0.06: about 0.92 for a nominal 0.95; IntHout et al. 2014). Up to this
# many sites the random-effects CI is Hartung-Knapp-Sidik-Jonkman's, which keeps its coverage.
HKSJ_MAX_SITES = 20


def meta_analysis(estimates: Sequence[float], variances: Sequence[float], alpha: float = 0.05) -> MetaResult:
    """Inverse-variance fixed effect and DerSimonian-Laird random effects.

    The fixed-effect CI is normal-theory. The random-effects estimate uses DL's ``tau2``; its CI
    is Hartung-Knapp-Sidik-Jonkman's (``t_{k-1}`` times the weighted spread of the site estimates
    around it) for ``k <= HKSJ_MAX_SITES`` and normal-theory above (``random_ci`` says which).
    ``tau2`` is the between-site variance, ``i2`` the share of total variation due to it
    (Higgins & Thompson 2002), ``q`` Cochran's Q. With one site both summaries equal it.
    """
    e = np.asarray(estimates, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    if e.ndim != 1 or e.shape != v.shape or e.size == 0:
        raise IchfedError(f"estimates/variances: need equal, non-empty 1-D lists, got {e.shape} and {v.shape}")
    if not (np.isfinite(e).all() and np.isfinite(v).all()) or (v < 0).any():
        raise IchfedError("variances: must be finite and non-negative (and estimates finite)")
    if not 0.0 < alpha < 1.0:
        raise IchfedError(f"alpha: must lie in (0, 1), got {alpha}")
    z = float(norm.ppf(1.0 - alpha / 2.0))
    v = np.maximum(v, _VAR_FLOOR)
    w = 1.0 / v
    fixed = float((w * e).sum() / w.sum())
    q = float((w * (e - fixed) ** 2).sum())
    k = int(e.size)
    c = float(w.sum() - (w**2).sum() / w.sum())
    tau2 = max(0.0, (q - (k - 1)) / c) if k > 1 and c > 0 else 0.0
    i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    w_r = 1.0 / (v + tau2)
    rand = float((w_r * e).sum() / w_r.sum())
    if k == 1:
        random, how = _estimate(rand, math.sqrt(1.0 / w_r.sum()), z), "single-site"
    elif k <= HKSJ_MAX_SITES:
        # Hartung & Knapp (2001), Sidik & Jonkman (2002): the spread of the sites around the
        # random-effects mean, not the model's variance, with k - 1 degrees of freedom.
        se = math.sqrt(float((w_r * (e - rand) ** 2).sum()) / ((k - 1) * w_r.sum()))
        random, how = _estimate(rand, se, float(t_dist.ppf(1.0 - alpha / 2.0, k - 1))), "hksj"
    else:
        random, how = _estimate(rand, math.sqrt(1.0 / w_r.sum()), z), "normal"
    return MetaResult(fixed=_estimate(fixed, math.sqrt(1.0 / w.sum()), z), random=random, tau2=float(tau2),
                      i2=float(i2), q=q, k=k, random_ci=how)


@dataclasses.dataclass(frozen=True)
class SiteMean:
    """The equal-weight mean of ``k`` site values, with the t interval from their spread.

    ``se`` and the CI are None with one site (no spread to estimate); ``values`` are the site
    values behind the mean, in the order given.
    """

    estimate: float
    se: float | None
    ci_low: float | None
    ci_high: float | None
    k: int
    sd: float | None
    values: list[float]
    method: str = "equal site weights; t(k-1) on the between-site spread"

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def site_mean(values: Sequence[float], alpha: float = 0.05) -> SiteMean:
    """Mean of per-site values with equal site weights and a ``t_{k-1}`` CI from their spread.

    The primary paired endpoint of a federation in which cases never leave a site: each site
    sends its within-site AUC difference, and the question "does a hospital gain?" weighs every
    hospital the same. The interval rests on how much the sites' differences vary (it is the
    equal-weight Hartung-Knapp interval), so a site whose head barely changed cannot narrow it by
    reporting a tiny DeLong variance.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise IchfedError(f"values: need a non-empty list of finite site values, got shape {x.shape}")
    if not 0.0 < alpha < 1.0:
        raise IchfedError(f"alpha: must lie in (0, 1), got {alpha}")
    k, mean = int(x.size), float(x.mean())
    if k == 1:
        return SiteMean(mean, None, None, None, 1, None, [float(v) for v in x])
    sd = float(x.std(ddof=1))
    se = sd / math.sqrt(k)
    t = float(t_dist.ppf(1.0 - alpha / 2.0, k - 1))
    return SiteMean(mean, se, mean - t * se, mean + t * se, k, sd, [float(v) for v in x])


# AUCs are pooled on the logit scale, where a normal approximation holds near 0 and 1; a site
# AUC of exactly 0 or 1 is moved this far inside so that its logit stays finite.
_AUC_EDGE = 0.01


def meta_analysis_auc(aucs: Sequence[float], variances: Sequence[float], alpha: float = 0.05) -> MetaResult:
    """:func:`meta_analysis` of site AUCs on the logit scale, back-transformed.

    Each AUC ``a`` (clipped to [0.01, 0.99]) becomes ``logit(a)`` with the delta-method variance
    ``v / (a (1 - a))^2``; the pooled estimate and its CI are mapped back with the logistic
    function, so the interval stays inside (0, 1) and is asymmetric near the edges. ``se`` is the
    delta-method standard error on the AUC scale at the pooled estimate; ``tau2``, ``i2`` and
    ``q`` are on the logit scale.

    Examples
    --------
    >>> r = meta_analysis_auc([0.95, 0.97], [0.002, 0.001])
    >>> 0.9 < r.fixed.estimate < r.fixed.ci_high < 1.0
    True
    """
    a = np.asarray(aucs, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    if a.ndim != 1 or a.shape != v.shape or a.size == 0:
        raise IchfedError(f"aucs/variances: need equal, non-empty 1-D lists, got {a.shape} and {v.shape}")
    if not (np.isfinite(a).all() and ((a >= 0) & (a <= 1)).all()):
        raise IchfedError("aucs: must be finite and within [0, 1]")
    a = np.clip(a, _AUC_EDGE, 1.0 - _AUC_EDGE)
    raw = meta_analysis(np.log(a / (1.0 - a)), v / (a * (1.0 - a)) ** 2, alpha)
    return dataclasses.replace(raw, fixed=_expit_estimate(raw.fixed), random=_expit_estimate(raw.random))


def _expit_estimate(e: Estimate) -> Estimate:
    p = float(expit(e.estimate))
    return Estimate(p, p * (1.0 - p) * e.se, float(expit(e.ci_low)), float(expit(e.ci_high)))


def _estimate(value: float, se: float, z: float) -> Estimate:
    return Estimate(value, se, value - z * se, value + z * se)
