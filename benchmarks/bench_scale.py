"""How `ichfed simulate` scales with the number of sites: wall time, peak memory, per-site round cost.

For each site count N (default 20, 50, 100) this runs the real command
``ichfed simulate --sites N --rounds R --scale ci`` in a child process (niced: the machine is
shared) and measures:

* wall time of the whole command, and of each round from the server's ``events.jsonl``
  (round 1 includes every site's preprocessing: ingest, nnU-Net, crop, embeddings; rounds after
  the first are head training, evaluation and messages only);
* ``per_site_round_s``: the mean duration of rounds 2..R divided by N;
* peak memory of the whole process tree (the command, Ray's GCS and raylet, every Ray worker),
  sampled every ``--interval`` seconds from /proc: the peak of the summed RSS (shared library
  pages counted once per process, an over-estimate) and of the summed PSS (shared pages split
  between the processes that map them, the fair total);
* the machine's load average before and after (other jobs compete for the 2 cores).

Cohorts are generated here first (timed apart) and every site starts with the reference bundle
already in its cache (``shared.bundle.transport.seed_bundle``: hard links), as sites that received it
out of band would: sending the 250 MB ci bundle to 100 virtual sites through Flower's in-memory
messages would measure the disk, not the federation.

    python benchmarks/bench_scale.py --bundle /tmp/ichfed-cache/bundle-root/bundle \
        --sites 20 50 100 --work-dir /tmp/scale --out benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    """Run the scale benchmark; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--pubkey", type=Path)
    p.add_argument("--sites", type=int, nargs="+", default=[20, 50, 100])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cases-per-site", type=int, default=10)
    p.add_argument("--fine-tune-fraction", type=float, default=0.5)
    p.add_argument("--local-epochs", type=int, default=20)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/ichfed-scale"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--interval", type=float, default=2.0, help="memory sampling period, seconds")
    p.add_argument("--reuse-sites", type=Path, metavar="RUN_DIR",
                   help="an earlier run's folder: site i reads the data of its site ((i-1) mod K)+1 (--site-dirs) "
                   "and starts with that site's preprocessing cache hard-linked, so round 1 skips nnU-Net; "
                   "measures the federation's own cost at N sites (preprocessing is per case, see the K-site run)")
    args = p.parse_args(argv)
    from shared.plumbing.atomic import write_json
    from shared.security.keys import PUBLIC_KEY_NAME

    pubkey = args.pubkey or args.bundle.parent / f"{args.bundle.name}-keys" / PUBLIC_KEY_NAME
    previous = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {}
    runs = {_key(r): r for r in previous.get("runs", [])}
    for n in args.sites:
        r = run_one(n, args, pubkey)
        runs[_key(r)] = r
        result = _result(sorted(runs.values(), key=lambda r: (r["sites"], _key(r))), args)
        write_json(args.out, result)  # after each size: a long sweep keeps what it measured
        print(json.dumps(r, indent=1), flush=True)
    print(f"wrote {args.out}")
    return 0


def _key(run: dict) -> str:
    return f"{run['sites']}" + ("-reused" if run.get("preprocessing_reused_from") else "")


def _result(runs: list[dict], args) -> dict:
    return {
        "benchmark": "scale",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "command": "ichfed simulate --sites N --rounds R --min-sites N/2 --scale ci --cases-per-site C "
                   "--fine-tune-fraction F --local-epochs E (bundle preseeded in every site's cache)",
        "rounds": args.rounds, "cases_per_site": args.cases_per_site, "fine_tune_fraction": args.fine_tune_fraction,
        "local_epochs": args.local_epochs, "nice": args.nice,
        "runs": runs,
        "notes": ("rss_sum overcounts pages shared between processes; pss_sum is the fair total. "
                  "Round 1 includes each site's preprocessing. The machine is shared: see load_avg."),
    }


