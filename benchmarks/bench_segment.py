"""Benchmark nnU-Net segmentation: training time of a profile and CPU/GPU inference time per case.

Writes ``benchmarks/results/segment_<profile>.json``. Steps, each timed: a synthetic
``charite-like`` site (``simulations.cohort.write_cohort``), ``shared.training.segment_dataset.export_dataset`` on the
training cases, ``shared.training.segment_train.train`` (nnU-Net planning/preprocessing and training, in its
subprocess) and ``Segmenter.predict`` on held-out cases, with their ICH and PHE Dice.

Wall time depends on what else runs on the machine, so the load average is recorded too.

    python benchmarks/bench_segment.py --profile ci   --scale ci   --train-cases 7  --test-cases 3
    python benchmarks/bench_segment.py --profile demo --scale demo --train-cases 56 --test-cases 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("ci", "demo", "paper"), default="ci")
    parser.add_argument("--scale", choices=("ci", "demo", "paper"), default=None, help="cohort scale (default: profile)")
    parser.add_argument("--train-cases", type=int, default=7)
    parser.add_argument("--test-cases", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep everything here (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import numpy as np
    import SimpleITK as sitk

    from shared.imaging.ingest import read_image
    from shared.imaging.sitedata import read_mask, read_site
    from shared.models.segment import Segmenter
    from shared.training.segment_dataset import export_dataset
    from shared.training.segment_train import train
    from simulations.cohort import write_cohort

    scale = args.scale or args.profile
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_segment."))
    result: dict = {"profile": args.profile, "scale": scale, "seed": args.seed, "host": platform.node(),
                    "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "load_avg_start": os.getloadavg()}

    t0 = time.perf_counter()
    write_cohort("charite-like", args.train_cases + args.test_cases, args.seed, work / "site", scale=scale)
    site = read_site(work / "site")
    train_cases, test_cases = site.cases[: args.train_cases], site.cases[args.train_cases:]
    result["cohort_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    export_dataset(dataclasses.replace(site, cases=train_cases), work / "raw", dataset_id=501, name="ICH")
    result["export_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = train(work / "raw", 501, args.profile, work / "nnunet", seed=args.seed, device=args.device)
    result["train_s"] = time.perf_counter() - t0  # planning + preprocessing + training + copy

    t0 = time.perf_counter()
    segmenter = Segmenter(model, device=args.device)
    result["segmenter_init_s"] = time.perf_counter() - t0
    result["device"] = segmenter.device.type
    cases = []
    for case in test_cases:
        image = read_image(case.image_path).image
        truth = sitk.GetArrayFromImage(read_mask(case.mask_path, image))
        t0 = time.perf_counter()
        pred = sitk.GetArrayFromImage(segmenter.predict(image))
        seconds = time.perf_counter() - t0
        dice = {}
        for name, label in (("ich", 1), ("phe", 2)):
            p, t = pred == label, truth == label
            dice[name] = None if not t.any() else 2.0 * float((p & t).sum()) / float(p.sum() + t.sum())
        cases.append({"case_id": case.case_id, "size_xyz": list(image.GetSize()), "predict_s": seconds,
                      "dice_ich": dice["ich"], "dice_phe": dice["phe"]})
    result["cases"] = cases
    for key in ("predict_s", "dice_ich", "dice_phe"):
        values = [c[key] for c in cases if c[key] is not None]
        result[f"mean_{key}"] = float(np.mean(values)) if values else None
    result["load_avg_end"] = os.getloadavg()

    out = args.out or ROOT / "benchmarks" / "results" / f"segment_{args.profile}.json"
    from shared.plumbing.atomic import write_json

    write_json(out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
