"""The ServerApp's settings from a Flower run config (as `flwr run --run-config` delivers them)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server.settings import settings_from_run_config
from shared.plumbing.errors import IchfedError

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_run_config_defaults_need_only_the_paths():
    defaults = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    with pytest.raises(IchfedError, match="'bundle-path' is required"):
        settings_from_run_config(defaults)
    s = settings_from_run_config({**defaults, "bundle-path": "/b", "public-key": "/k.pub", "state-dir": "/s"})
    assert (s.num_rounds, s.min_sites, s.resume, s.signing_key) == (defaults["num-server-rounds"], defaults["min-sites"],
                                                                     False, None)
    assert s.bundle_path == Path("/b") and s.reports == Path("/s/report")


def test_run_config_values_are_checked():
    base = {"bundle-path": "/b", "public-key": "/k", "state-dir": "/s"}
    s = settings_from_run_config({**base, "resume": "true", "num-server-rounds": 7, "signing-key": "/k.key"})
    assert s.resume is True and s.num_rounds == 7 and s.signing_key == Path("/k.key")
    with pytest.raises(IchfedError, match="'num-server-rounds' must be int"):
        settings_from_run_config({**base, "num-server-rounds": "many"})
    with pytest.raises(IchfedError, match="at least 1"):
        settings_from_run_config({**base, "min-sites": 0})


def test_run_config_mode_selects_the_statistics_run():
    base = {"bundle-path": "/b", "public-key": "/k", "state-dir": "/s"}
    assert settings_from_run_config(base).mode == "federate"
    assert settings_from_run_config({**base, "mode": "stats"}).mode == "stats"
    with pytest.raises(IchfedError, match="'mode' must be 'federate' or 'stats'"):
        settings_from_run_config({**base, "mode": "table"})
