"""Benchmark `ichfed bootstrap`: wall time of a reference training run and the quality it reaches.

Runs ``python -m ichfed bootstrap --profile PROFILE`` as a real subprocess (cohort generation,
nnU-Net planning/preprocessing/training, crops, ResNet-34 training, end-to-end evaluation on the
held-out 10 %, signing) and records, from the report it writes beside the bundle, the Dice of
ICH and PHE and the AUC / sensitivity / specificity on the test split, with the stage timings.
Target for ``--profile demo``: <= 15 min on 2 CPU cores.

    python benchmarks/bench_bootstrap.py                     # demo profile, fresh work folder
    python benchmarks/bench_bootstrap.py --profile ci        # a few minutes, for a smoke run
    python benchmarks/bench_bootstrap.py --from-report OUT-report.json   # summarise an earlier run

Writes ``benchmarks/results/bootstrap.json`` (or ``--out``). The bundle and its work folder stay
in ``--work-dir`` (default ``build/bench_bootstrap/<profile>``, replaced on each run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
from _common import device_info  # noqa: E402  (benchmarks/ is on sys.path as the script folder)

log = logging.getLogger("bench_bootstrap")
TARGET_S = {"demo": 15 * 60.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("ci", "demo", "paper"), default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--from-report", type=Path, default=None,
                        help="do not train: summarise this OUT-report.json of an earlier bootstrap")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bootstrap.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from shared.plumbing.atomic import write_json

    result: dict = {
        "benchmark": "bootstrap",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": device_info(args.device),
        "load_avg_start": os.getloadavg(),
    }
    if args.from_report:
        report_path = args.from_report
        result["wall_s"] = None  # not measured here
        result["source"] = "from-report"
    else:
        work = args.work_dir or ROOT / "build" / "bench_bootstrap" / args.profile
        if work.exists() and any(work.iterdir()) and not (work / "bootstrap.log").exists():
            raise SystemExit(f"{work}: not empty and not an earlier bench_bootstrap folder; choose another --work-dir")
        if work.exists():
            shutil.rmtree(work)  # a fresh run: no cached cohort, nnU-Net data or bundle
        work.mkdir(parents=True)
        bundle = work / "bundle"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "ichfed", "bootstrap", "--profile", args.profile, "--out", str(bundle),
               "--work", str(work / "bundle-work"), "--seed", str(args.seed), "--device", args.device]
        log.info("running %s", " ".join(cmd[2:]))
        t0 = time.perf_counter()
        with open(work / "bootstrap.log", "w", encoding="utf-8") as log_file:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                  encoding="utf-8")
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            sys.stderr.write((work / "bootstrap.log").read_text(encoding="utf-8")[-4000:])
            raise SystemExit(f"ichfed bootstrap failed with exit code {proc.returncode} (log: {work / 'bootstrap.log'})")
        report_path = work / "bundle-report.json"
        result["source"] = "run"
        result["log"] = str(work / "bootstrap.log")
    report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    result.update(summarise(report))
    result["report"] = str(report_path)
    target = TARGET_S.get(result["profile"])
    result["target_wall_s"] = target
    result["pass"] = None if (target is None or result["wall_s"] is None) else result["wall_s"] <= target
    result["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("profile", "wall_s", "pass", "dice", "classification")}, indent=2))
    print(f"wrote {args.out}")
    return 0


def summarise(report: dict) -> dict:
    """The figures worth tracking from a bootstrap report: Dice, AUC, sens/spec, threshold, timings."""
    cls = report["test"]["classification"]
    return {
        "profile": report["profile"],
        "seed": report["seed"],
        "split": report["cohort"].get("split"),
        "dice": {name: {k: d.get(k) for k in ("mean", "sd", "median", "min", "max", "n")}
                 for name, d in report["test"]["dice"].items()},
        "classification": {k: cls.get(k) for k in ("n", "n_pos", "n_neg", "auc", "accuracy", "sensitivity",
                                                   "specificity")} | {"ci": cls.get("ci"),
                                                                      "reasons": cls.get("reasons")},
        "n_no_lesion": report["test"]["n_no_lesion"],
        "threshold": report["threshold"],
        "crop": report["crop"],
        "stage_timings_s": report["timings"],
    }


if __name__ == "__main__":
    sys.exit(main())
