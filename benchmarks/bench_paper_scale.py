"""Benchmark a paper-scale case through a paper-profile pipeline (CPU, or the GPU when lent).

``bench_predict.py`` times whatever bundle it is given; the demo bundle resamples a paper-scale
image to 1.8 mm before nnU-Net sees it, so its "paper case" is cheap. This script times what a
hospital running the *paper* profile would run:

* nnU-Net ``3d_fullres`` with the plans that nnU-Net's own planner makes for paper-scale images
  (0.45 x 0.45 x 5 mm, full network width), planned here on 5 synthetic paper-scale cases;
* the ResNet-34 on the paper's 200 x 200 x 20 crop.

Both networks have untrained (random, seeded) weights: timing does not depend on the weight
values, and training the paper profile takes a GPU for hours. The bundle is real: built by
``shared.bundle.create_bundle`` and signed with a throwaway key, so the timed ``ichfed predict``
verifies it exactly as in production. Because a random nnU-Net finds no lesion or noise, the
crop and classifier stages are also timed in-process on the case's true mask.

    python benchmarks/bench_paper_scale.py --device cpu           # plans here, ~3 min
    python benchmarks/bench_paper_scale.py --device cuda --plans-dir DIR

``--plans-dir`` takes a folder with ``dataset.json`` and ``nnUNetPlans.json`` (as written to
``WORK_DIR/plans`` by an earlier run), so a machine without the planning time can reuse them.
Writes ``benchmarks/results/paper_scale_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
from _common import device_info

log = logging.getLogger("bench_paper_scale")
TARGET_CPU_S = 90.0
TARGET_H100_S = 5.0
PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--plans-dir", type=Path, default=None,
                        help="folder with dataset.json and nnUNetPlans.json (default: plan with nnU-Net here)")
    parser.add_argument("--repeats", type=int, default=3, help="warm in-process repetitions of each stage")
    parser.add_argument("--tile-step-size", type=float, default=0.5, help="nnU-Net sliding-window step (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench_paper_scale")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from shared.plumbing.atomic import write_json

    dev = device_info(args.device)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plans_dir = args.plans_dir or _plan(work, args.seed)
    plan_s = time.perf_counter() - t0
    bundle, pubkey = _timing_bundle(plans_dir, work / dev["used"], args.seed)
    case = _write_case(work / "cases", args.seed)

    result: dict = {
        "benchmark": "paper_scale",
        "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": dev,
        "weights": "untrained (random, seeded): timing only",
        "planning_s": None if args.plans_dir else round(plan_s, 1),
        "nnunet": _plans_summary(plans_dir),
        "case": {k: v for k, v in case.items() if k not in ("path", "mask_path")},
        "load_avg_start": os.getloadavg(),
    }
    result["tile_step_size"] = args.tile_step_size
    result["cli"] = _run_cli(case, bundle, pubkey, args.device, args.tile_step_size)
    result["warm_stages"] = _warm_stages(case, bundle, pubkey, args.device, args.repeats, args.tile_step_size)
    target = TARGET_H100_S if dev["used"] == "cuda" else TARGET_CPU_S
    result["target_s"] = target
    result["pass_cli_wall"] = result["cli"]["wall_s"] <= target
    result["pass_warm_case"] = result["warm_stages"]["case_median_s"] <= target
    result["load_avg_end"] = os.getloadavg()
    suffix = "" if args.tile_step_size == 0.5 else f"_step{args.tile_step_size:g}"
    out = args.out or ROOT / "benchmarks" / "results" / f"paper_scale_{dev['used']}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(json.dumps({k: result[k] for k in ("device", "cli", "warm_stages", "target_s")}, indent=1))
    print(f"wrote {out}")
    return 0


def _plan(work: Path, seed: int) -> Path:
    """nnU-Net's fingerprint extractor and planner (``paper`` profile) on 5 synthetic paper-scale cases."""
    from shared.imaging.sitedata import read_site
    from shared.training.segment_dataset import export_dataset
    from shared.training.segment_train import plan
    from simulations.cohort import write_cohort

    out = work / "plans"
    if (out / f"{PLANS_NAME}.json").is_file():
        return out
    site_dir = work / "plan_cohort"
    if not (site_dir / "cases.csv").is_file():
        write_cohort("charite-like", 5, seed, site_dir, scale="paper")
    export_dataset(read_site(site_dir), work / "raw", dataset_id=502, name="ICHpaper")
    folder = plan(work / "raw", 502, "paper", work / "nnunet", seed)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", f"{PLANS_NAME}.json"):
        shutil.copy2(folder / name, out / name)
    return out


def _plans_summary(plans_dir: Path) -> dict:
    plans = json.loads((plans_dir / f"{PLANS_NAME}.json").read_text(encoding="utf-8"))
    conf = plans["configurations"][CONFIGURATION]
    return {"configuration": CONFIGURATION, "patch_size": conf["patch_size"], "spacing": conf["spacing"],
            "features_per_stage": conf["architecture"]["arch_kwargs"]["features_per_stage"]}


