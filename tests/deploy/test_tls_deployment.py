"""A real deployment on loopback: SuperLink with TLS and SuperNode authentication, two registered
SuperNodes running the ichfed ClientApp on tiny synthetic sites, `flwr run` of the ichfed
ServerApp for 2 rounds, and an unregistered SuperNode that must be refused.

Everything is real: certificates from ``ichfed pki init``, site configs and node keys from
``ichfed site init``, the bootstrap bundle of the session (``tiny_bundle``), Flower's own
processes. Each process runs in its own process group, killed at teardown.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from ichfed.cli import main
from tests.deploy.harness import Deployment

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SITES = ("site-a", "site-b")
ROUNDS = 2


def _public_key(tiny_bundle) -> Path:
    """The bootstrap's signing public key (the fixture's name for it, or shared.security.keys's)."""
    from shared.security.keys import PUBLIC_KEY_NAME

    for candidate in (tiny_bundle.public_key, tiny_bundle.public_key.parent / PUBLIC_KEY_NAME):
        if candidate.is_file():
            return candidate
    pytest.fail(f"tiny_bundle: no signing public key in {tiny_bundle.public_key.parent}")


def _private_key(tiny_bundle) -> Path:
    from shared.security.keys import PRIVATE_KEY_NAME

    for candidate in (tiny_bundle.private_key, tiny_bundle.private_key.parent / PRIVATE_KEY_NAME):
        if candidate.is_file():
            return candidate
    pytest.fail(f"tiny_bundle: no signing private key in {tiny_bundle.private_key.parent}")


