"""Checkpoints (atomic, versioned, verified) and the run report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.checkpoint import CheckpointStore
from server.pooling import pool_model
from server.report import paper_table_markdown, write_report
from shared.federation import protocol as P
from shared.models.head import Head, HeadSet
from shared.plumbing.errors import IchfedError


def _head(v, n_folds=0):
    return HeadSet.replicate(Head(np.full((2, 512), v, np.float32), np.full(2, v, np.float32)), n_folds)


def test_checkpoints_are_versioned_and_the_latest_is_verified(tmp_path):
    store = CheckpointStore(tmp_path)
    assert not store.exists() and store.latest() is None
    run = {"bundle_hash": "a" * 64}
    store.save(1, _head(1.0), run, [{"round": 1}])
    store.save(2, _head(2.0, n_folds=2), run, [{"round": 1}, {"round": 2}])
    ckpt = store.latest()
    assert ckpt.round == 2 and np.all(ckpt.heads.main.weight == 2.0) and len(ckpt.history) == 2
    assert ckpt.heads.n_folds == 2 and ckpt.heads.folds[1].allclose(ckpt.heads.main)
    assert (tmp_path / "checkpoints" / "round-0001.safetensors").is_file()  # earlier versions are kept
    assert not list((tmp_path / "checkpoints").glob("*.tmp*"))
    # a damaged weight file is detected, not silently loaded
    path = tmp_path / "checkpoints" / "round-0002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IchfedError, match="sha256"):
        store.latest()


def _metrics(n, auc, tp, fp, tn, fn, t=0.4):
    return {"n": n, "auc": auc, "accuracy": (tp + tn) / n, "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
            "threshold": t, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "withheld": 0,
            P.ROC_TPR: list(np.linspace(0, 1, len(P.ROC_FPR_GRID)) ** 0.5)}


def _report():
    sites = [
        {"site": "site-a", "status": "ok", "reference": _metrics(20, 0.6, 5, 4, 6, 5), "local": _metrics(20, 0.7, 7, 3, 7, 3),
         "federated": _metrics(20, 0.8, 8, 2, 8, 2), "reasons": {}},
        {"site": "site-b", "status": "ok", "reference": {"n": 3, "withheld": 1}, "local": {"n": 3, "withheld": 1},
         "federated": {"n": 3, "withheld": 1}, "reasons": {"federated.auc": P.REASON_TOO_FEW}},
    ]
    return {
        "run": {"bundle_hash": "b" * 64, "num_rounds": 2, "sites": ["site-a", "site-b"], "seed": 0},
        "rounds": [{"round": 1, "train": {"sites": [{"site": "site-a", "status": "accepted"}]},
                    "evaluate": {"sites": [{"site": "site-a", "status": "ok", "global": _metrics(20, 0.7, 7, 3, 7, 3)}],
                                 "pooled": {"n": 20, "auc": 0.7}}}],
        "final": {"sites": sites, "pooled": {m: pool_model(sites, m) for m in ("reference", "local", "federated")}},
        "final_bundle": None,
    }


def test_report_files_table_and_figures(tmp_path):
    report = _report()
    paths = write_report(report, tmp_path / "report")
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["run"]["num_rounds"] == 2
    for key in ("roc", "confusion"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 5000
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "Before fine-tuning" in md and "Local-only" in md and "Federated" in md
    assert "| Federated last-layer fine-tuning | site-a | 20 | 0.800 |" in md
    assert "withheld" in md and "site-b: federated.auc: fewer-cases-than-minimum" in md
    assert "<table>" in paths["html"].read_text(encoding="utf-8") and 'src="roc.png"' in paths["html"].read_text(encoding="utf-8")
    table = paper_table_markdown(report)
    # the pooled row of each model leaves out the withheld site; its AUC needs score histograms
    assert "| Federated last-layer fine-tuning | all sites | 20 | n/a |" in table


def test_federate_cli_status_and_report(tmp_path, capsys):
    from ichfed.cli import main

    state = tmp_path / "server"
    assert main(["federate", "status", str(state)]) == 2
    assert "not a folder" in capsys.readouterr().err
    # Status reads the run's events (tests/cli/test_run_status.py has the outcomes and layouts).
    from shared.plumbing.progress import EventLog

    EventLog(state / "events.jsonl").write("run_started", total_rounds=3, first_round=1)
    EventLog(state / "events.jsonl").write("round_finished", round=1)
    assert main(["federate", "status", str(state), "--json"]) == 3  # still running
    status = json.loads(capsys.readouterr().out)
    assert status["rounds_finished"] == 1 and status["total_rounds"] == 3 and status["outcome"] == "running"

    assert main(["federate", "report", str(state)]) == 2  # no report.json yet: one line, exit 2
    assert capsys.readouterr().err.startswith("error: ")
    (state / "report").mkdir()
    (state / "report" / "report.json").write_text(json.dumps(_report()), encoding="utf-8")
    assert main(["federate", "report", str(state)]) == 0
    assert "| Federated last-layer fine-tuning | site-a | 20 | 0.800 |" in capsys.readouterr().out
    assert (state / "report" / "roc.png").is_file() and (state / "report" / "report.html").is_file()
