"""Four-arm federation report: pooled AUC from histograms, meta-analytic AUC and paired differences with CIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from server.pooling import pool_model as pooled_metrics
from server.report import markdown, write_report
from shared.evaluation.metrics import classification_metrics
from shared.evaluation.rocstats import (
    delong_auc,
    delong_paired,
    meta_analysis_auc,
    score_histogram,
)
from shared.federation import protocol as P

PNG = b"\x89PNG\r\n\x1a\n"


def _arm(y, p, threshold, n_no_lesion=0, others=None):
    """A site's metrics for one arm, computed the way a site computes them from real scores."""
    m = classification_metrics(y, p, threshold, n_boot=0)
    d = {"n": m["n"], "n-pos": m["n_pos"], "n-neg": m["n_neg"], "auc": m["auc"], "threshold": threshold,
         "accuracy": m["accuracy"], "sensitivity": m["sensitivity"], "specificity": m["specificity"],
         **m["confusion"], "withheld": 0, "n-no-lesion": n_no_lesion,
         "auc-var": delong_auc(y, p).variance}
    # Intention to treat: the no-lesion cases (here all neoplastic) become false negatives.
    d.update({"itt-tp": d["tp"], "itt-fp": d["fp"], "itt-tn": d["tn"], "itt-fn": d["fn"] + n_no_lesion})
    d[P.HIST_NEG], d[P.HIST_POS] = score_histogram(y, p, bins=P.SCORE_BINS)
    for name, q in (others or {}).items():
        diff = delong_paired(y, p, q)
        d[f"auc-minus-{name}"], d[f"auc-minus-{name}-var"] = diff.estimate, diff.variance
    return d


