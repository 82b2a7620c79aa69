"""Benchmark the cohort generator; writes benchmarks/results/cohort.json.

Each measurement runs in a fresh subprocess so that its peak RSS is its own:
  * demo scale, N=20 and N=100 (target: 100 cases < 60 s on 2 cores; peak RSS independent of N),
  * paper scale, a few cases (target: < 3 s per case).
With ``--shift`` it also measures how strong the site shift is for a classifier that, like the
paper's ResNet, only sees HU inside the true ICH/PHE masks: logistic regression on the masked HU
histogram plus volumes, trained on charite-like and scored on every profile
(writes benchmarks/results/cohort_shift.json).
Wall time depends on what else runs on the machine, so CPU time and the load average are
recorded too. Usage: ``python benchmarks/bench_cohort.py [--demo-cases 20 100] [--paper-cases 3]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from simulations.cohort import write_cohort
profile, n, scale, background, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
t0, c0 = time.perf_counter(), time.process_time()
write_cohort(profile, n, 0, out, scale=scale, background=background)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_one(profile: str, n: int, scale: str, background: str = "phantom") -> dict:
    """Generate ``n`` cases in a subprocess; return its timings and peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "site"
        res = subprocess.run([sys.executable, "-c", CHILD, profile, str(n), scale, background, str(out)],
                             capture_output=True, text=True, env=env, check=True, encoding="utf-8")
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return {"profile": profile, "scale": scale, "background": background, "n_cases": n,
            "wall_s": round(r["wall_s"], 2), "cpu_s": round(r["cpu_s"], 2),
            "per_case_wall_s": round(r["wall_s"] / n, 3), "per_case_cpu_s": round(r["cpu_s"] / n, 3),
            "peak_rss_mb": round(r["peak_rss_mb"], 1), "disk_mb": round(size_mb, 1)}


HIST_EDGES = list(range(-20, 125, 10))


def lesion_features(image, mask):
    """Masked-crop features: log volumes, mean/SD HU of ICH and PHE, HU histogram of ICH+PHE."""
    import numpy as np

    lesion = mask > 0
    hu = image[lesion].astype(np.float32)
    hist = np.histogram(np.clip(hu, -20, 119), bins=HIST_EDGES)[0] / max(hu.size, 1)
    ich, phe = image[mask == 1].astype(np.float32), image[mask == 2].astype(np.float32)
    stats = [np.log1p((mask == 1).sum()), np.log1p((mask == 2).sum()),
             ich.mean() if ich.size else 0, ich.std() if ich.size else 0,
             phe.mean() if phe.size else 0, phe.std() if phe.size else 0]
    return np.concatenate([stats, hist])


def shift_experiment(n_train: int, n_test: int, scale: str) -> dict:
    """Train on charite-like, score on held-out charite-like cases and on every other profile."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from simulations.cohort import make_case
    from simulations.profiles import list_profiles, load_profile

    def dataset(profile, seed, n):
        xs, ys = [], []
        for k in range(n):
            c = make_case(profile, k, seed, scale=scale)
            xs.append(lesion_features(c.image, c.mask))
            ys.append(c.record.label)
        return np.array(xs), np.array(ys)

    dev = load_profile("charite-like")
    x_train, y_train = dataset(dev, 100, n_train)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000)).fit(x_train, y_train)
    aucs, aucs_dev_scanner = {}, {}
    for name in list_profiles():
        prof = load_profile(name)
        x, y = dataset(prof, 200, n_test)
        aucs[name] = round(float(roc_auc_score(y, model.predict_proba(x)[:, 1])), 3)
        if name != dev.name:
            # Same name, hence the same patients and lesions, imaged with the development scanner.
            x, y = dataset(dataclasses.replace(prof, scanner=dev.scanner), 200, n_test)
            aucs_dev_scanner[name] = round(float(roc_auc_score(y, model.predict_proba(x)[:, 1])), 3)
    return {"scale": scale, "n_train": n_train, "n_test_per_profile": n_test, "trained_on": "charite-like",
            "classifier": "logistic regression on masked-HU histogram (-20..120 HU, 10 HU bins), "
                          "mean/SD HU of ICH and PHE, log voxel counts (true masks)",
            "auc": aucs,
            "auc_same_patients_development_scanner": aucs_dev_scanner}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-cases", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--paper-cases", type=int, default=3)
    ap.add_argument("--profile", default="charite-like")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cohort.json"))
    ap.add_argument("--shift", action="store_true", help="run only the site-shift experiment")
    ap.add_argument("--shift-train", type=int, default=300)
    ap.add_argument("--shift-test", type=int, default=200)
    ap.add_argument("--shift-scale", default="demo")
    args = ap.parse_args(argv)
    from shared.plumbing.atomic import write_json

    if args.shift:
        t0 = time.perf_counter()
        res = shift_experiment(args.shift_train, args.shift_test, args.shift_scale)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(ROOT / "benchmarks" / "results" / "cohort_shift.json", res)
        print(json.dumps(res, indent=2))
        return 0

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    runs = [run_one(args.profile, n, "demo") for n in args.demo_cases]
    if args.paper_cases:
        runs.append(run_one(args.profile, args.paper_cases, "paper"))
    demo = [r for r in runs if r["scale"] == "demo"]
    result = {
        "benchmark": "cohort",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in os.getloadavg()]},
        "runs": runs,
        "targets": {"demo_100_cases_s": 60.0, "paper_case_s": 3.0},
        "peak_rss_ratio_largest_vs_smallest_n": round(demo[-1]["peak_rss_mb"] / demo[0]["peak_rss_mb"], 3)
        if len(demo) > 1 else None,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
