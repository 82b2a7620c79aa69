"""The ClientApp's per-process state: one site session per node, opened by Flower's lifespan hook,
replaced when the run or the site config changes, and an unreadable config reported, not kept."""

from __future__ import annotations

import os

import pytest
from flwr.app import Context, RecordDict

from client.app import SessionPool
from client.session import SiteSession
from client.site_config import SiteConfig, write_site_config
from shared.plumbing.errors import IchfedError


def _context(path, run_id=1, node_id=7):
    return Context(run_id=run_id, node_id=node_id, node_config={"site-config": str(path)}, state=RecordDict(),
                   run_config={})


def test_one_session_per_node_replaced_by_a_new_run_or_an_edited_config(tmp_path):
    path = write_site_config(SiteConfig(name="a", data_dir=tmp_path, state_dir=tmp_path / "s"), tmp_path / "a.toml")
    pool = SessionPool(lambda c: c.node_config["site-config"])
    pool.open(_context(path))
    first = pool.session(_context(path))
    assert isinstance(first, SiteSession) and first.config.name == "a"
    pool.close(_context(path))
    pool.open(_context(path))
    assert pool.session(_context(path)) is first  # the same run and config: bundles and features stay warm
    pool.open(_context(path, run_id=2))
    second = pool.session(_context(path, run_id=2))
    assert second is not first  # a new run starts from a fresh session
    write_site_config(SiteConfig(name="b", data_dir=tmp_path, state_dir=tmp_path / "s"), path)
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    pool.open(_context(path, run_id=2))
    assert pool.session(_context(path, run_id=2)).config.name == "b"
    pool.open(_context(path, node_id=8))  # another node has its own
    assert pool.session(_context(path, node_id=8)) is not pool.session(_context(path, run_id=2))
    assert len(pool._open) == 2


def test_an_unreadable_config_is_the_handlers_error_and_not_kept(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "../x"\ndata_dir = "d"\nstate_dir = "s"\n', encoding="utf-8")
    pool = SessionPool(lambda c: c.node_config["site-config"])
    pool.open(_context(bad))
    with pytest.raises(IchfedError, match="name"):
        pool.session(_context(bad))
    pool.close(_context(bad))
    assert not pool._open


def test_every_message_is_a_stage_in_the_sites_progress_events(tmp_path, flwr_task):
    """A SuperNode's ClientApp writes the site's events without any simulation wiring."""
    import json

    from flwr.app import ConfigRecord, Message

    from client.app import build_client_app
    from shared.federation import protocol as P

    path = write_site_config(SiteConfig(name="site-p", data_dir=tmp_path, state_dir=tmp_path / "s"), tmp_path / "p.toml")
    offer = RecordDict({P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: "a" * 64, P.CFG_DELIVER: False})})
    reply = build_client_app()(Message(content=offer, dst_node_id=7, message_type=P.QUERY_BUNDLE), _context(path))
    assert reply.content[P.INFO][P.INFO_STATUS] == P.STATUS_NEED
    events = [json.loads(line) for line in (tmp_path / "s" / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(e["event"], e["stage"]) for e in events] == [("stage_started", P.QUERY_BUNDLE),
                                                          ("stage_finished", P.QUERY_BUNDLE)]
    assert all(e["site"] == "site-p" for e in events)
