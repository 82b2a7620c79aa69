"""`ichfed stats` end to end with the real tiny bundle, on the in-process grid of
``tests/inprocess_grid.py`` (the same ServerApp, ClientApp and Flower serialisation as on Ray, which
``tests/simulations/test_ray_cluster.py`` runs).

Two sites with reference masks answer query.stats; a third has no masks and segments its cases
with the bundle's nnU-Net. The server writes Table 1 per site and pooled; every message a site
sent (its outgoing audit) passed the privacy allow-list and carries no per-case value.
"""

from __future__ import annotations

import json
import shutil

import pytest

from shared.federation import stats_protocol as S
from tests.inprocess_grid import simulation_in_process

pytestmark = pytest.mark.slow


def test_ichfed_stats_writes_table1_per_site_and_pooled(tiny_bundle, tmp_path, capsys):
    from ichfed.cli import main
    from simulations.cohort import write_cohort

    dirs = []
    for i, profile in enumerate(("community-hospital", "hamburg-like", "lowdose-mobile")):
        d = tmp_path / f"data-{i}"
        write_cohort(profile, 12 if i < 2 else 5, 300 + i, d, scale="ci")
        dirs.append(d)
    shutil.rmtree(dirs[2] / "masks")  # this site has no reference masks: the bundle segments its cases

    out = tmp_path / "run"
    with simulation_in_process() as grids:
        code = main(["stats", "--site-dirs", ",".join(map(str, dirs)), "--bundle", str(tiny_bundle.path),
                     "--pubkey", str(tiny_bundle.public_key), "--out", str(out)])
    assert code == 0 and len(grids) == 1
    printed = capsys.readouterr().out
    assert "all sites" in printed and "table1.html" in printed

    table = json.loads((out / "table1" / "table1.json").read_text(encoding="utf-8"))
    assert len(table["sites"]) == 3 and not table["run"]["refused"] and not table["run"]["missing"]
    by_name = {s["site"]: s for s in table["sites"]}
    counts = [by_name[n]["counts"] for n in sorted(by_name)]
    assert [c.get(S.N) for c in counts] == [12, 12, 5]
    assert [c.get(S.N_FROM_MASKS) for c in counts] == [12, 12, 0]
    assert table["pooled"]["counts"][S.N] == 29
    for name in ("table1.md", "table1.html", "table1_volumes.png"):
        assert (out / "table1" / name).stat().st_size > 200

    # What left each site: only the stats message, nothing per case.
    for i in range(3):
        sent = sorted((out / "sites" / f"site-{i + 1}" / "state" / "outgoing").glob("*-query.stats.json"))
        assert len(sent) == 1
        entry = json.loads(sent[0].read_text(encoding="utf-8"))
        keys = set(entry["content"]["metrics"]["items"])
        assert all(S.split_key(k) is not None for k in keys)
        assert "case" not in json.dumps(entry).lower().replace("cases", "")


def test_segmented_measurements_are_cached_at_the_site(tiny_bundle, tmp_path):
    """A second Table 1 of a site without masks reads what segmentation measured from its cache."""
    from client.site_config import SiteConfig
    from client.stats import site_table1
    from shared.bundle import load_bundle
    from simulations.cohort import write_cohort

    data = tmp_path / "data"
    write_cohort("community-hospital", 5, 7, data, scale="ci")
    shutil.rmtree(data / "masks")
    cfg = SiteConfig(name="s", data_dir=data, state_dir=tmp_path / "state")
    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    first = site_table1(cfg, bundle)
    cached = sorted((tmp_path / "state" / "table1-cache").glob("*.json"))
    assert len(cached) == 5
    entry = json.loads(cached[0].read_text(encoding="utf-8"))
    entry["ich_ml"] = 1234.0  # a planted value shows the second run reads the cache, not the model
    cached[0].write_text(json.dumps(entry), encoding="utf-8")
    second = site_table1(cfg, bundle)
    assert second.metrics[S.site_key(S.N)] == first.metrics[S.site_key(S.N)] == 5
    assert second.metrics != first.metrics or all(
        first.metrics.get(S.class_key(c, "hist-ich-ml")) is None for c in S.CLASSES)
