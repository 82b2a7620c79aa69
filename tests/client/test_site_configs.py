"""The example site configs in site_configs/ stay valid."""

from pathlib import Path

import pytest

from client.site_config import load_site_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "site_configs").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_site_config_loads(path):
    cfg = load_site_config(path)
    assert cfg.name == path.stem
    assert cfg.data_dir.is_absolute() and cfg.state_dir.is_absolute() and cfg.public_key is not None
