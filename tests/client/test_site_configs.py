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


def test_written_site_config_reads_back_equal_whatever_the_paths_hold(tmp_path):
    """``write_site_config`` writes TOML with ``tomli_w``: quotes, backslashes, non-ASCII and a
    newline in a path survive the round trip (the hand-written writer escaped only quotes and \\)."""
    from client.site_config import SiteConfig, write_site_config

    odd = tmp_path / 'Zürich "a"\\b\tc\nd'
    cfg = SiteConfig(name="site-a", data_dir=odd / "data", state_dir=odd / "state",
                     public_key=odd / "k.pub", device="cpu", fine_tune_fraction=0.25, learning_rate=3e-4,
                     proximal_mu=0.01, early_stopping=True)
    path = write_site_config(cfg, tmp_path / "a.toml")
    assert load_site_config(path) == cfg