def run_one(n: int, args, pubkey: Path) -> dict:
    """One ``ichfed simulate`` run with ``n`` sites; its figures."""
    import shutil

    from shared.bundle import load_bundle
    from shared.bundle.transport import bundle_cache_dir, seed_bundle
    from shared.plumbing.progress import read_events
    from simulations import flower_sim

    out = args.work_dir / (f"{n}-sites" + ("-reused" if args.reuse_sites else ""))
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle, pubkey)
    if args.reuse_sites:
        site_args = ["--site-dirs", ",".join(str(d) for d in _reuse(args.reuse_sites, out, n))]
    else:
        specs = flower_sim.plan_sites(out, n_sites=n, cases_per_site=args.cases_per_site, seed=0)
        flower_sim.make_cohorts(specs, "ci")
        site_args = ["--sites", str(n), "--scale", "ci", "--cases-per-site", str(args.cases_per_site)]
    for i in range(n):
        seed_bundle(bundle, bundle_cache_dir(out / "sites" / f"site-{i + 1}" / "state"))
    cohort_s = time.perf_counter() - t0
    cmd = ["nice", "-n", str(args.nice), str(Path(sys.executable).parent / "ichfed"), "simulate", *site_args,
           "--rounds", str(args.rounds), "--min-sites", str(max(1, n // 2)),
           "--fine-tune-fraction", str(args.fine_tune_fraction), "--local-epochs", str(args.local_epochs), "--bundle", str(args.bundle), "--pubkey", str(pubkey), "--out", str(out)]
    load_before = os.getloadavg()
    t1 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, encoding="utf-8")
    sampler = TreeMemory(child.pid, args.interval)
    sampler.start()
    stdout, stderr = child.communicate()
    sampler.stop()
    wall = time.perf_counter() - t1
    from server.run_folder import latest_run

    events = read_events((latest_run(out / "server") or out / "server") / "events.jsonl")
    rounds = _round_seconds(events)
    later = rounds[1:]
    return {
        "sites": n, "exit_code": child.returncode, "cases": n * args.cases_per_site,
        "preprocessing_reused_from": str(args.reuse_sites) if args.reuse_sites else None,
        "wall_s": {"cohorts_and_preseed": round(cohort_s, 1), "simulate": round(wall, 1), "per_round": rounds},
        "per_site_round_s": round(sum(later) / len(later) / n, 4) if later else None,
        "peak_tree_mb": {"rss_sum": round(sampler.peak_rss_mb, 1), "pss_sum": round(sampler.peak_pss_mb, 1),
                         "max_processes": sampler.max_procs},
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "console_lines": len([ln for ln in stderr.splitlines() if ln.strip()]),
        "stderr_tail": stderr.strip().splitlines()[-3:] if child.returncode else [],
        "pooled_auc": _final_aucs(events),
    }


def _reuse(run_dir: Path, out: Path, n: int) -> list[Path]:
    """Site data folders for ``n`` sites cycling over ``run_dir``'s K sites, each new state folder
    holding a hard-linked copy of the preprocessing cache of the site whose data it reads."""
    import os as _os

    prepared = sorted((p for p in (run_dir / "sites").glob("site-*") if (p / "data" / "cases.csv").is_file()),
                      key=lambda p: int(p.name.split("-")[1]))
    if not prepared:
        raise SystemExit(f"--reuse-sites: no site folders in {run_dir / 'sites'}")
    dirs = []
    for i in range(n):
        src = prepared[i % len(prepared)]
        dirs.append(src / "data")
        cache = src / "state" / "cache"
        for f in cache.rglob("*"):
            if f.is_file():
                dst = out / "sites" / f"site-{i + 1}" / "state" / "cache" / f.relative_to(cache)
                dst.parent.mkdir(parents=True, exist_ok=True)
                _os.link(f, dst)
    return dirs


def _round_seconds(events: list[dict]) -> list[float]:
    """Each round's seconds from its round_started to its round_finished event."""
    starts = {e["round"]: e["elapsed_s"] for e in events if e["event"] == "round_started"}
    return [round(e["elapsed_s"] - starts[e["round"]], 2) for e in events
            if e["event"] == "round_finished" and e["round"] in starts]


def _final_aucs(events: list[dict]) -> dict | None:
    final = [e for e in events if e["event"] == "final_evaluation"]
    return final[-1].get("pooled_auc") if final else None


class TreeMemory:
    """Samples the summed RSS and PSS of a process and all its descendants; keeps the peaks."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss_mb = self.peak_pss_mb = 0.0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = _descendants(self.pid)
            rss = pss = 0.0
            for pid in pids:
                r, s = _rss_pss_mb(pid)
                rss, pss = rss + r, pss + s
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
            self.peak_pss_mb = max(self.peak_pss_mb, pss)
            self.max_procs = max(self.max_procs, len(pids))
            self._stop.wait(self.interval_s)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text(encoding="utf-8")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss_pss_mb(pid: int) -> tuple[float, float]:
    rss = pss = 0.0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text(encoding="utf-8").splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return rss, pss


if __name__ == "__main__":
    sys.exit(main())
