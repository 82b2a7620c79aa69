"""Benchmark a simulated federation: N sites x R rounds at demo scale in Flower's simulation engine.

Runs ``simulations.flower_sim.run`` (the real ServerApp and ClientApp on Ray) on generated
sites and reports:

* wall time: cohort generation, the whole run, and per round (from the server's checkpoint times;
  round 1 includes every site's preprocessing: ingest, nnU-Net, crop, embeddings);
* peak memory: the peak resident set (``VmHWM``) of every Ray worker process, each of which hosts
  sites one after another, and of this driver process (ServerApp); with ``--sites 1`` a worker's
  peak is one site's;
* the report's table (reference / local-only / federated AUC).

By default every site starts with the reference bundle already in its cache (``--preseed``), as
hospitals that received it out of band would; ``--no-preseed`` sends it through Flower messages
to every site instead.

    python benchmarks/bench_simulation.py --bundle demo_out/bundle --sites 20 --rounds 5

Writes ``benchmarks/results/simulation.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _common import device_info

log = logging.getLogger("bench_simulation")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--pubkey", type=Path, default=None,
                        help="default: BUNDLE-keys/bundle_signing_key.pub.pem beside the bundle")
    parser.add_argument("--signing-key", type=Path, default=None,
                        help="coordinator key for the federated bundle (default: BUNDLE-keys/bundle_signing_key.pem "
                        "if present; without one no federated bundle is written)")
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases-per-site", type=int, default=12)
    parser.add_argument("--scale", default="demo", choices=("ci", "demo"))
    parser.add_argument("--preseed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench_simulation")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulation.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from shared.bundle import load_bundle
    from shared.bundle.transport import bundle_cache_dir, seed_bundle
    from shared.plumbing.atomic import write_json
    from shared.security.keys import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME
    from simulations import flower_sim

    keys = args.bundle.parent / f"{args.bundle.name}-keys"
    pubkey = args.pubkey or keys / PUBLIC_KEY_NAME
    signing_key = args.signing_key or (keys / PRIVATE_KEY_NAME if (keys / PRIVATE_KEY_NAME).is_file() else None)
    bundle = load_bundle(args.bundle, pubkey)
    out = args.work_dir / f"{args.sites}x{args.rounds}"
    if out.exists():
        shutil.rmtree(out)  # a fresh run: no cohort, cache or checkpoint of an earlier one

    t0 = time.perf_counter()
    specs = flower_sim.plan_sites(out, n_sites=args.sites, cases_per_site=args.cases_per_site, seed=args.seed)
    flower_sim.make_cohorts(specs, args.scale)
    cohort_s = time.perf_counter() - t0
    if args.preseed:
        for i in range(len(specs)):
            # the state folder that flower_sim.run gives site i
            seed_bundle(bundle, bundle_cache_dir(out / "sites" / f"site-{i + 1}" / "state"))

    sampler = _MemorySampler()
    sampler.start()
    t1 = time.perf_counter()
    report = flower_sim.run(out, args.bundle, pubkey, args.rounds, n_sites=args.sites,
                            cases_per_site=args.cases_per_site, scale=args.scale, seed=args.seed, device="cpu",
                            signing_key=signing_key)
    run_s = time.perf_counter() - t1
    sampler.stop()

    rounds = _round_times(out / "server" / "checkpoints", t1_wall=time.time() - run_s)
    workers = sorted(sampler.peaks_mb.values(), reverse=True)
    result = {
        "benchmark": "simulation",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "device": device_info("cpu"),
        "bundle": {"name": bundle.manifest.name, "version": bundle.manifest.version, "hash": bundle.hash,
                   "crop": list(bundle.crop_spec.size_xyz)},
        "sites": args.sites, "rounds": args.rounds, "cases_per_site": args.cases_per_site, "scale": args.scale,
        "preseeded_bundle": args.preseed,
        "federated_bundle": (report.get("final_bundle") or {}).get("hash"),
        "wall_s": {"cohorts": round(cohort_s, 1), "run": round(run_s, 1), "total": round(cohort_s + run_s, 1),
                   "per_round": rounds},
        "peak_rss_mb": {"ray_workers": [round(w, 1) for w in workers],
                        "max_worker": round(workers[0], 1) if workers else None,
                        "driver_server": round(_self_peak_mb(), 1),
                        "n_workers": len(workers),
                        "note": "each Ray worker hosts sites one after another; its peak bounds one site's"},
        "final_pooled": _pooled(report),
    }
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("wall_s", "peak_rss_mb")}, indent=1))
    print(f"wrote {args.out}")
    return 0


def _pooled(report: dict) -> dict:
    """Held-out metrics of each arm as the report pools them (pooled AUC from histograms, the mean of
    site AUCs named as such, summed-confusion accuracy / sensitivity / specificity)."""
    keys = ("n", "n_sites", "pooled_auc", "mean_site_auc", "accuracy", "sensitivity", "specificity")
    return {model: {k: m.get(k) for k in keys} for model, m in (report.get("final") or {}).get("pooled", {}).items()}


def _round_times(ckpt_dir: Path, t1_wall: float) -> list[float]:
    """Seconds per round from the modification times of the server's round checkpoints."""
    stamps = sorted((int(p.stem.split("-")[1]), p.stat().st_mtime) for p in ckpt_dir.glob("round-*.json"))
    times, prev = [], t1_wall
    for _, t in stamps:
        times.append(round(t - prev, 1))
        prev = t
    return times


def _self_peak_mb() -> float:
    return _vm_hwm_mb(os.getpid()) or 0.0


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class _MemorySampler:
    """Polls /proc for Ray worker processes and keeps each one's peak resident set (VmHWM)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.peaks_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                if b"default_worker.py" in cmd or cmd.startswith(b"ray::"):
                    peak = _vm_hwm_mb(int(proc.name))
                    if peak is not None:
                        self.peaks_mb[int(proc.name)] = max(peak, self.peaks_mb.get(int(proc.name), 0.0))
            self._stop.wait(self.interval_s)


if __name__ == "__main__":
    sys.exit(main())
