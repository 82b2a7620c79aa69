"""Issue 22, the coordinator's side of a run: each run in its own folder, a failed run that says so
(``run_failed`` and the report's first lines), resume without overwriting, a too-small site refused
in the first message, and sites named beside their node. The run is the real ``run_federation``
on the real tiny bundle; the sites answer in-process (``tests.server.sites``)."""

from __future__ import annotations

import json

import pytest

from client.privacy import build_reply
from server.distribution import distribute_bundle
from server.federation import run_federation
from server.run_folder import LATEST, RUNS, latest_run
from server.settings import ServerSettings
from shared.federation import protocol as P
from shared.plumbing.errors import IchfedError
from shared.plumbing.progress import read_events
from tests.server.sites import Sites

NAMES = {11: "site-a", 12: "site-b", 13: "site-c"}


def _settings(tiny_bundle, state, **kw):
    kw = {"min_sites": 2, "wait_for_sites_s": 1.0, "round_timeout_s": 5.0, "cross_fit_folds": 2, **kw}
    return ServerSettings(bundle_path=tiny_bundle.path, public_key=tiny_bundle.public_key, state_dir=state, **kw)


def _events(folder):
    return [e["event"] for e in read_events(folder / "events.jsonl")]


def test_a_run_writes_its_own_folder_and_a_resume_never_overwrites_it(tiny_bundle, tmp_path, flwr_task):
    state = tmp_path / "server"
    grid = Sites(NAMES, thresholds={11: 0.4, 12: 0.42, 13: 0.45})
    report = run_federation(grid, _settings(tiny_bundle, state, num_rounds=1), run_id=1234)
    first = state / RUNS / "1234"
    assert latest_run(state) == first and (state / LATEST).read_text(encoding="utf-8") == "1234\n"
    assert _events(first) == ["run_started", "bundle_distributed", "round_started", "train_replies",
                              "evaluate_replies", "round_finished", "final_evaluation", "run_finished"]
    data = json.loads((first / "report.json").read_text(encoding="utf-8"))
    assert data["run"]["status"] == "finished" and data["run"]["run_id"] == "1234" and report.run.status == "finished"
    assert data["run"]["site_nodes"] == {"site-a": 11, "site-b": 12, "site-c": 13}
    md = (first / "report.md").read_text(encoding="utf-8")
    assert "site-a (node 11), site-b (node 12), site-c (node 13)" in md and "This run failed" not in md
    # the checkpoints stay where a resume finds them; the rounds ran in Flower's start() with its hooks
    assert (state / "checkpoints" / "round-0001.safetensors").is_file()
    events = read_events(first / "events.jsonl")
    assert sorted(events[3]["sites"], key=lambda e: e["node_id"]) == [
        {"site": n, "node_id": k, "status": "accepted"} for k, n in NAMES.items()]
    before = (first / "report.json").read_bytes()

    # the same state folder, resumed for one more round under a new Flower run
    again = run_federation(grid, _settings(tiny_bundle, state, num_rounds=2, resume=True), run_id=5678)
    assert again.run.resumed_from_round == 1 and [r.round for r in again.rounds] == [1, 2]
    assert again.rounds[0].to_dict() == data["rounds"][0]  # the first run's round, read back from its checkpoint
    assert latest_run(state) == state / RUNS / "5678" and (first / "report.json").read_bytes() == before
    assert _events(state / RUNS / "5678")[0] == "run_started"

    # a rerun under a run ID already used gets a fresh folder too (a direct call with none gets the time)
    with pytest.raises(IchfedError):
        run_federation(grid, _settings(tiny_bundle, state, num_rounds=2), run_id=1234)  # checkpoints, no resume
    assert latest_run(state) == state / RUNS / "1234-2" and (first / "report.json").read_bytes() == before


def test_a_failed_run_says_so_in_its_events_and_at_the_top_of_its_report(tiny_bundle, tmp_path, flwr_task):
    """Reproduction: events.jsonl stopped at train_replies with no failure event, and nothing said the
    run had failed. Here a round cannot go on (every update is rejected)."""
    state = tmp_path / "server"
    grid = Sites(NAMES)
    bad = {P.NUM_EXAMPLES: 0}  # not a case count: every update is rejected
    for node in NAMES:
        grid.answer[node] = (lambda m, c: _with_metrics(c, bad) if m.metadata.message_type == P.TRAIN else c)
    with pytest.raises(IchfedError, match="round 1: only 0 of 3 site updates were usable"):
        run_federation(grid, _settings(tiny_bundle, state, num_rounds=2), run_id=99)
    folder = latest_run(state)
    events = read_events(folder / "events.jsonl")
    assert [e["event"] for e in events][-3:] == ["round_started", "train_replies", "run_failed"]
    assert "only 0 of 3 site updates were usable" in events[-1]["reason"]
    md = (folder / "report.md").read_text(encoding="utf-8").splitlines()
    assert md[2].startswith("> **This run failed**: round 1: only 0 of 3")
    data = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert data["run"]["status"] == "failed" and data["final"] is None
    assert [r["status"] for r in data["rounds"][0]["train"]["sites"]] == ["rejected"] * 3  # what was done is kept


def _with_metrics(content, metrics):
    from flwr.app import MetricRecord

    content[P.METRICS] = MetricRecord(metrics)
    return content


def test_a_site_too_small_for_its_split_is_refused_before_the_bundle_is_sent(tiny_bundle, tmp_path, flwr_task,
                                                                             caplog):
    """Reproduction: two 12-case sites were sent the 250 MB bundle and preprocessed every case before
    refusing (fine-tune fraction 0.2 x 12 = 2-3 cases, below 5)."""
    from shared.bundle import load_bundle

    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    grid = Sites(NAMES)

    def need(planned):  # asks for the bundle on the offer, holds it once delivered
        return lambda m, c: c if m.content[P.CONFIG][P.CFG_DELIVER] else build_reply(
            c[P.INFO][P.INFO_SITE], P.STATUS_NEED, metrics={P.N_FINE_TUNE: planned})

    grid.answer[11] = need(2)  # a site (or an older client) that would go on with 2 cases
    grid.answer[12] = need(8)
    # the site's own check (client/session.py): it refuses, and says why
    grid.answer[13] = lambda m, c: build_reply("site-c", P.STATUS_REFUSED, reason=P.REASON_TOO_FEW)
    settings = _settings(tiny_bundle, tmp_path / "s", num_rounds=1)
    with pytest.raises(IchfedError, match="only 1 site"):
        distribute_bundle(grid, bundle, settings)
    assert [n for kind, n in grid.sent if kind == P.QUERY_BUNDLE] == [11, 12, 13, 12]  # the bundle went to 12 only
    grid.sent.clear()
    text = caplog.text
    assert "site-a (node 11)" in text and "plans 2 fine-tune cases" in text and "raise fine_tune_fraction" in text
    assert "site-c (node 13) refused: fewer-cases-than-minimum; raise fine_tune_fraction" in text
    ready, summary = distribute_bundle(grid, bundle, _settings(tiny_bundle, tmp_path / "s", min_sites=1))
    assert ready == {12: "site-b"} and summary.planned_fine_tune == {"site-b": 8}
    assert summary.to_dict()["refused"] == ["site-a (node 11)", "site-c (node 13)"]