def _sites(seed=0, k=4, n=60):
    rng = np.random.default_rng(seed)
    sites, truth = [], {"y": [], "ref": [], "fed": []}
    for i in range(k):
        y = np.r_[np.ones(n // 2, int), np.zeros(n // 2, int)]
        latent = rng.normal(size=n)
        ref = 1 / (1 + np.exp(-(latent + 0.6 * y)))
        fed = 1 / (1 + np.exp(-(latent + 1.6 * y + 0.3 * rng.normal(size=n))))
        local = 1 / (1 + np.exp(-(latent + 1.0 * y + 0.6 * rng.normal(size=n))))
        sites.append({"site": f"site-{i}", "status": "ok", "reasons": {},
                      P.MODEL_REFERENCE: _arm(y, ref, 0.5, n_no_lesion=2),
                      P.MODEL_REFERENCE_SITE: _arm(y, ref, 0.45, n_no_lesion=2),
                      P.MODEL_LOCAL: _arm(y, local, 0.5, n_no_lesion=2, others={"reference": ref}),
                      P.MODEL_FEDERATED: _arm(y, fed, 0.5, n_no_lesion=2, others={"reference": ref, "local": local})})
        truth["y"].append(y), truth["ref"].append(ref), truth["fed"].append(fed)
    return sites, {k: np.concatenate(v) for k, v in truth.items()}


def diff_scale(pooled):
    return pooled["minus_reference_meta"]["scale"]


def test_pooled_metrics_pooled_auc_meta_analysis_and_paired_differences():
    sites, t = _sites()
    fed = pooled_metrics(sites, P.MODEL_FEDERATED)
    # Pooled AUC from 50-bin histograms is within binning error of the AUC on all scores together.
    assert fed["pooled_auc"] == pytest.approx(roc_auc_score(t["y"], t["fed"]), abs=0.01)
    assert fed["pooled_n_pos"] == 120 and fed["hist_sites"] == 4
    assert fed["mean_site_auc"] == pytest.approx(np.mean([s["federated"]["auc"] for s in sites]))
    meta = fed["auc_meta"]
    direct = meta_analysis_auc([s["federated"]["auc"] for s in sites], [s["federated"]["auc-var"] for s in sites])
    assert meta["fixed"]["estimate"] == pytest.approx(direct.fixed.estimate) and meta["k"] == 4
    assert meta["scale"] == "logit" and diff_scale(fed) == "raw"
    assert meta["fixed"]["ci_low"] < meta["fixed"]["estimate"] < meta["fixed"]["ci_high"]
    diff = fed["minus_reference_meta"]
    assert diff["fixed"]["estimate"] == pytest.approx(
        np.average([s["federated"]["auc-minus-reference"] for s in sites],
                   weights=[1 / s["federated"]["auc-minus-reference-var"] for s in sites]))
    assert diff["random_ci"] == "hksj"
    assert fed["minus_local_meta"]["k"] == 4
    # The primary endpoint: equal site weights, t interval from the sites' spread, site values kept.
    primary = fed["minus_reference_mean"]
    site_diffs = [s["federated"]["auc-minus-reference"] for s in sites]
    assert primary["estimate"] == pytest.approx(np.mean(site_diffs)) and primary["k"] == 4
    assert primary["ci_low"] > 0  # a real AUC gain of this size is detected by 4 x 60 cases
    assert [v["estimate"] for v in primary["sites"]] == site_diffs
    assert [v["site"] for v in primary["sites"]] == [s["site"] for s in sites]
    assert [v["variance"] for v in diff["sites"]] == [s["federated"]["auc-minus-reference-var"] for s in sites]
    assert [a["auc"] for a in fed["site_aucs"]] == [s["federated"]["auc"] for s in sites]
    assert fed["zero_operating_point"] == []
    # Intention to treat: 8 no-lesion neoplastic cases pooled as false negatives.
    assert fed["n_no_lesion"] == 8
    assert fed["itt"]["confusion"]["fn"] == fed["confusion"]["fn"] + 8
    assert fed["itt"]["sensitivity"] < fed["sensitivity"]
    assert len(fed["reliability"]) > 5 and all(0 <= frac <= 1 for _, frac, _ in fed["reliability"])


def test_pooled_metrics_withheld_histograms_and_old_rows_degrade_to_reasons():
    sites, _ = _sites(k=2)
    for s in sites:
        for m in P.FINAL_ARMS:
            s[m][P.HIST_NEG] = s[m][P.HIST_POS] = None  # withheld below the minimum count
            s[m].pop("auc-var")
    ref = pooled_metrics(sites, P.MODEL_REFERENCE)
    assert ref["pooled_auc"] is None and "histograms" in ref["reasons"]["pooled_auc"]
    assert ref["auc_meta"] is None and "auc-var" in ref["reasons"]["auc_meta"]
    assert ref["mean_site_auc"] is not None


def test_report_shows_four_arms_with_cis_pooled_roc_and_reliability(tmp_path):
    sites, _ = _sites(seed=1)
    report = {"run": {"bundle_hash": "b" * 64, "num_rounds": 2, "sites": [s["site"] for s in sites], "seed": 1},
              "rounds": [], "final_bundle": None,
              "final": {"sites": sites, "pooled": {m: pooled_metrics(sites, m) for m in P.FINAL_ARMS}}}
    paths = write_report(report, tmp_path)
    for key in ("pooled_roc", "reliability", "roc", "confusion"):
        assert paths[key].read_bytes()[:8] == PNG
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "AUC is the primary comparison" in md and "Mean of site AUCs" in md
    for title in ("Before fine-tuning (reference bundle)", "Before fine-tuning, site threshold",
                  "Local-only last-layer fine-tuning", "Federated last-layer fine-tuning"):
        assert f"| {title} | 4 | 240 |" in md
    fed = report["final"]["pooled"]["federated"]["minus_reference_meta"]["random"]
    assert f"{fed['estimate']:.3f} ({fed['ci_low']:.3f} to {fed['ci_high']:.3f})" in md
    primary = report["final"]["pooled"]["federated"]["minus_reference_mean"]
    assert f"{primary['estimate']:.3f} ({primary['ci_low']:.3f} to {primary['ci_high']:.3f})" in md
    assert f"site-0 {primary['sites'][0]['estimate']:+.3f}" in md  # the per-site values behind it
    assert "Federated AUC: better than the reference" in md
    assert "Detectable" not in md and "| Federated last-layer fine-tuning ⚠" not in md
    assert "no segmented lesion: 8" in md
    html_text = paths["html"].read_text(encoding="utf-8")
    assert 'src="pooled_roc.png"' in html_text and "Federated − local-only" in html_text
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["final"]["pooled"]["federated"]["pooled_auc"] > 0.7


def test_old_report_without_new_keys_renders_with_na(tmp_path):
    old_pooled = {"n_sites": 1, "n": 20, "confusion": {"tp": 8, "fp": 2, "tn": 8, "fn": 2}, "accuracy": 0.8,
                  "sensitivity": 0.8, "specificity": 0.8, "auc": 0.81}
    site = {"n": 20, "auc": 0.81, "tp": 8, "fp": 2, "tn": 8, "fn": 2, "withheld": 0, "threshold": 0.5}
    report = {"run": {"sites": ["a"]}, "rounds": [{"round": 1, "evaluate": {"pooled": {"n": 20, "auc": 0.8}}}],
              "final": {"sites": [{"site": "a", "reference": site, "local": site, "federated": site}],
                        "pooled": {m: old_pooled for m in ("reference", "local", "federated")}}}
    paths = write_report(report, tmp_path)
    md = markdown(report)
    assert "| Before fine-tuning, site threshold | n/a |" in md
    assert "0.810" in md  # the old averaged figure, now in the "mean of site AUCs" column
    assert "not available" in md and "pooled_roc" not in paths and paths["html"].exists()


def test_report_marks_an_arm_with_zero_sensitivity_at_its_threshold(tmp_path):
    sites, _ = _sites(seed=2, k=3)
    fed = sites[1][P.MODEL_FEDERATED]
    fed["tp"], fed["fn"] = 0, fed["tp"] + fed["fn"]  # calls every case non-neoplastic at this site
    fed["sensitivity"], fed["specificity"] = 0.0, 1.0
    pooled = {m: pooled_metrics(sites, m) for m in P.FINAL_ARMS}
    assert pooled[P.MODEL_FEDERATED]["zero_operating_point"] == [{"site": "site-1", "zero": ["sensitivity"]}]
    assert pooled[P.MODEL_LOCAL]["zero_operating_point"] == []
    report = {"run": {"sites": [s["site"] for s in sites]}, "rounds": [],
              "final": {"sites": sites, "pooled": pooled}}
    md = markdown(report, with_figures=False)
    assert "| Federated last-layer fine-tuning ⚠ |" in md and "| Local-only last-layer fine-tuning |" in md
    assert "⚠ Federated last-layer fine-tuning: site-1: sensitivity 0 at its threshold" in md


def test_report_says_what_each_site_did_with_the_federated_bundle():
    sites, _ = _sites(seed=3, k=2)
    sites[0]["adoption"], sites[1]["adoption"] = P.ADOPTION_ACTIVATED, P.ADOPTION_CLEARLY_WORSE
    report = {"run": {"sites": ["site-0", "site-1"]}, "rounds": [],
              "final": {"sites": sites, "pooled": {m: pooled_metrics(sites, m) for m in P.FINAL_ARMS}}}
    md = markdown(report, with_figures=False)
    assert "site-0: activated (now the site's model) (`activated`)" in md
    assert "site-1: kept, not activated: clearly worse than the site's current model (`kept-clearly-worse`)" in md
