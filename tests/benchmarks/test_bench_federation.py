"""benchmarks/bench_federation.py at tiny scale with the cached test bundle, so it cannot rot: the
production site sessions and Flower's aggregation run every arm, the oracles and the bootstrap
run, and the result file keeps every per-site, per-seed, per-replicate value, the load average
and the design check (the lead runs it at full scale on a quiet machine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = pytest.mark.slow


def test_tiny_pilot_runs_every_arm_with_the_site_code_and_keeps_every_value(tiny_bundle, ge_series, tmp_path):
    import bench_federation
    from federation_arms import ORACLES, SESSION_ARMS

    out = tmp_path / "federation_pilot.json"
    argv = ["--bundle", str(tiny_bundle.path), "--pubkey", str(tiny_bundle.public_key), "--sites", "2",
            "--cases", "24", "--unlabelled", "4", "--fine-tune", "8", "--replicates", "3", "--seeds", "1",
            "--rounds", "1", "--dev-cases", "30", "--boot", "30", "--scale", "ci", "--pilot",
            "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    assert bench_federation.main(argv) == 0
    r = json.loads(out.read_text(encoding="utf-8"))
    d = r["design"]
    assert d["simulated_sites"] == ["hamburg-like", "community-hospital"] and d["real_site"] == "oncology-referral-real"
    assert d["replicates"] == 3 and d["replicates_from"] == "pilot"
    arms = [a for a, _, _ in SESSION_ARMS]
    # every per-site, per-seed, per-replicate value
    for site in [*d["simulated_sites"], d["real_site"]]:
        rows = r["per_replicate"]["0"][site]
        for arm in arms:
            assert len(rows[arm]["auc"]) == 3 and len(rows[arm]["sensitivity"]) == 3, (site, arm)
            assert all(0.0 <= v <= 1.0 for v in rows[arm]["auc"])
        assert all(len(rows[o]["auc"]) == 3 for o in ORACLES if o != "development-scanner" or "real" not in site)
    # the reference at the site's threshold has the reference's AUC (only the threshold differs)
    ref = r["per_replicate"]["0"]["hamburg-like"]
    assert ref["reference"]["auc"] == ref["reference-site-threshold"]["auc"]
    # endpoints keep the per-site values behind them
    prim = r["endpoints"]["differences"]["federated-converged − reference"]
    assert set(prim["site_values"]) == {"hamburg-like", "community-hospital"} and prim["n_boot"] == 30
    mean_sites = sum(prim["site_values"].values()) / 2
    assert prim["estimate"] == pytest.approx(mean_sites)
    h = r["headroom"]
    assert set(h["sites"]) == {"hamburg-like", "community-hospital"}
    assert h["mean"] == pytest.approx(sum(v["oracle_minus_reference"] for v in h["sites"].values()) / 2)
    for v in [*h["sites"].values(), h]:
        gain = v.get("oracle_minus_reference", v.get("mean"))
        assert v["verdict"] == ("no headroom for a last layer" if gain <= 0.02 else "headroom")
    assert "federated-converged − reference" in r["real_site"]["differences"]
    # the load average and the design: what this run could detect, and the pilot's recommendation
    assert len(r["load_average"]["start"]) == 3 and len(r["load_average"]["end"]) == 3
    dc = r["design_check"]
    assert dc["detectable_difference_actual"] == pytest.approx(2.8015852 * dc["se"])
    assert dc["pilot"]["pilot_replicates"] == 3 and "replicates_needed" in dc["pilot"]
    assert "federated ≥ local-only" in {t["target"] for t in r["targets"]}
    assert any(t["target"].startswith("federated − reference ≥ +0.03") for t in r["targets"])
    md = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "Primary endpoint: mean over sites (equal weights)" in md and "Real-background site" in md
    # a later full run follows the pilot's design
    args = bench_federation.parse_args(["--bundle", "b", "--design", str(out)])
    needed = dc["pilot"]["replicates_needed"]
    assert bench_federation.choose_replicates(args) == ((max(needed, 10), f"pilot {out.name}") if needed
                                                         else (100, "default (no pilot design)"))
