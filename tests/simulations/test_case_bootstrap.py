"""A simulation's case-level check: the sites' kept held-out scores (final_scores.npz, never sent)
give the paired endpoints a hierarchical bootstrap CI in the simulation's report."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from server.report import markdown
from simulations.flower_sim import case_level_bootstrap


def _site(folder, rng, n=60, gain=1.0, one_class=False):
    y = np.r_[np.ones(n // 2, int), np.zeros(n // 2, int)] if not one_class else np.zeros(n, int)
    latent = rng.normal(size=n)
    ref = latent + 0.5 * y
    fed = latent + (0.5 + gain) * y + 0.3 * rng.normal(size=n)
    folder.mkdir(parents=True)
    np.savez(folder / "final_scores.npz", labels=y, reference=ref, reference_site=ref, local=ref + 0.1 * y,
             federated=fed)
    return y, ref, fed


def test_case_level_bootstrap_from_the_sites_kept_scores(tmp_path):
    rng = np.random.default_rng(0)
    truth = [_site(tmp_path / f"s{i}", rng, gain=0.5 + 0.3 * i) for i in range(3)]
    _site(tmp_path / "one-class", rng, one_class=True)  # no AUC there: left out
    boot = case_level_bootstrap([tmp_path / f"s{i}" for i in range(3)] + [tmp_path / "one-class", tmp_path / "none"],
                                ["s0", "s1", "s2", "one-class", "none"], n_boot=200)
    d = boot["differences"]["federated − reference"]
    expect = np.mean([roc_auc_score(y, f) - roc_auc_score(y, r) for y, r, f in truth])
    assert boot["n_sites"] == 3 and d["estimate"] == pytest.approx(expect)
    assert set(d["site_values"]) == {"s0", "s1", "s2"} and d["ci_low"] < d["estimate"] < d["ci_high"]
    assert case_level_bootstrap([tmp_path / "none"], ["none"]) is None
    report = {"run": {"sites": ["s0"]}, "rounds": [], "final": {"sites": [], "pooled": {}, "bootstrap": boot}}
    md = markdown(report, with_figures=False)
    assert "case-level check (simulation" in md
    assert f"federated − reference: {d['estimate']:+.3f} ({d['ci_low']:+.3f} to {d['ci_high']:+.3f})" in md
