"""`ichfed simulate --repeats K`: headline figures of K runs summarised as mean ± SD."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.federation import protocol as P
from simulations.repeats import headline, summarise, summary_markdown

REPO = Path(__file__).resolve().parents[2]


def _report(auc: float, diff: float) -> dict:
    meta = lambda e: {"fixed": {"estimate": e, "se": 0.05, "ci_low": e - 0.1, "ci_high": e + 0.1},  # noqa: E731
                      "random": {"estimate": e, "se": 0.06, "ci_low": e - 0.12, "ci_high": e + 0.12}}
    pooled = {arm: {"pooled_auc": auc, "auc_meta": meta(auc), "mean_site_auc": auc, "sensitivity": 0.7,
                    "specificity": None, "itt": {"sensitivity": 0.6}} for arm in P.FINAL_ARMS}
    pooled[P.MODEL_FEDERATED]["minus_reference_meta"] = meta(diff)
    pooled[P.MODEL_FEDERATED]["minus_reference_mean"] = {"estimate": diff, "ci_low": diff - 0.1, "ci_high": None}
    return {"final": {"pooled": pooled}}


def test_summary_is_mean_and_sd_of_every_headline_figure():
    reports = [_report(0.70, 0.02), _report(0.74, 0.06), _report(0.78, 0.04)]
    h = headline(reports[0])
    assert h[P.MODEL_REFERENCE_SITE]["pooled AUC"] == 0.70 and "specificity" not in h[P.MODEL_LOCAL]
    assert h[P.MODEL_FEDERATED]["AUC − reference (random)"] == 0.02
    s = summarise(reports, [0, 1, 2])
    fed = s["arms"][P.MODEL_FEDERATED]
    assert fed["pooled AUC"]["mean"] == pytest.approx(0.74) and fed["pooled AUC"]["sd"] == pytest.approx(0.04)
    assert fed["AUC − reference (random)"]["values"] == [0.02, 0.06, 0.04]
    assert fed["AUC fixed CI low"]["mean"] == pytest.approx(0.64)
    assert fed["AUC − reference (mean of sites)"]["values"] == [0.02, 0.06, 0.04]
    assert "AUC − reference mean CI high" not in fed  # one site: no interval
    assert "specificity" not in fed  # a figure no run produced is not invented
    md = summary_markdown(s)
    assert "| federated | pooled AUC | 0.740 ± 0.040 | 3 |" in md and "split seeds [0, 1, 2]" in md
    single = summarise(reports[:1], [5])
    assert single["arms"][P.MODEL_LOCAL]["pooled AUC"]["sd"] is None


def test_repeats_below_one_is_a_one_line_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "ichfed", "simulate", "--rounds", "1", "--bundle", str(tmp_path),
                        "--pubkey", str(tmp_path), "--out", str(tmp_path / "o"), "--repeats", "0"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert r.returncode == 2 and r.stderr.strip() == "error: --repeats: must be at least 1, got 0"
