"""shared.evaluation.rocstats: DeLong AUC variance, paired differences, pooled ROC from histograms, meta-analysis."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from shared.evaluation.rocstats import (
    delong_auc,
    delong_paired,
    meta_analysis,
    meta_analysis_auc,
    pooled_roc,
    score_histogram,
    site_mean,
)
from shared.plumbing.errors import IchfedError


def _simulate(rng: np.random.Generator, n_pos: int, n_neg: int, shift: float = 1.0):
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    latent = rng.normal(size=y.size) + shift * y
    return y, 1.0 / (1.0 + np.exp(-latent))


def _naive_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """DeLong 1988 written from the kernel psi(x, y) over all pairs (O(mn)), for cross-checking."""

    def components(s):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    auc_a, v10a, v01a = components(a)
    auc_b, v10b, v01b = components(b)
    m, n = v10a.size, v01a.size
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    cov = s10 / m + s01 / n
    return auc_a, cov[0, 0], cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]


def test_delong_auc_equals_sklearn_with_ties_and_matches_the_pairwise_formula():
    rng = np.random.default_rng(3)
    y, p = _simulate(rng, 23, 31)
    p = np.round(p, 1)  # many ties, across and within classes
    est = delong_auc(y, p)
    assert est.estimate == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    auc, var, _ = _naive_delong(y, p, p)
    assert est.variance == pytest.approx(var, rel=1e-9)
    lo, hi = est.ci()
    assert lo < est.estimate < hi and hi - lo == pytest.approx(2 * 1.959964 * math.sqrt(var), rel=1e-5)


def test_delong_variance_agrees_with_a_bootstrap_variance():
    rng = np.random.default_rng(7)
    y, p = _simulate(rng, 60, 80)
    est = delong_auc(y, p)
    # Stratified resamples; AUC of every resample at once by the Mann-Whitney rank sum.
    pos = rng.choice(p[y == 1], size=(2000, 60))
    neg = rng.choice(p[y == 0], size=(2000, 80))
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    boot = (ranks[:, :60].sum(axis=1) - 60 * 61 / 2) / (60 * 80)
    assert est.variance == pytest.approx(np.var(boot, ddof=1), rel=0.15)


def test_delong_paired_difference_and_its_variance():
    rng = np.random.default_rng(11)
    y, a = _simulate(rng, 30, 40, shift=1.5)
    b = np.clip(a + rng.normal(scale=0.15, size=a.size), 0, 1)
    diff = delong_paired(y, a, b)
    assert diff.estimate == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    _, _, var = _naive_delong(y, a, b)
    assert diff.variance == pytest.approx(var, rel=1e-9)
    # Correlated curves: the paired variance is far below the sum of the two marginal variances.
    assert diff.variance < 0.5 * (delong_auc(y, a).variance + delong_auc(y, b).variance)
    same = delong_paired(y, a, a)
    assert same.estimate == 0.0 and same.variance == pytest.approx(0.0, abs=1e-15)


def test_delong_rejects_too_few_cases_per_class_and_mismatched_models():
    with pytest.raises(IchfedError, match="at least 2 cases of each class"):
        delong_auc([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3])
    with pytest.raises(IchfedError, match="same cases"):
        delong_paired([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2], [0.9, 0.8, 0.1])


def test_score_histogram_bins_and_pooled_roc_auc():
    rng = np.random.default_rng(5)
    sites = [_simulate(rng, 20 + 5 * k, 30) for k in range(3)]
    hists = [score_histogram(y, p, bins=50) for y, p in sites]
    for (y, p), (neg, pos) in zip(sites, hists):
        assert len(neg) == len(pos) == 50 and sum(neg) == (y == 0).sum() and sum(pos) == (y == 1).sum()
    assert score_histogram([1, 0], [1.0, 0.0], bins=50) == ([1] + [0] * 49, [0] * 49 + [1])
    roc = pooled_roc(hists)
    y_all = np.concatenate([y for y, _ in sites])
    p_all = np.concatenate([p for _, p in sites])
    # Binning the scores to 50 bins (mid-ties) gives exactly sklearn's AUC of the binned scores.
    binned = np.minimum(np.floor(p_all * 50), 49)
    assert roc.auc == pytest.approx(roc_auc_score(y_all, binned), abs=1e-12)
    assert roc.auc == pytest.approx(roc_auc_score(y_all, p_all), abs=0.02)
    assert (roc.n_pos, roc.n_neg) == (int(y_all.sum()), int((1 - y_all).sum()))
    assert roc.fpr[0] == roc.tpr[0] == 0.0 and roc.fpr[-1] == roc.tpr[-1] == 1.0
    assert np.all(np.diff(roc.fpr) >= 0) and np.all(np.diff(roc.tpr) >= 0)
    assert np.trapezoid(roc.tpr, roc.fpr) == pytest.approx(roc.auc, abs=1e-12)


def test_pooled_roc_undefined_without_both_classes_and_rejects_mixed_bins():
    assert pooled_roc([([3, 0], [0, 0])]).auc is None
    assert pooled_roc([]).auc is None
    with pytest.raises(IchfedError, match="same bins"):
        pooled_roc([([1, 0], [0, 1]), ([1, 0, 0], [0, 0, 1])])


def test_meta_analysis_fixed_and_random_effects_textbook_values():
    # Hand-computed: w = 1/v = (100, 25, 50); fixed = (100*.8 + 25*.6 + 50*.7)/175.
    e, v = [0.8, 0.6, 0.7], [0.01, 0.04, 0.02]
    res = meta_analysis(e, v)
    fixed = (80 + 15 + 35) / 175
    assert res.fixed.estimate == pytest.approx(fixed)
    assert res.fixed.se == pytest.approx(math.sqrt(1 / 175))
    q = 100 * (0.8 - fixed) ** 2 + 25 * (0.6 - fixed) ** 2 + 50 * (0.7 - fixed) ** 2
    c = 175 - (100**2 + 25**2 + 50**2) / 175
    assert res.q == pytest.approx(q)
    assert res.tau2 == pytest.approx(max(0.0, (q - 2) / c))
    assert res.fixed.ci_low == pytest.approx(fixed - 1.959964 * res.fixed.se, rel=1e-6)
    assert res.k == 3 and 0.0 <= res.i2 < 1.0


def test_meta_analysis_heterogeneous_sites_widen_the_random_effects_interval():
    res = meta_analysis([0.55, 0.9, 0.6, 0.95], [0.002, 0.002, 0.002, 0.002])
    assert res.tau2 > 0 and res.i2 > 0.8
    assert res.random.ci_high - res.random.ci_low > 2 * (res.fixed.ci_high - res.fixed.ci_low)
    one = meta_analysis([0.7], [0.01])
    assert one.fixed.estimate == one.random.estimate == 0.7 and one.tau2 == 0.0
    assert set(one.to_dict()) == {"fixed", "random", "tau2", "i2", "q", "k", "random_ci"}
    with pytest.raises(IchfedError, match="non-negative"):
        meta_analysis([0.7], [-0.01])


def test_meta_analysis_auc_pools_on_the_logit_scale_and_keeps_the_interval_inside_0_1():
    # Near 1, a raw-scale normal CI crosses 1; the logit-scale one cannot.
    aucs, var = [0.98, 0.99], [0.0004, 0.0003]
    raw = meta_analysis(aucs, var)
    res = meta_analysis_auc(aucs, var)
    assert raw.fixed.ci_high > 1.0
    assert 0.85 < res.fixed.ci_low < res.fixed.estimate < res.fixed.ci_high < 1.0
    # Asymmetric: more room below the estimate than above it.
    assert res.fixed.estimate - res.fixed.ci_low > res.fixed.ci_high - res.fixed.estimate
    # The back-transformed estimate is the logistic of the inverse-variance mean of logits.
    lg = [math.log(a / (1 - a)) for a in aucs]
    w = [(a * (1 - a)) ** 2 / v for a, v in zip(aucs, var)]
    assert res.fixed.estimate == pytest.approx(1 / (1 + math.exp(-sum(x * wi for x, wi in zip(lg, w)) / sum(w))))
    # Mid-range AUCs: logit and raw pooling nearly agree.
    mid = meta_analysis_auc([0.6, 0.7], [0.004, 0.004])
    assert mid.fixed.estimate == pytest.approx(meta_analysis([0.6, 0.7], [0.004, 0.004]).fixed.estimate, abs=0.01)
    # A perfect site AUC stays finite; out-of-range input is one-line error.
    assert 0.9 < meta_analysis_auc([1.0, 0.9], [0.001, 0.002]).fixed.estimate < 1.0
    with pytest.raises(IchfedError, match="aucs"):
        meta_analysis_auc([1.2], [0.01])


def test_perfect_separation_gets_a_small_positive_variance_not_infinite_weight():
    y = [1, 1, 1, 0, 0, 0]
    perfect = delong_auc(y, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert perfect.estimate == 1.0 and 0.0 < perfect.variance < delong_auc(y, [0.9, 0.8, 0.2, 0.7, 0.3, 0.1]).variance
    # Both rank perfectly but in different orders: a new case could break one and not the other.
    both = delong_paired(y, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1], [0.6, 0.9, 0.8, 0.1, 0.3, 0.2])
    assert both.estimate == 0.0 and both.variance > 0.0


def test_two_heads_that_rank_identically_differ_by_zero_with_zero_variance():
    """One head a rescaling of the other (same order of every case): the difference is 0 on every
    resample of the cases, so its variance is 0, not the single-AUC floor (0.0056 before)."""
    rng = np.random.default_rng(2)
    y, a = _simulate(rng, 7, 9, shift=0.8)
    logit = np.log(a / (1 - a))
    b = 1 / (1 + np.exp(-(3.0 * logit - 1.0)))  # monotone rescaling: identical ranking
    assert not np.array_equal(a, b) and 0.5 < roc_auc_score(y, a) < 1.0
    d = delong_paired(y, a, b)
    assert d.estimate == 0.0 and d.variance == 0.0
    # The same for two perfect rankings with the same order.
    yp = [1, 1, 1, 0, 0, 0]
    p = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert delong_paired(yp, p, p / 2).variance == 0.0


def test_random_effects_ci_is_hartung_knapp_with_few_sites():
    e, v = [0.02, 0.10, -0.04, 0.07], [0.0009] * 4
    res = meta_analysis(e, v)
    assert res.random_ci == "hksj" and res.k == 4
    w = 1 / (np.asarray(v) + res.tau2)
    mu = float((w * e).sum() / w.sum())
    se = math.sqrt(float((w * (np.asarray(e) - mu) ** 2).sum()) / (3 * w.sum()))
    assert res.random.estimate == pytest.approx(mu) and res.random.se == pytest.approx(se)
    assert res.random.ci_high - mu == pytest.approx(3.182446 * se, rel=1e-5)  # t_{3, 0.975}
    many = meta_analysis(list(np.linspace(-0.05, 0.05, 25)), [0.001] * 25)
    assert many.random_ci == "normal"
    assert meta_analysis([0.1], [0.01]).random_ci == "single-site"


def test_hksj_keeps_its_coverage_with_four_heterogeneous_sites_where_dl_does_not():
    """4 sites, true mean 0, between-site SD tau = 0.06, within-site SE 0.03 (issue 20's setting)."""
    rng = np.random.default_rng(20)
    n, tau, se = 3000, 0.06, 0.03
    hk = dl = 0
    for _ in range(n):
        e = rng.normal(0.0, tau, 4) + rng.normal(0.0, se, 4)
        res = meta_analysis(e, [se**2] * 4)
        hk += res.random.ci_low <= 0.0 <= res.random.ci_high
        w = 1 / (se**2 + res.tau2)
        half = 1.959964 * math.sqrt(1 / (4 * w))  # DerSimonian-Laird with a normal quantile
        dl += abs(res.random.estimate) <= half
    assert hk / n >= 0.935, hk / n
    assert dl / n <= 0.93 and dl / n < hk / n - 0.02, (dl / n, hk / n)


def test_site_mean_weighs_sites_equally_with_a_t_interval():
    r = site_mean([0.05, -0.01, 0.03, 0.01])
    assert r.estimate == pytest.approx(0.02) and r.k == 4
    sd = float(np.std([0.05, -0.01, 0.03, 0.01], ddof=1))
    assert r.sd == pytest.approx(sd) and r.se == pytest.approx(sd / 2)
    assert r.ci_low == pytest.approx(0.02 - 3.182446 * sd / 2, rel=1e-5)
    assert r.values == [0.05, -0.01, 0.03, 0.01]
    one = site_mean([0.04])
    assert one.estimate == 0.04 and one.se is None and one.ci_low is None
    with pytest.raises(IchfedError, match="values"):
        site_mean([])
    # The failure: a site whose head barely moved (tiny DeLong variance) drags an
    # inverse-variance mean to itself; the equal-weight mean stays the sites' average.
    diffs, var = [-0.05, -0.04, -0.02, 0.0005], [0.002, 0.002, 0.002, 1e-9]
    assert abs(meta_analysis(diffs, var).fixed.estimate - 0.0005) < 1e-3
    assert site_mean(diffs).estimate == pytest.approx(np.mean(diffs))