def _app_copy(dst: Path) -> Path:
    """The Flower app (this repository's code and pyproject.toml) in a scratch folder.

    ``flwr run`` rewrites a pyproject.toml that still has ``[tool.flwr.federations]`` (it
    migrates the section to FLWR_HOME and comments it out); it must never edit the checkout
    under test, so it builds the FAB from a copy.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in ("client", "server", "shared", "simulations", "ichfed"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=ignore)
    for f in ("pyproject.toml", ".gitignore", "README.md"):
        if (REPO / f).is_file():
            shutil.copy2(REPO / f, dst / f)
    return dst


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_bundle, cohorts, case_cache):
    root = tmp_path_factory.mktemp("deploy")
    public_key = _public_key(tiny_bundle)

    # Coordinator: CA + SuperLink certificate (node keys come from the sites themselves).
    assert main(["pki", "init", "--out", str(root / "pki"), "--server-name", "localhost"]) == 0
    pki = root / "pki"

    # Sites: data, config and SuperNode key pair made with `ichfed site init`.
    site_cfg: dict[str, Path] = {}
    site_data: dict[str, Path] = {}
    for i, name in enumerate(SITES):
        # A tiny synthetic hospital: 10 cases at ci scale (6 to fine-tune: above the floor of 5 cases
        # below which a site sends no head). Its preprocessing comes from the session's case cache
        # where an earlier test made it (test_fault_injection runs these cohorts): what this test
        # shows is the transport, the bundle's delivery and the run, not preprocessing.
        data = site_data[name] = cohorts.get("charite-like", 10, 100 + i)
        cfg = root / "site_configs" / f"{name}.toml"
        assert main(["site", "init", "--name", name, "--data", str(data), "--out", str(cfg),
                     "--state-dir", str(root / "state" / name), "--public-key", str(public_key),
                     "--device", "cpu", "--local-epochs", "3", "--fine-tune-fraction", "0.6",
                     "--seed", str(i)]) == 0
        case_cache.seed(root / "state" / name)
        site_cfg[name] = cfg
    # The intruder has a well-formed key that nobody registered.
    assert main(["site", "init", "--name", "rogue", "--data", str(site_data[SITES[0]]),
                 "--out", str(root / "site_configs" / "rogue.toml"), "--state-dir", str(root / "state" / "rogue"),
                 "--public-key", str(public_key), "--device", "cpu"]) == 0

    dep = Deployment(root, pki / "ca.crt", pki / "server.pem", pki / "server.key")
    try:
        dep.start_superlink()
        dep.register_and_start_sites({name: site_cfg[name] for name in SITES}, root / "state")
        dep.start_supernode("rogue", root / "state" / "rogue" / "keys" / "rogue",
                            f"site-config='{root / 'site_configs' / 'rogue.toml'}'", max_retries=1)

        dep.wait(lambda: dep.online_nodes() >= len(SITES), 120, "both SuperNodes online", interval=2)
        yield {"dep": dep, "root": root, "public_key": public_key, "data": site_data}
    finally:
        dep.stop_and_check()


def test_two_rounds_over_tls_with_node_auth(federation, tiny_bundle):
    dep, root = federation["dep"], federation["root"]
    state = root / "server"
    run_config = " ".join([
        f"bundle-path='{tiny_bundle.path}'",
        f"public-key='{federation['public_key']}'",
        f"signing-key='{_private_key(tiny_bundle)}'",
        f"state-dir='{state}'",
        f"num-server-rounds={ROUNDS}",
        "min-sites=2",
    ])
    t0 = time.monotonic()
    app = _app_copy(root / "app")
    r = dep.flwr("run", str(app), "tls", "--stream", "--run-config", run_config, timeout=540, name="run")
    wall = time.monotonic() - t0
    from server.run_folder import latest_run

    report_path = (latest_run(state) or state) / "report.json"  # <state>/runs/<Flower's run id>/
    assert r.returncode == 0 and report_path.is_file(), (
        f"flwr run rc={r.returncode}\n{r.stdout[-5000:]}\n--- site-a ---\n{dep.log('site-a')[-3000:]}")
    report = json.loads(report_path.read_text(encoding="utf-8"))

    assert report["run"]["num_rounds"] == ROUNDS
    assert sorted(report["run"]["sites"]) == list(SITES)
    assert "Exit Code" not in r.stdout, r.stdout[-5000:]
    # Neither site had the bundle: both received it through Flower messages and verified it.
    assert sorted(report["distribution"]["received"]) == list(SITES) and report["distribution"]["refused"] == []
    assert len(report["rounds"]) == ROUNDS
    final_sites = {s["site"]: s for s in report["final"]["sites"]}
    assert set(final_sites) == set(SITES) and all(s["status"] == "ok" for s in final_sites.values())
    assert report["final_bundle"] and report["final_bundle"]["parent_hash"] == report["run"]["bundle_hash"]

    from shared.bundle import load_bundle

    for name in SITES:
        site_state = root / "state" / name
        # Each site cached the reference bundle and the federated one, both verified.
        assert load_bundle(site_state / "bundles" / report["run"]["bundle_hash"], federation["public_key"])
        final = json.loads((site_state / "final.json").read_text(encoding="utf-8"))
        assert final["bundle_hash"] == report["final_bundle"]["hash"]
    # The wire carried no case IDs: the ServerApp's report names none of the sites' cases.
    text = report_path.read_text(encoding="utf-8")
    for name in SITES:
        cases = federation["data"][name] / "cases.csv"
        ids = [line.split(",")[0] for line in cases.read_text(encoding="utf-8").splitlines()[1:]]
        assert not [i for i in ids if f'"{i}"' in text]
    print(f"deployment run: {ROUNDS} rounds, 2 sites, wall {wall:.0f} s")


def test_unregistered_supernode_is_refused(federation):
    dep = federation["dep"]
    rogue = dep.procs["rogue"]
    dep.wait(lambda: "Failed to activate SuperNode" in dep.log("rogue"), 120, "the refusal in the rogue log", "rogue")
    assert "Exit Code: 305" in dep.log("rogue")
    r = dep.flwr("supernode", "list", "tls", "--format", "json", name="list-final")
    nodes = json.loads(r.stdout[r.stdout.index("{"):])["nodes"]
    assert len(nodes) == len(SITES)  # only the two registered keys are known to the SuperLink
    # With --max-retries the refused SuperNode gives up instead of retrying for ever.
    dep.wait(lambda: rogue.poll() is not None, 120, "the rogue SuperNode to give up")
    assert rogue.returncode != 0
