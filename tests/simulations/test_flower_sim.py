"""The federation protocol end to end with the real tiny bundle: ``simulations.flower_sim.run`` (the
same ServerApp, ClientApp and wiring as ``ichfed simulate``) on the in-process grid of
``tests/inprocess_grid.py``: every message through Flower's serialisation to the real ClientApp
handlers, no Ray (``tests/simulations/test_ray_cluster.py`` is the Ray run). The cohorts come from
the session's pool and the sites start from the session's case cache (``tests/site_pool.py``).

One federation run (module fixture) of 4 sites for 2 rounds serves several checks:
- site 3 holds a single class and its split plans fewer fine-tune cases than the floor (5): it
  refuses the bundle offer (reason fewer-cases-than-minimum), the first message, so no bundle is
  sent to it and it never trains; the run goes on with the others;
- site 4 trusts another coordinator key, so it refuses the bundle and is left out;
- the aggregated head of each round equals the weighted mean of the site updates, with the weights
  the report gives (each site's fine-tune count, capped at max-site-share);
- every message a site sent (kept in its outgoing audit folder) passes the privacy inspection;
- the run is cross-fitted (5 fold heads, the default): each site's federated threshold comes from
  the out-of-fold scores of the aggregated fold heads, not from the main head's own scores.
A second test kills a running server (a process of its own) after its first checkpoint and resumes it.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shared.federation import protocol as P
from tests.inprocess_grid import simulation_in_process

pytestmark = pytest.mark.slow

PROFILES = ("community-hospital", "hamburg-like", "lowdose-mobile")
ROUNDS = 2


def _one_class_site(src: Path, dst: Path) -> Path:
    """A copy of site ``src`` keeping only its non-neoplastic cases."""
    import shutil

    shutil.copytree(src, dst)
    rows = list(csv.DictReader((dst / "cases.csv").open(encoding="utf-8")))
    keep = [r for r in rows if r["label"] in ("0", "non-neoplastic")]
    with (dst / "cases.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    assert len(keep) >= 4, "the one-class site needs a few cases"
    return dst


@pytest.fixture(scope="module")
def sites(cohorts, tmp_path_factory):
    root = tmp_path_factory.mktemp("fl_sites")
    dirs = [cohorts.get(profile, 12, 11 + i) for i, profile in enumerate(PROFILES[:2])]
    dirs.append(_one_class_site(cohorts.get(PROFILES[2], 12, 13), root / "cohort-2-negatives"))
    return dirs


@pytest.fixture(scope="module")
def other_key(tmp_path_factory):
    from shared.security.keys import generate_keypair

    _, pub = generate_keypair(tmp_path_factory.mktemp("other_coordinator"))
    return pub


def _state(out: Path, i: int) -> Path:
    return out / "sites" / f"site-{i}" / "state"


@pytest.fixture(scope="module")
def federation(tiny_bundle, sites, other_key, tmp_path_factory, case_cache):
    from simulations.flower_sim import run

    out = tmp_path_factory.mktemp("fl_run")
    for i in (1, 2):  # sites 3 and 4 refuse before preprocessing: they must start without a cache
        case_cache.seed(_state(out, i))
    t0 = time.perf_counter()
    with simulation_in_process() as grids:
        report = run(out, tiny_bundle.path, tiny_bundle.public_key, ROUNDS,
                     site_dirs=[*sites, sites[0]], local_epochs=5, learning_rate=1e-2, fine_tune_fraction=0.5,
                     min_cases_for_metrics=5, min_sites=2, signing_key=tiny_bundle.private_key, seed=0,
                     site_overrides={"3": {"public_key": other_key}})
    report["_wall_s"] = time.perf_counter() - t0
    assert len(grids) == 1 and len(grids[0].get_node_ids()) == 4
    for i in (1, 2):
        case_cache.keep(_state(out, i))
    return out, report


def _outgoing(out: Path, i: int) -> list[dict]:
    files = sorted((out / "sites" / f"site-{i}" / "state" / "outgoing").glob("*.json"),
                   key=lambda f: int(f.name.split("-")[0]))
    return [json.loads(f.read_text(encoding="utf-8")) for f in files]


def test_federation_runs_and_reports(federation, tiny_bundle):
    out, report = federation
    names = report["run"]["sites"]
    assert len(names) == 2 and not any(n.startswith(("site-3", "site-4")) for n in names)
    assert report["run"]["status"] == "finished"
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for rnd in report["rounds"]:
        assert sorted(s["site"] for s in rnd["train"]["sites"]) == sorted(names)
        assert all(s["status"] == "accepted" for s in rnd["train"]["sites"])
        assert rnd["evaluate"]["pooled"]["n_sites"] >= 2
    final = {s["site"]: s for s in report["final"]["sites"]}
    assert set(final) == set(names)
    for s in final.values():
        for model in P.FINAL_ARMS:
            # a held-out split under the floor does not even send its size (issue 21)
            assert s[model]["withheld"] == 1 or s[model]["n"] >= 5
    from server.run_folder import latest_run

    run_folder = latest_run(out / "server")  # the run's own folder; out/report is report-dir's copy
    assert run_folder.name == report["run"]["run_id"] and (run_folder / "report.json").is_file()
    events = [json.loads(line)["event"] for line in (run_folder / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert events[0] == "run_started" and events[-1] == "run_finished"
    md = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "Before fine-tuning" in md and "Local-only last-layer fine-tuning" in md and "Federated last-layer" in md
    assert "site threshold" in md
    assert (out / "report" / "roc.png").stat().st_size > 5000 and (out / "report" / "confusion.png").is_file()
    print(f"federation of 4 sites x {ROUNDS} rounds: {report['_wall_s']:.1f} s")


def test_site_under_the_floor_is_refused_in_the_first_message(federation):
    """Issue 22: a site whose split cannot give the minimum of fine-tune cases is left out before the
    bundle is sent, instead of after preprocessing every case."""
    out, report = federation
    label = next(r for r in report["distribution"]["refused"] if r.startswith("site-3"))
    assert report["distribution"]["reasons"][label] == P.REASON_TOO_FEW
    sent = _outgoing(out, 3)
    assert [m["message_type"] for m in sent] == ["query.bundle"]  # its only message: the offer
    info = sent[0]["content"]["info"]["items"]
    assert info[P.INFO_STATUS] == P.STATUS_REFUSED and info[P.INFO_REASON] == P.REASON_TOO_FEW
    assert not (out / "sites" / "site-3" / "state" / "bundles").exists()
    assert not (out / "sites" / "site-3" / "state" / "cache").exists()  # nothing was preprocessed


def test_site_with_the_wrong_key_refuses_the_bundle(federation, tiny_bundle):
    out, report = federation
    refused = [r for r in report["distribution"]["refused"] if r.startswith("site-4")]
    assert len(refused) == 1 and report["distribution"]["reasons"][refused[0]] == P.REASON_BUNDLE_VERIFICATION
    sent = _outgoing(out, 4)
    infos = [m["content"]["info"]["items"] for m in sent]
    assert infos[-1][P.INFO_STATUS] == P.STATUS_REFUSED
    assert infos[-1][P.INFO_REASON] == P.REASON_BUNDLE_VERIFICATION
    assert not any(m["message_type"] == "train" for m in sent)  # it never trained
    assert not (out / "sites" / "site-4" / "state" / "bundles" / report["run"]["bundle_hash"]).exists()


def test_aggregate_is_the_case_weighted_mean_of_site_updates(federation):
    from safetensors.numpy import load_file

    out, report = federation
    updates = {i: [m for m in _outgoing(out, i) if m["message_type"] == "train"] for i in (1, 2)}
    assert all(len(u) == ROUNDS for u in updates.values())
    for r in range(1, ROUNDS + 1):
        ckpt = load_file(str(out / "server" / "checkpoints" / f"round-{r:04d}.safetensors"))
        claimed = [updates[i][r - 1]["content"]["metrics"]["items"][P.NUM_EXAMPLES] for i in updates]
        rows = sorted(report["rounds"][r - 1]["train"]["sites"], key=lambda row: row["site"])
        weights = [row["weight"] for row in rows]  # the capped weights the server used, in site order
        assert weights == [min(c, min(claimed)) for c in claimed]  # two sites at max-site-share 0.5
        for key in ("weight", "bias"):
            arrays = [np.array(updates[i][r - 1]["content"]["arrays"]["items"][key]["values"], np.float64) for i in updates]
            expected = sum(a * w for a, w in zip(arrays, weights)) / sum(weights)
            np.testing.assert_allclose(ckpt[key], expected, rtol=1e-5, atol=1e-6)
        # and the sites trained from the previous global head, so updates differ from each other
        assert not np.allclose(arrays[0], arrays[1])


def test_every_outgoing_message_passes_the_privacy_inspection(federation, sites, tiny_bundle):
    from shared.bundle import load_bundle

    out, _ = federation
    width = load_bundle(tiny_bundle.path, tiny_bundle.public_key).head_inputs.n_features  # 515: a hybrid head
    case_ids = set()
    for d in sites:
        case_ids |= {r["case_id"] for r in csv.DictReader((d / "cases.csv").open(encoding="utf-8"))}
        case_ids |= {f.name.split(".")[0] for f in (d / "images").iterdir()}
    forbidden_text = [*case_ids, "/", "\\", ".nii", "images", "masks", str(out)]
    n_messages = 0
    for i in (1, 2, 3, 4):
        sent = _outgoing(out, i)
        n_messages += len(sent)
        if i < 3:
            kinds = [m["message_type"] for m in sent]
            assert kinds.count("train") == ROUNDS and kinds.count("evaluate") == ROUNDS
            assert kinds.count("query.final") == 1 and kinds.count("query.bundle") >= 1
        for m in sent:
            assert m["error"] is None
            content = m["content"]
            assert set(content) <= {P.HEAD, P.METRICS, P.INFO}
            if P.HEAD in content:
                items = content[P.HEAD]["items"]
                assert set(items) == set(P.head_keys(5))  # the main head and 5 cross-fit fold heads, nothing else
                for key, item in items.items():
                    assert item["shape"] == ([2, width] if key.endswith("weight") else [2])
            for key, value in content.get(P.METRICS, {}).get("items", {}).items():
                assert not any(c in key for c in case_ids)
                if isinstance(value, list):
                    metric = key.split(".", 1)[1]
                    assert len(value) == P.LIST_METRICS[metric]
                    if metric in (P.HIST_NEG, P.HIST_POS):  # whole counts of at least the floor
                        assert all(v == int(v) for v in value) and sum(value) >= P.MIN_CASES_FLOOR
                else:
                    assert isinstance(value, (int, float))
                if key.endswith(".threshold") and not key.startswith(P.MODEL_REFERENCE + "."):
                    assert abs(value / P.THRESHOLD_GRID - round(value / P.THRESHOLD_GRID)) < 1e-6  # on the grid
            for key, value in content.get(P.INFO, {}).get("items", {}).items():
                assert isinstance(value, str) and len(value) <= 64
                for text in (key, value):
                    assert not any(f in text for f in forbidden_text), (key, value)
    assert n_messages >= 2 * 6 + 1 + 2


def test_sites_keep_the_federated_bundle_with_their_own_threshold(federation, tiny_bundle):
    from safetensors.numpy import load_file

    from client.overlay import load_overlay
    from shared.bundle import load_bundle

    out, report = federation
    fb = report["final_bundle"]
    assert fb["parent_hash"] == report["run"]["bundle_hash"]
    lineage = fb["lineage"]
    assert lineage["parent_hash"] == report["run"]["bundle_hash"]
    assert lineage["federated"]["rounds"] == ROUNDS and lineage["federated"]["n_sites"] == 2
    assert "weighted median" in lineage["federated"]["threshold"]
    assert lineage["federated"]["aggregate_metrics"]["n_sites"] >= 2
    bundle = load_bundle(fb["path"], tiny_bundle.public_key)
    state = bundle.classifier_weights()  # layout v2: backbone and head files merged
    last = load_file(str(out / "server" / "checkpoints" / f"round-{ROUNDS:04d}.safetensors"))
    np.testing.assert_array_equal(state["fc.weight"].numpy(), last["weight"])
    for i in (1, 2):
        state_dir = out / "sites" / f"site-{i}" / "state"
        kept = json.loads((state_dir / "final.json").read_text(encoding="utf-8"))
        assert kept["bundle_hash"] == bundle.hash and Path(kept["bundle_path"]).is_dir()
        assert load_overlay(state_dir, bundle.hash).threshold == pytest.approx(kept["threshold"])
        load_bundle(kept["bundle_path"], tiny_bundle.public_key)



def test_the_demo_reads_its_case_through_the_site_overlay(federation, tiny_bundle):
    """Issue 23: `ichfed demo` step 3 opens its predictor like `ichfed predict --site-config`
    (``open_predictor``): the site's active model, with the site overlay's threshold, calibration
    and BatchNorm statistics for it, where the demo used to take the threshold alone."""
    from client.adoption import active_model
    from client.overlay import load_overlay
    from client.site_config import load_site_config
    from shared.bundle import load_bundle
    from simulations.demo import read_one_case

    out, report = federation
    reading = read_one_case(out, tiny_bundle.path)
    # The example is the first unflagged case of the site's last few, or the last one read when all are flagged.
    assert 1 <= reading.n_read <= 5 and (not reading.result.flagged or reading.n_read == 5)
    state = load_site_config(reading.site_config).state_dir
    active = active_model(state)
    r = reading.result
    assert reading.active == active and r.bundle.hash == active.bundle_hash
    assert reading.bundle_dir == Path(active.bundle_path)
    overlay = load_overlay(state, r.bundle.hash)
    if overlay is None:  # the site kept the federated bundle without activating it and reads its reference
        assert (r.threshold_source, r.calibration_source, r.norm_stats_source) == ("bundle",) * 3
        assert r.threshold == pytest.approx(load_bundle(active.bundle_path, tiny_bundle.public_key).threshold.p)
    else:
        assert (r.threshold, r.threshold_source) == (pytest.approx(overlay.threshold), "site")
        assert r.calibration_source == ("site" if overlay.calibration else "bundle")
        assert r.norm_stats_source == ("site" if overlay.norm_stats else "bundle")
    print(f"demo read: {active.source}, threshold {r.threshold_source}, calibration {r.calibration_source}")


def test_federated_threshold_comes_from_the_fold_heads_out_of_fold_scores(federation, tiny_bundle):
    """Cross-fitted federation: the site trained fold head k without its fold-k cases, and the
    federated arm's threshold is the midpoint rule on the aggregated fold heads' out-of-fold scores."""
    from safetensors.numpy import load_file

    from client.calibrate import site_threshold
    from client.cross_fit import case_folds, cross_fit_scores
    from client.features import FeatureStore
    from client.seeds import cross_fit_seed
    from client.site_config import load_site_config
    from shared.bundle import load_bundle
    from shared.models.head import HeadSet

    out, report = federation
    assert report["run"]["cross_fit_folds"] == 5
    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    final_heads = HeadSet.from_arrays(load_file(str(out / "server" / "checkpoints" / f"round-{ROUNDS:04d}.safetensors")))
    assert final_heads.n_folds == 5
    differs = 0
    for i in (1, 2):
        config = load_site_config(next((out / "site_configs").glob(f"site-{i}-*.toml")))
        fine = FeatureStore(config).features(bundle).fine_tune  # from the site's cache
        folds = case_folds(fine, 5, cross_fit_seed(config.seed))
        # the site's last train reply: every fold head differs from the main head it started beside
        train = [m for m in _outgoing(out, i) if m["message_type"] == "train"][-1]
        sent = HeadSet.from_arrays({k: np.array(v["values"], np.float32)
                                    for k, v in train["content"][P.HEAD]["items"].items()})
        assert all(not np.allclose(f.weight, sent.main.weight) for f in sent.folds)
        oof = site_threshold(fine.labels, cross_fit_scores(final_heads, fine, folds), bundle.threshold.p)
        in_sample = site_threshold(fine.labels, final_heads.main.p_neoplastic(fine.features), bundle.threshold.p)
        final = next(m for m in _outgoing(out, i) if m["message_type"] == "query.final")
        sent_t = final["content"][P.METRICS]["items"]["federated.threshold"]
        assert sent_t == pytest.approx(oof.p)
        kept = json.loads((out / "sites" / f"site-{i}" / "state" / "final.json").read_text(encoding="utf-8"))
        assert kept["threshold"] == pytest.approx(oof.p) and kept["threshold_scores"].startswith("out-of-fold")
        differs += in_sample.p != oof.p
    assert differs >= 1, "out-of-fold and in-sample thresholds coincide at every site: the test shows nothing"

# The run to kill: the same simulation on the in-process grid, in a process of its own.
_SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from simulations.flower_sim import run
from tests.inprocess_grid import simulation_in_process
a = json.loads(sys.argv[1])
with simulation_in_process():
    run(a["out"], a["bundle"], a["pub"], a["rounds"], site_dirs=a["sites"], local_epochs=a["epochs"],
        min_cases_for_metrics=5, fine_tune_fraction=0.5, seed=0, resume=a["resume"],
        site_overrides={str(i): {"state_dir": s, "audit_outgoing": False} for i, s in enumerate(a["states"])})
"""


