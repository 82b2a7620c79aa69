"""The logging setup and the run's event log: console vs file, tallies, events.jsonl, the round figures."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from shared.plumbing import logs, progress


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for h in list(root.handlers):
        if getattr(h, logs._MARK, False):
            root.removeHandler(h)
            h.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_console_shows_own_warnings_file_keeps_everything(tmp_path, capsys, restore_root):
    path = logs.setup(tmp_path, verbose=False)
    assert capsys.readouterr().err.strip() == ""  # not a terminal: the CLI names the file at the end
    logging.getLogger("server.strategy").info("round 1 table")
    logging.getLogger("server.strategy").warning("update rejected")
    logging.getLogger("alembic.runtime.plugins").info("setup plugin x")
    logging.getLogger("ray").warning("library warning")
    logging.getLogger("flwr").info("[ROUND 1/2]")
    import warnings

    warnings.warn("a library's FutureWarning", FutureWarning)
    err = capsys.readouterr().err
    assert "update rejected" in err
    for hidden in ("round 1 table", "setup plugin", "library warning", "[ROUND 1/2]", "FutureWarning"):
        assert hidden not in err
    text = path.read_text(encoding="utf-8")
    for kept in ("round 1 table", "update rejected", "library warning", "[ROUND 1/2]", "FutureWarning"):
        assert kept in text
    assert "setup plugin" not in text  # alembic's set-up chatter is only kept with --debug
    assert text.count("[ROUND 1/2]") == 1


def test_verbose_brings_info_back_and_flower_prints_once(tmp_path, capsys, restore_root):
    import flwr.supercore.logger  # noqa: F401 - installs Flower's own console handler

    logs.setup(tmp_path, verbose=True)
    logs.quiet_flower()
    capsys.readouterr()
    logging.getLogger("flwr").info("configure_train: Sampled 3 nodes")
    logging.getLogger("client.app").info("site a: trained")
    err = capsys.readouterr().err
    assert err.count("configure_train: Sampled 3 nodes") == 1
    assert "site a: trained" in err


def test_tally_counts_cases_and_summarises_once(tmp_path, capsys, restore_root):
    logs.setup(tmp_path)
    capsys.readouterr()
    lg = logging.getLogger("shared.imaging.crop")
    for i in range(10):
        logs.tally(lg, "lesion reaches beyond the crop", hit=i % 3 == 0)
    counts = logs.flush_tallies()
    assert counts == {"lesion reaches beyond the crop": (4, 10)}
    err = capsys.readouterr().err
    assert err.count("lesion reaches beyond the crop") == 1
    assert "lesion reaches beyond the crop: 4 of 10 cases" in err
    assert logs.flush_tallies() == {}  # reset


def test_site_file_collects_records_and_summary(tmp_path, restore_root):
    logs.setup_worker()
    lg = logging.getLogger("client.app")
    with logs.site_file(tmp_path / "state", "site-a") as path:
        lg.info("site site-a: trained")
        logs.tally(logging.getLogger("shared.imaging.crop"), "lesion beyond", True)
    lg.info("after the site: not in its file")
    text = path.read_text(encoding="utf-8")
    assert "site site-a: trained" in text and "site site-a: lesion beyond: 1 of 1 cases" in text
    assert "after the site" not in text


def test_event_log_lines_are_whole_under_threads(tmp_path):
    ev = progress.EventLog(tmp_path / "events.jsonl")

    def writer(k):
        for i in range(50):
            ev.write("tick", writer=k, i=i, payload="x" * 500, bad=float("nan"))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "events.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 200
    records = [json.loads(line) for line in lines]
    assert {r["bad"] for r in records} == {None}  # NaN is not JSON: written as null
    assert sorted((r["writer"], r["i"]) for r in records) == [(k, i) for k in range(4) for i in range(50)]


def _record(r, losses, norms, aucs, status=None):
    status = status or ["accepted"] * len(losses)
    train = [{"site": f"s{i}", "node_id": i, "status": st, "train_loss": lo, "update_norm": no}
             for i, (lo, no, st) in enumerate(zip(losses, norms, status))]
    evaluate = [{"site": f"s{i}", "node_id": i, "status": "ok", "global": {"auc": a}} for i, a in enumerate(aucs)]
    return {"round": r, "train": {"sites": train, "aggregated": {"train-loss": sum(losses) / len(losses)}},
            "evaluate": {"sites": evaluate, "pooled": {"pooled_auc": 0.7, "mean_site_auc": sum(aucs) / len(aucs)}}}


def test_round_metrics_and_run_progress_events(tmp_path):
    rec = _record(1, [0.5, 0.7, 0.9], [1.0, 3.0, 2.0], [0.6, 0.8, 0.7], status=["accepted", "accepted", "rejected"])
    from server import run_progress
    from server.records import RoundRecord

    record = RoundRecord.from_dict(rec)
    assert RoundRecord.from_dict(record.to_dict()).to_dict() == record.to_dict()  # reads back what it writes
    m = run_progress.round_metrics(record)
    assert m["train"] == {"expected": 3, "answered": 3, "refused": 1, "missing": 0}
    assert m["update_norm_mean"] == pytest.approx(2.0) and m["update_norm_max"] == 3.0
    assert m["head_bytes_received"] == 2 * run_progress.head_payload_bytes() == 2 * 4 * (2 * 512 + 2)
    assert m["global_mean_site_auc"] == pytest.approx(0.7)
    run = run_progress.RunProgress(tmp_path, 2)
    run.start(first_round=1, run_id="42")
    run.round_started(1, 3)
    run.stage_replies(1, "train", record.train)
    run.round_finished(record)
    run.close(report="r.md")
    events = progress.read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events] == ["run_started", "round_started", "train_replies", "round_finished",
                                            "run_finished"]
    assert events[0]["run_id"] == "42" and events[3]["round"] == 1 and events[3]["train"]["refused"] == 1
    assert events[2]["sites"][2] == {"site": "s2", "node_id": 2, "status": "rejected"}  # name beside node


def test_rounds_figure_in_report(tmp_path):
    from server.report import write_report

    report = {"run": {"num_rounds": 2, "sites": ["s0", "s1", "s2"]},
              "rounds": [_record(1, [0.7, 0.7, 0.7], [1, 1, 1], [0.6, 0.6, 0.6]),
                         _record(2, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.7, 0.7, 0.7])],
              "final": {"sites": [], "pooled": {}}}
    paths = write_report(report, tmp_path)
    assert paths["rounds_plot"].stat().st_size > 1000
    assert 'src="rounds.png"' in paths["html"].read_text(encoding="utf-8")


def test_site_mod_records_each_message_once_even_when_wired_twice(tmp_path):
    import types

    state = tmp_path / "state"
    mod = progress.site_mod(lambda context: (state, "site-a"))
    # The mod reads only the message type and whether the reply is an error.
    msg = types.SimpleNamespace(metadata=types.SimpleNamespace(message_type="train"))
    reply = types.SimpleNamespace(has_error=lambda: False)

    def handler(message, context):
        logging.getLogger("client.session").info("site site-a: handled")
        return reply

    assert mod(msg, None, lambda m, c: mod(m, c, handler)) is reply
    events = progress.read_events(state / "events.jsonl")
    assert [e["event"] for e in events] == ["stage_started", "stage_finished"]
    assert events[1]["stage"] == "train" and events[1]["reply"] == "ok"
    assert (state / "site.log").read_text(encoding="utf-8").count("site site-a: handled") == 1