def _timing_bundle(plans_dir: Path, root: Path, seed: int) -> tuple[Path, Path]:
    """A signed bundle with the planned nnU-Net and the ResNet-34, both with seeded random weights."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import (
        determine_num_input_channels,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from shared.bundle import create_bundle
    from shared.models.classifier import build_model
    from shared.models.segment_model import network_from_plans
    from shared.plumbing.config import CropSpec
    from shared.security.keys import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, generate_keypair

    bundle = root / "bundle"
    keys = root / "keys"
    if (bundle / "manifest.json").is_file():
        return bundle, keys / PUBLIC_KEY_NAME
    if root.exists():
        shutil.rmtree(root)
    dataset_json = json.loads((plans_dir / "dataset.json").read_text(encoding="utf-8"))
    plans = json.loads((plans_dir / f"{PLANS_NAME}.json").read_text(encoding="utf-8"))
    pm = PlansManager(plans)
    cm = pm.get_configuration(CONFIGURATION)
    torch.manual_seed(seed)
    net = network_from_plans("nnUNetTrainer", pm, cm, determine_num_input_channels(pm, cm, dataset_json),
                         pm.get_label_manager(dataset_json).num_segmentation_heads)
    model = root / "nnunet"
    (model / "fold_all").mkdir(parents=True)
    shutil.copy2(plans_dir / "dataset.json", model / "dataset.json")
    shutil.copy2(plans_dir / f"{PLANS_NAME}.json", model / "plans.json")
    # The slim checkpoint layout that ``shared.models.segment_model`` writes for its own trained models.
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": CONFIGURATION, "fold": "all"},
                "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 0},
               model / "fold_all" / "checkpoint_final.pth")
    generate_keypair(keys)
    create_bundle(bundle, build_model(), model, threshold=0.5, crop_spec=CropSpec(),
                  cohort={"note": "untrained weights for timing (benchmarks/bench_paper_scale.py)"},
                  name="ichfed-timing-paper", version="0.0.0", private_key=keys / PRIVATE_KEY_NAME)
    return bundle, keys / PUBLIC_KEY_NAME


def _write_case(out: Path, seed: int) -> dict:
    from simulations.cohort import make_case, write_nifti

    out.mkdir(parents=True, exist_ok=True)
    case = make_case("charite-like", 1000, seed, scale="paper")
    image, mask = case.images()
    path, mask_path = out / "paper-1000.nii.gz", out / "paper-1000_mask.nii.gz"
    if not path.is_file():
        write_nifti(image, path)
        write_nifti(mask, mask_path)
    return {"path": str(path), "mask_path": str(mask_path), "shape_xyz": list(image.GetSize()),
            "spacing_mm": [round(s, 4) for s in image.GetSpacing()]}


def _run_cli(case: dict, bundle: Path, pubkey: Path, device: str, tile_step_size: float) -> dict:
    """One cold ``ichfed predict --json`` process: start, imports, verification, load and the case."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "ichfed", "predict", "--bundle", str(bundle), "--pubkey", str(pubkey),
           "--device", device, "--tile-step-size", str(tile_step_size), "--json", case["path"]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"ichfed predict failed with exit code {proc.returncode}")
    rec = json.loads(proc.stdout.splitlines()[0])
    stage_sum = sum(rec["timings"].values())
    return {"wall_s": round(wall, 2), "timings": rec["timings"], "lesion_found": rec["lesion_found"],
            "startup_and_load_s": round(wall - stage_sum, 2)}


def _warm_stages(case: dict, bundle_path: Path, pubkey: Path, device: str, repeats: int,
                 tile_step_size: float) -> dict:
    """Stage times with the models loaded: segmentation, then crop + classifier on the true mask."""
    import SimpleITK as sitk

    from shared.bundle import load_bundle
    from shared.imaging.ingest import read_image
    from shared.pipeline import Predictor

    t0 = time.perf_counter()
    predictor = Predictor(load_bundle(bundle_path, pubkey), device=device, tile_step_size=tile_step_size)
    load_s = time.perf_counter() - t0
    rows = []
    for _ in range(max(1, repeats) + 1):  # the first pass warms up cuDNN / allocator and is dropped
        row = {}
        t = time.perf_counter()
        image = read_image(case["path"]).image
        row["ingest"] = time.perf_counter() - t
        t = time.perf_counter()
        predictor.segment(image)
        _sync(predictor)
        row["segmentation"] = time.perf_counter() - t
        truth = sitk.ReadImage(case["mask_path"])
        t = time.perf_counter()
        prepared = predictor.preprocess(image, truth)
        row["crop_and_volumes"] = time.perf_counter() - t
        t = time.perf_counter()
        predictor.p_neoplastic(predictor.head_features(prepared.crop.array[None], [prepared.volumetrics]))
        _sync(predictor)
        row["classification"] = time.perf_counter() - t
        row["case"] = sum(row.values())
        rows.append(row)
    rows = rows[1:]
    med = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
    return {"model_load_s": round(load_s, 2), "repeats": len(rows), "median_s": med,
            "case_median_s": med["case"], "crop_shape_zyx": list(prepared.crop.array.shape)}


def _sync(predictor) -> None:
    if predictor.device.type == "cuda":
        import torch

        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
