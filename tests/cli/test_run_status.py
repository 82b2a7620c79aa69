"""`ichfed federate status STATE_DIR`: how a run ended, from the events the ServerApp writes
(issue 22 item 2). The event files are written here with the project's own EventLog, in the
per-run layout (``latest_run`` + ``runs/<id>/events.jsonl``) and the older flat one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ichfed.cli import main
from server.run_status import locate_run, run_status
from shared.plumbing.progress import EventLog


def _run(state: Path, run_id: str, *events: tuple[str, dict], latest: bool = True) -> Path:
    folder = state / "runs" / run_id
    log = EventLog(folder / "events.jsonl")
    for name, fields in events:
        log.write(name, **fields)
    if latest:
        (state / "latest_run").write_text(f"runs/{run_id}\n", encoding="utf-8")
    return folder


STARTED = ("run_started", {"total_rounds": 3, "first_round": 1, "run_id": "r1"})
ROUND_1 = [("round_started", {"round": 1, "expected": 2}),
           ("train_replies", {"round": 1, "expected": 2, "answered": 2, "refused": 1, "missing": 0}),
           ("round_finished", {"round": 1})]


def test_finished_failed_running_have_their_exit_codes(tmp_path, capsys):
    state = tmp_path / "server"
    folder = _run(state, "r1", STARTED, *ROUND_1, ("run_finished", {"report": "/x/report.md", "wall_s": 3}))
    assert main(["federate", "status", str(state)]) == 0
    out = capsys.readouterr().out
    assert "status    finished" in out and "1 of 3 finished" in out and "/x/report.md" in out
    assert "round 1: 2/2 answered, 1 refused, 0 missing" in out

    _run(state, "r2", STARTED, *ROUND_1, ("run_failed", {"reason": "only 1 usable site, 2 required"}))
    assert main(["federate", "status", str(state)]) == 1  # latest_run now names r2
    assert "FAILED: only 1 usable site, 2 required" in capsys.readouterr().out
    assert main(["federate", "status", str(state), "--run", "r1"]) == 0  # an earlier run, by id
    capsys.readouterr()

    _run(state, "r3", STARTED, *ROUND_1)
    assert main(["federate", "status", str(state), "--json"]) == 3
    status = json.loads(capsys.readouterr().out)
    assert status["outcome"] == "running" and status["exit_code"] == 3 and status["rounds_finished"] == 1
    assert status["last_event"]["event"] == "round_finished" and status["last_event_age_s"] >= 0
    assert run_status(folder).outcome == "finished"


def test_a_failure_after_a_resume_is_the_runs_outcome(tmp_path):
    """Older flat layout: events of several runs in one file; the last run_started starts this run."""
    state = tmp_path / "server"
    log = EventLog(state / "events.jsonl")
    log.write(*STARTED[:1], **STARTED[1])
    log.write("run_failed", reason="interrupted")
    log.write("run_started", total_rounds=3, first_round=2)
    log.write("round_finished", round=2)
    log.write("run_finished", report="r.md")
    st = run_status(locate_run(state))
    assert st.outcome == "finished" and st.rounds_finished == 2 and st.exit_code == 0


@pytest.mark.parametrize("setup, message", [
    (lambda s: None, "not a folder"),
    (lambda s: s.mkdir(), "no latest_run and no events.jsonl"),
    (lambda s: (s.mkdir(), (s / "latest_run").write_text("runs/gone", encoding="utf-8")), "not a run folder"),
])
def test_bad_state_dir_is_one_line_exit_2(tmp_path, capsys, setup, message):
    state = tmp_path / "server"
    setup(state)
    assert main(["federate", "status", str(state)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_help_names_the_exit_codes_and_how_to_stop(capsys):
    assert main(["federate", "status", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "0 the run finished, 1 it failed" in text and "3 it is still running" in text
    assert "flwr stop RUN_ID" in text