def test_resume_after_the_server_is_killed(tiny_bundle, sites, federation, tmp_path):
    from server.checkpoint import CheckpointStore
    from simulations.flower_sim import run

    fed_out, _ = federation
    rounds = 2
    # reuse the first two sites' caches: this test is about the server, not preprocessing
    states = [str(fed_out / "sites" / f"site-{i}" / "state") for i in (1, 2)]
    args = {"out": str(tmp_path / "run"), "bundle": str(tiny_bundle.path), "pub": str(tiny_bundle.public_key),
            "rounds": rounds, "sites": [str(s) for s in sites[:2]], "epochs": 400, "resume": False, "states": states}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log_path = tmp_path / "killed-run.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, json.dumps(args)], env=env, start_new_session=True,
                                stdout=log_file, stderr=subprocess.STDOUT)
    store = CheckpointStore(tmp_path / "run" / "server")
    try:
        deadline = time.monotonic() + 240
        while not store.exists():
            tail = lambda: log_path.read_text(errors="replace", encoding="utf-8")[-3000:]  # noqa: E731
            assert proc.poll() is None, f"the first run ended before its first checkpoint:\n{tail()}"
            assert time.monotonic() < deadline, f"no checkpoint within 240 s:\n{tail()}"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server dies mid-run, with no chance to clean up
        proc.wait(timeout=30)
    killed_at, before = store.latest().round, store.latest().history
    assert 1 <= killed_at < rounds
    assert not (tmp_path / "run" / "report" / "report.json").exists()

    from server.federation import run_federation
    from server.settings import ServerSettings
    from shared.plumbing.errors import IchfedError

    # the ServerApp itself refuses to start afresh over another run's checkpoints
    with pytest.raises(IchfedError, match="resume"):
        run_federation(None, ServerSettings(bundle_path=tiny_bundle.path, public_key=tiny_bundle.public_key,
                                            state_dir=tmp_path / "run" / "server", num_rounds=rounds))
    with simulation_in_process():
        report = run(args["out"], args["bundle"], args["pub"], rounds, site_dirs=args["sites"], local_epochs=5,
                     min_cases_for_metrics=5, fine_tune_fraction=0.5, resume=True,
                     site_overrides={str(i): {"state_dir": s, "audit_outgoing": False} for i, s in enumerate(states)})
    assert report["run"]["resumed_from_round"] == killed_at
    assert [r["round"] for r in report["rounds"]] == list(range(1, rounds + 1))
    assert report["rounds"][:killed_at] == before  # the rounds done before the kill are kept, not redone
    assert store.latest().round == rounds
