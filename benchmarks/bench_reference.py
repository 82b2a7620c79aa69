"""Benchmark the reference model over seeds: internal test AUC, ICH/PHE Dice and wall time, mean ± SD.

Runs ``python -m ichfed bootstrap --profile PROFILE --seed S`` once per seed, sequentially, as real
subprocesses (cohort, nnU-Net, crops, ResNet-34, end-to-end test on the held-out 10 %, signing), and
summarises each run's ``OUT-report.json`` with :func:`bench_bootstrap.summarise`. A seed given twice
is a same-seed reproducibility check: its runs are compared by the bundle's weight hashes (from the
signed manifest) and their test figures. Issue #13's targets for ``--profile demo``: AUC >= 0.80 with
SD <= 0.05, ICH Dice >= 0.85, PHE Dice >= 0.65, wall time <= 15 min on 2 CPU cores.

    python benchmarks/bench_reference.py --seeds 0 1 2            # three demo bootstraps
    python benchmarks/bench_reference.py --seeds 0 1 2 0          # plus a second seed-0 run
    python benchmarks/bench_reference.py --from-runs /tmp/h6      # summarise earlier runs only

Each run lives in ``--work-root/seed-S[-rN]`` (bundle, work folder, log, ``run.json``); the summary
is rewritten after every run, so a partial result survives an interrupted benchmark. The machine
load (1-min load average at start and end of each run) is recorded: wall time on a shared machine
is only comparable with its load.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
from _common import device_info  # noqa: E402  (benchmarks/ is on sys.path as the script folder)
from bench_bootstrap import summarise  # noqa: E402

log = logging.getLogger("bench_reference")
TARGETS = {"demo": {"auc_mean_min": 0.80, "auc_sd_max": 0.05, "ich_dice_mean_min": 0.85,
                    "phe_dice_mean_min": 0.65, "wall_s_max": 15 * 60.0}}


def run_seed(seed: int, run_dir: Path, profile: str, device: str, src: Path) -> dict:
    """One bootstrap in ``run_dir``; returns its summary (and writes it as ``run_dir/run.json``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    bundle = run_dir / "bundle"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "ichfed", "bootstrap", "--profile", profile, "--out", str(bundle),
           "--work", str(run_dir / "work"), "--seed", str(seed), "--device", device]
    log.info("seed %d: %s", seed, " ".join(cmd[2:]))
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(run_dir / "bootstrap.log", "w", encoding="utf-8") as log_file:
        proc = subprocess.run(cmd, cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: ichfed bootstrap failed ({proc.returncode}); log: {run_dir / 'bootstrap.log'}")
    result = summarise_run(run_dir)
    result |= {"wall_s": wall, "load_avg_1min": [load_start, os.getloadavg()[0]]}
    (run_dir / "run.json").write_text(json.dumps(result, indent=2, sort_keys=True), encoding="utf-8")
    return result


def summarise_run(run_dir: Path) -> dict:
    """The report figures of one finished run plus its bundle's weight hashes."""
    report = json.loads((run_dir / "bundle-report.json").read_text(encoding="utf-8"))
    manifest = json.loads((run_dir / "bundle" / "manifest.json").read_text(encoding="utf-8"))
    out = summarise(report)
    out["weights_sha256"] = {name: digest for name, digest in manifest["files"].items()
                             if name.endswith((".safetensors", ".pth"))}
    out["run_dir"] = str(run_dir)
    old = run_dir / "run.json"
    if old.exists():  # keep the wall time measured when the run was made
        prev = json.loads(old.read_text(encoding="utf-8"))
        out |= {k: prev[k] for k in ("wall_s", "load_avg_1min") if k in prev}
    return out


def _mean_sd(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def aggregate(runs: list[dict], profile: str) -> dict:
    """Mean ± SD over the first run of each seed; repeats of a seed go to ``reproducibility``."""
    first: dict[int, dict] = {}
    repeats: list[dict] = []
    for run in runs:
        if run["seed"] in first:
            repeats.append(run)
        else:
            first[run["seed"]] = run
    per_seed = list(first.values())
    summary = {
        "auc": _mean_sd([r["classification"]["auc"] for r in per_seed]),
        "ich_dice_mean": _mean_sd([r["dice"]["ich"]["mean"] for r in per_seed]),
        "phe_dice_mean": _mean_sd([r["dice"]["phe"]["mean"] for r in per_seed]),
        "wall_s": _mean_sd([r.get("wall_s") for r in per_seed]),
    }
    repro = [{"seed": r["seed"], "same_weights": {k: v == first[r["seed"]]["weights_sha256"].get(k)
                                                  for k, v in r["weights_sha256"].items()},
              "auc": [first[r["seed"]]["classification"]["auc"], r["classification"]["auc"]],
              "ich_dice_mean": [first[r["seed"]]["dice"]["ich"]["mean"], r["dice"]["ich"]["mean"]]}
             for r in repeats]
    target = TARGETS.get(profile)
    checks = None
    if target and summary["auc"]["n"]:
        checks = {"auc_mean": summary["auc"]["mean"] >= target["auc_mean_min"],
                  "auc_sd": summary["auc"]["sd"] is not None and summary["auc"]["sd"] <= target["auc_sd_max"],
                  "ich_dice": summary["ich_dice_mean"]["mean"] >= target["ich_dice_mean_min"],
                  "phe_dice": summary["phe_dice_mean"]["mean"] >= target["phe_dice_mean_min"],
                  "wall_s": (summary["wall_s"]["mean"] or 1e9) <= target["wall_s_max"]}
    return {"summary": summary, "reproducibility": repro, "targets": target, "meets_target": checks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("ci", "demo", "paper"), default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--work-root", type=Path, default=ROOT / "build" / "bench_reference")
    parser.add_argument("--src", type=Path, default=ROOT,
                        help="source tree to run ichfed from (e.g. a `git archive` of one commit)")
    parser.add_argument("--commit", default=None, help="the commit --src was made from, recorded in the result")
    parser.add_argument("--from-runs", type=Path, default=None,
                        help="do not train: summarise the seed-* run folders under this folder")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reference_seeds.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shared.plumbing.atomic import write_json

    header = {"benchmark": "reference_seeds", "profile": args.profile, "host": platform.node(),
              "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "device": device_info(args.device), "commit": args.commit,
              "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    runs: list[dict] = []
    if args.from_runs:
        for run_dir in sorted(args.from_runs.glob("seed-*")):
            if (run_dir / "bundle-report.json").exists():
                runs.append(summarise_run(run_dir))
    else:
        seen: dict[int, int] = {}
        for seed in args.seeds:
            seen[seed] = seen.get(seed, 0) + 1
            name = f"seed-{seed}" + (f"-r{seen[seed]}" if seen[seed] > 1 else "")
            runs.append(run_seed(seed, args.work_root / name, args.profile, args.device, args.src))
            write_json(args.out, header | {"runs": runs} | aggregate(runs, args.profile))
    result = header | {"runs": runs} | aggregate(runs, args.profile)
    write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
