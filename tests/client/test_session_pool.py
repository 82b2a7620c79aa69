"""The ClientApp's per-process state: one site session per node, opened by Flower's lifespan hook,
replaced when the run or the site config changes, and an unreadable config reported, not kept."""

from __future__ import annotations

import os

import pytest
from flwr.app import Context, RecordDict

from client.app import SessionPool
from client.session import SiteSession
from client.site_config import SiteConfig, write_site_config
from shared.errors import IchfedError


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
