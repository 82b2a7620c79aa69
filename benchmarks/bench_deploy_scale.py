"""The largest real deployment this machine holds: one SuperLink (TLS, SuperNode authentication) and N
SuperNodes as separate processes on loopback, one `flwr run` of R rounds.

Reuses the deployment test's harness (``tests/deploy/harness.py``): `ichfed pki init`, `ichfed site init`
per site, `flwr supernode register`, `flower-supernode` per site, `flwr run` from a copy of the app.
Records wall time of the run, the peak PSS / RSS of each SuperNode's process tree (the SuperNode and
the `flwr-clientapp` it starts) and of the SuperLink's, and the load average.

    python benchmarks/bench_deploy_scale.py --bundle-root /tmp/ichfed-cache/bundle-root --sites 6 \
        --out benchmarks/results/deploy_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    """Run the deployment; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle-root", type=Path, required=True, help="folder with bundle/ and bundle-keys/")
    p.add_argument("--sites", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cases-per-site", type=int, default=10)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "deploy_scale.json")
    args = p.parse_args(argv)

    from bench_scale import TreeMemory  # same folder

    from ichfed.cli import main as ichfed
    from shared.plumbing.atomic import write_json
    from shared.security.keys import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME
    from simulations.cohort import write_cohort
    from tests.deploy.harness import Deployment
    from tests.deploy.test_tls_deployment import _app_copy

    bundle, keys = args.bundle_root / "bundle", args.bundle_root / "bundle-keys"
    root = Path(tempfile.mkdtemp(prefix="ichfed-deploy-"))
    assert ichfed(["pki", "init", "--out", str(root / "pki"), "--server-name", "localhost"]) == 0
    names = [f"site-{i + 1}" for i in range(args.sites)]
    cfgs = {}
    for i, name in enumerate(names):
        data = root / "data" / name
        write_cohort("charite-like", args.cases_per_site, 100 + i, data, scale="ci")
        cfgs[name] = root / "site_configs" / f"{name}.toml"
        assert ichfed(["site", "init", "--name", name, "--data", str(data), "--out", str(cfgs[name]),
                       "--state-dir", str(root / "state" / name), "--public-key", str(keys / PUBLIC_KEY_NAME),
                       "--device", "cpu", "--local-epochs", "5", "--fine-tune-fraction", "0.6",
                       "--seed", str(i)]) == 0
    dep = Deployment(root, root / "pki" / "ca.crt", root / "pki" / "server.pem", root / "pki" / "server.key")
    load_before = os.getloadavg()
    samplers = {}
    try:
        dep.start_superlink()
        dep.register_and_start_sites(cfgs, root / "state")
        dep.wait(lambda: dep.online_nodes() >= args.sites, 300, "all SuperNodes online", interval=2)
        samplers = {name: TreeMemory(proc.pid, 2.0) for name, proc in dep.procs.items()}
        for s in samplers.values():
            s.start()
        run_config = " ".join([f"bundle-path='{bundle}'", f"public-key='{keys / PUBLIC_KEY_NAME}'",
                               f"signing-key='{keys / PRIVATE_KEY_NAME}'", f"state-dir='{root / 'server'}'",
                               f"num-server-rounds={args.rounds}", f"min-sites={args.sites}"])
        t0 = time.monotonic()
        r = dep.flwr("run", str(_app_copy(root / "app")), "tls", "--stream", "--run-config", run_config,
                     timeout=3000, name="run")
        wall = time.monotonic() - t0
    finally:
        for s in samplers.values():
            s.stop()
        dep.stop_and_check()
    from server.run_folder import latest_run

    report_path = (latest_run(root / "server") or root / "server") / "report.json"
    ok = r.returncode == 0 and report_path.is_file()
    report = json.loads(report_path.read_text(encoding="utf-8")) if ok else {}
    nodes = {n: s for n, s in samplers.items() if n in names}
    result = {
        "benchmark": "deploy_scale",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "sites": args.sites, "rounds": args.rounds, "cases_per_site": args.cases_per_site, "ok": ok,
        "wall_s_flwr_run": round(wall, 1),
        "round_s": [r_.get("wall_s") for r_ in report.get("rounds", [])] if report else None,
        "peak_pss_mb_per_supernode_tree": {n: round(s.peak_pss_mb, 1) for n, s in nodes.items()},
        "peak_rss_mb_per_supernode_tree": {n: round(s.peak_rss_mb, 1) for n, s in nodes.items()},
        "peak_pss_mb_superlink_tree": round(samplers["superlink"].peak_pss_mb, 1) if "superlink" in samplers else None,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "distribution": report.get("distribution"),
        "stdout_tail": [] if ok else r.stdout.splitlines()[-20:],
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
