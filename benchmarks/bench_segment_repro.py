"""Is nnU-Net training reproducible? Train the same small model several times and compare weights and Dice.

The test suite's fixture recipe (``ci`` trainer, 96 iterations) on 7 cases of
``write_cohort("charite-like", 10, seed=0, scale="ci")``; the other 3 cases are held out. Each run trains
from scratch in its own folder with the same seed and ``--threads`` torch threads, then hashes every
weight tensor (sha256 over names and bytes) and segments the held-out cases. Issue 25, docs/segmentation.md
("Reproducibility"). Writes ``benchmarks/results/segment_repro.json`` (runs are appended per thread count).

    python benchmarks/bench_segment_repro.py --threads 2 --runs 2
    python benchmarks/bench_segment_repro.py --threads 1 --runs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout


def weights_digest(model_dir: Path) -> tuple[str, dict]:
    """sha256 over every weight tensor's name and bytes, and the tensors (for a max-difference check)."""
    import torch

    ckpt = next(Path(model_dir).rglob("checkpoint_final.pth"))
    weights = torch.load(ckpt, map_location="cpu", weights_only=True)["network_weights"]
    h = hashlib.sha256()
    for k in sorted(weights):
        h.update(k.encode("utf-8"))
        h.update(weights[k].numpy().tobytes())
    return h.hexdigest(), weights


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "segment_repro.json")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import SimpleITK as sitk

    from shared.evaluation.segmentation import score_labels
    from shared.imaging.ingest import read_image
    from shared.imaging.sitedata import read_mask, read_site
    from shared.models.segment import Segmenter
    from shared.training.segment_dataset import export_dataset
    from shared.training.segment_train import train
    from simulations.cohort import write_cohort

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_segment_repro."))
    site_dir = work / "site"
    if not (site_dir / "cases.csv").exists():
        write_cohort("charite-like", 10, 0, site_dir, scale="ci")
    site = read_site(site_dir)
    train_cases, held_out = site.cases[:7], site.cases[7:]
    if not (work / "raw").exists():
        export_dataset(dataclasses.replace(site, cases=train_cases), work / "raw", dataset_id=501, name="ICH")
    runs, first = [], None
    for r in range(args.runs):
        t0 = time.perf_counter()
        model = train(work / "raw", 501, "ci", work / f"t{args.threads}-run{r}", seed=0, num_threads=args.threads)
        seconds = time.perf_counter() - t0
        digest, weights = weights_digest(model)
        segmenter = Segmenter(model, device="cpu")
        dice = []
        for c in held_out:
            image = read_image(c.image_path).image
            truth = sitk.GetArrayFromImage(read_mask(c.mask_path, image))
            pred = sitk.GetArrayFromImage(segmenter.predict(image))
            dice.append(round(score_labels(pred, truth, 1.0).ich_dice or 0.0, 4))
        row = {"threads": args.threads, "run": r, "weights_sha256": digest, "held_out_ich_dice": dice,
               "train_s": round(seconds, 1), "load_average": os.getloadavg()}
        if first is None:
            first = weights
        else:
            diffs = [float((first[k].float() - weights[k].float()).abs().max()) for k in first]
            row["tensors_differing_from_run0"] = sum(d > 0 for d in diffs)
            row["max_abs_difference_from_run0"] = max(diffs)
        runs.append(row)
        print(json.dumps(row), flush=True)
    previous = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {"runs": []}
    kept = [r for r in previous["runs"] if r["threads"] != args.threads]
    result = {"recipe": "ci", "cases": "charite-like ci scale seed 0, 7 train / 3 held out", "host_cpus": os.cpu_count(),
              "runs": kept + runs}
    from shared.plumbing.atomic import write_json

    write_json(args.out, result)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
