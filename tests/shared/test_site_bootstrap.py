"""shared.evaluation.site_bootstrap: within-site AUCs, their equal-weight mean difference and its
hierarchical (sites, then cases) bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from shared.evaluation.site_bootstrap import (
    Block,
    SiteScores,
    _PreparedBlock,
    bootstrap_sites,
    detectable_difference,
)
from shared.plumbing.errors import IchfedError


def _site(rng, name, n=80, gain=0.8, replicates=3):
    y = (rng.random(n) < 0.4).astype(int)
    y[:2], y[2:4] = 1, 0
    latent = rng.normal(size=n)
    ref = latent + 0.7 * y
    trained = np.stack([latent + (0.7 + gain) * y + 0.4 * rng.normal(size=n) for _ in range(replicates)])
    mask = np.ones((replicates, n), bool)
    for r in range(replicates):  # each replicate holds out all but its own 10 "fine-tune" cases
        mask[r, rng.choice(n, 10, replace=False)] = False
    return SiteScores(name, [Block(labels=y, scores={"ref": ref, "fed": trained}, mask=mask)]), y, ref, trained, mask


def test_point_values_are_replicate_means_of_sklearn_aucs_on_each_held_out_set():
    rng = np.random.default_rng(0)
    site, y, ref, fed, mask = _site(rng, "a")
    boot = bootstrap_sites([site], ["ref", "fed"], n_boot=0)
    expect_fed = np.mean([roc_auc_score(y[m], fed[r, m]) for r, m in enumerate(mask)])
    expect_ref = np.mean([roc_auc_score(y[m], ref[m]) for m in mask])
    assert boot.point[0, 1] == pytest.approx(expect_fed, abs=1e-12)
    assert boot.point[0, 0] == pytest.approx(expect_ref, abs=1e-12)


def test_resample_weights_equal_repeating_cases_and_ties_count_half():
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    s = np.round(np.array([0.9, 0.5, 0.5, 0.5, 0.2, 0.6, 0.3, 0.1]), 1)  # ties across classes
    w = np.array([2, 0, 1, 3, 1, 0, 1, 2], float)
    prepared = _PreparedBlock(Block(labels=y, scores={"m": s}), ["m"])
    expect = roc_auc_score(np.repeat(y, w.astype(int)), np.repeat(s, w.astype(int)))
    assert prepared.values(w)[0] == pytest.approx(expect, abs=1e-12)


def test_mean_difference_has_equal_site_weights_and_a_bootstrap_interval_around_it():
    rng = np.random.default_rng(1)
    sites = [_site(rng, f"s{i}", n=60 + 40 * i, gain=0.3 + 0.3 * i)[0] for i in range(5)]
    boot = bootstrap_sites(sites, ["ref", "fed"], n_boot=300, seed=4)
    d = boot.difference("fed", "ref")
    per_site = boot.point[:, 1] - boot.point[:, 0]
    assert d.estimate == pytest.approx(per_site.mean())  # not weighted by the sites' sizes
    assert set(d.site_values) == {f"s{i}" for i in range(5)}
    assert d.ci_low < d.estimate < d.ci_high and d.ci_low > 0 and d.se > 0 and d.k == 5
    # Same data, same seed: the same interval; another seed: close to it.
    again = bootstrap_sites(sites, ["ref", "fed"], n_boot=300, seed=4).difference("fed", "ref")
    assert again.to_dict() == d.to_dict()
    # Sites that differ dominate the SE: about their spread / sqrt(k), plus the case-level part.
    assert per_site.std() / np.sqrt(5) * 0.7 < d.se < per_site.std() / np.sqrt(5) * 2.0


def test_identical_rankings_give_zero_difference_and_a_zero_width_interval():
    rng = np.random.default_rng(2)
    site, *_ = _site(rng, "a")
    block = site.blocks[0]
    same = SiteScores("a", [Block(block.labels, {"x": block.scores["ref"], "y": 3 * block.scores["ref"] + 1},
                                  block.mask)])
    d = bootstrap_sites([same, same], ["x", "y"], n_boot=50).difference("x", "y")
    assert d.estimate == 0.0 and d.ci_low == d.ci_high == 0.0


def test_gap_closed_and_its_absence_without_oracle_gain():
    rng = np.random.default_rng(3)
    sites = []
    for i in range(4):
        site, y, ref, fed, mask = _site(rng, f"s{i}", gain=0.5)
        oracle = ref + 2.0 * y
        sites.append(SiteScores(site.name, [Block(y, {"ref": ref, "fed": fed, "oracle": oracle}, mask)]))
    boot = bootstrap_sites(sites, ["ref", "fed", "oracle"], n_boot=200)
    g = boot.gap_closed("fed", "ref", "oracle")
    gain = boot.difference("fed", "ref").estimate / boot.difference("oracle", "ref").estimate
    assert g.estimate == pytest.approx(gain) and 0 < g.estimate < 1
    none = boot.gap_closed("fed", "ref", "ref")
    assert none.estimate is None and none.ci_low is None


def test_bad_input_is_one_line_error_and_the_detectable_difference_formula():
    with pytest.raises(IchfedError, match="scores of 'm'"):
        bootstrap_sites([SiteScores("a", [Block(np.array([0, 1]), {"m": np.zeros(3)})])], ["m"])
    with pytest.raises(IchfedError, match="at least one site"):
        bootstrap_sites([], ["m"])
    assert detectable_difference(0.01) == pytest.approx(0.028, abs=2e-4)
    assert detectable_difference(0.01, power=0.9) > detectable_difference(0.01)
    with pytest.raises(IchfedError):
        detectable_difference(-1.0)
