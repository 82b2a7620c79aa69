"""Reports that cannot be over-read on tiny sites (issue 22 item 6): too few cases are said, not
computed; suppressed values read "withheld", never 0; an empty plot says why; the run report's
"sites" column counts the sites its AUC used; the log explains the bundle's threshold."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from shared.evaluation.metrics import best_threshold, classification_metrics
from shared.federation import protocol as P


def _bootstrap_report(n_test: int) -> dict:
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * (n_test // 2))
    p = np.clip(y * 0.6 + rng.uniform(0, 0.4, len(y)), 0, 1)
    dice = {"mean": 0.9, "sd": 0.01, "median": 0.9, "min": 0.89, "max": 0.91, "n": n_test}
    return {"profile": "ci", "seed": 0, "threshold": {"p": 0.581, "log_p": -0.54}, "cohort": {"split": {}},
            "test": {"classification": classification_metrics(y, p, 0.5, n_boot=200), "n_no_lesion": 0,
                     "dice": {"ich": dice, "phe": dice}},
            "timings": {"total_s": 1.0}}


def test_bootstrap_report_shows_too_few_cases_not_a_perfect_auc():
    from server.bootstrap_report import render_report

    small = render_report(_bootstrap_report(2))
    assert "too few cases (n = 2)" in small and "1.00 (1.00" not in small
    assert "Figures on fewer than 10 test cases are not shown" in small
    table = [line for line in small.splitlines() if line.startswith("| Test set")][0]
    assert table.count("too few cases (n = 2)") == 4  # AUC, accuracy, sensitivity, specificity
    large = render_report(_bootstrap_report(48))
    assert "too few cases" not in large and "| Test set | 48 |" in large


def test_the_log_explains_the_bundle_threshold(caplog):
    from server.bootstrap_calibration import reference_threshold

    y, p = [0, 0, 1, 1, 0, 1], [0.1, 0.3, 0.55, 0.9, 0.45, 0.7]
    observed = best_threshold(y, p)
    with caplog.at_level(logging.INFO, logger="server.bootstrap_calibration"):
        t = reference_threshold(y, p, observed)
    assert t.p == pytest.approx((0.55 + 0.45) / 2) and observed.p == pytest.approx(0.55)
    msg = caplog.records[-1].getMessage()
    assert f"bundle threshold p={t.p:.4f}" in msg and f"p={observed.p:.4f} is the same cut on the observed score" in msg


def _site(name: str, metrics: dict, reasons=()):
    from server.table1 import parse_reply

    return parse_reply(name, {f"table1.{k}": v for k, v in metrics.items()},
                       {f"table1.{k}": P.REASON_TOO_FEW for k in reasons}, {})


def _table():
    from server.table1 import build_table1

    a = _site("a", {"n": 20, "n-unusable": 0, "n-from-masks": 20, "non-neoplastic.n": 17, "non-neoplastic.n-no-lesion": 0,
                    "non-neoplastic.lesions-1": 17, "non-neoplastic.lesions-2": 0, "non-neoplastic.lesions-3plus": 0},
              reasons=["neoplastic.n"])  # 3 neoplastic: below 5, the class says nothing more
    b = _site("b", {"n": 12, "n-unusable": 0, "n-from-masks": 12, "neoplastic.n": 12, "neoplastic.n-no-lesion": 0,
                    "neoplastic.lesions-1": 12, "neoplastic.lesions-2": 0, "neoplastic.lesions-3plus": 0,
                    "non-neoplastic.n": 0})  # no non-neoplastic case at all: complete, not withheld
    return build_table1([a, b], {"bundle_hash": "0" * 64})


def test_pooled_table1_says_withheld_never_zero():
    from server.table1 import rows

    cells = dict(rows(_table()))
    assert cells["neoplastic, n (prevalence)"] == ["withheld", "12 (100%)", "≥ 12 (withheld at 1 of 2 sites)"]
    # b sent 0 cases without a lesion, a withheld its count: the pooled 0 would be a lie.
    assert cells["neoplastic: no lesion segmented"] == ["withheld", "0", "withheld at 1 of 2 sites"]
    # b has no non-neoplastic case, so its silence about them is a 0, and the pool is complete.
    assert cells["non-neoplastic: ICH lesions = 1"] == ["17", "withheld", "17"]
    assert cells["cases"] == ["20", "12", "32"]


def _captured_figure(monkeypatch, draw):
    import server.report_arms as arms

    figures = []
    monkeypatch.setattr(arms, "_save", lambda fig, path: figures.append(fig))
    draw()
    return figures[0]


def test_an_empty_volume_panel_says_why(monkeypatch, tmp_path):
    from server.table1 import plot_volumes

    fig = _captured_figure(monkeypatch, lambda: plot_volumes(_table(), tmp_path / "v.png"))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert len(texts) == 4 and all(t.startswith("withheld at every site") for t in texts)  # no site sent a histogram
    assert any("each volume bin held fewer neoplastic cases" in t for t in texts)
    from server.table1 import _why_empty

    assert _why_empty({"sites": [_site("c", {"n": 5, "non-neoplastic.n": 0})]}, "non-neoplastic") == \
        "no non-neoplastic cases at any site"


def test_rounds_plot_legend_has_no_entry_without_points(monkeypatch, tmp_path):
    from server.report import plot_rounds

    record = {"round": 1, "train": {"sites": [{"site": "a", "status": "accepted", "update_norm": 0.5}]},
              "evaluate": {"sites": [{"site": "a", "status": "ok", P.MODEL_GLOBAL: {"withheld": 1}}],
                           "pooled": {"pooled_auc": None, "mean_site_auc": None,
                                      "reasons": {"pooled_auc": "no site sent score histograms"}}}}
    fig = _captured_figure(monkeypatch, lambda: plot_rounds({"rounds": [record, {**record, "round": 2}]},
                                                            tmp_path / "r.png"))
    auc_axis = fig.axes[0]
    labels = [t.get_text() for t in auc_axis.get_legend().get_texts()]
    assert "pooled AUC (histograms): none (no site sent score histograms)" in labels
    assert all(len(line.get_xdata()) == 0 for line in auc_axis.get_lines() if "none (" in line.get_label())
    assert any(len(line.get_xdata()) == 2 for ax in fig.axes for line in ax.get_lines())  # the norms have points


def test_arms_table_counts_the_sites_its_auc_used():
    from server.report_arms import arms_table_markdown

    fed = {"n_sites": 2, "n": 40, "hist_sites": 1, "pooled_n_pos": 8, "pooled_n_neg": 12, "pooled_auc": 0.8,
           "sensitivity": 0.7, "specificity": 0.6}
    table = arms_table_markdown({"final": {"pooled": {P.MODEL_FEDERATED: fed}}})
    row = next(line for line in table.splitlines() if line.startswith("| Federated"))
    assert row.startswith("| Federated last-layer fine-tuning | 1 | 20 | 0.800 |")
    assert "the AUC columns use 1 site(s) (20 cases" in table and "pool 2 site(s) (40 cases)" in table
