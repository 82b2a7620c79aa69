"""Which reference classifier for the demo profile? The recipe sweep of issue 19, on true-mask crops.

Data (cheap, no nnU-Net; cached in ``--data``): the demo development cohort (``charite-like``, seed 0, as
``ichfed bootstrap --profile demo`` writes it) split as bootstrap splits it (train / validation), 400
further development cases (seed 1, never trained on) and 100 cases of each external profile (seed 2).
Every crop and volume comes from the true masks, so these are classifier-only figures (ceilings of the
end-to-end pipeline, which ``bench_reference.py`` measures with predicted masks).

Candidates, each over ``--seeds`` (mean ± SD of the AUCs, each AUC with its DeLong 95 % CI):
- ``volume``: the volume baseline (``shared.models.volume_baseline``), the bar to clear;
- ``cnn``: the demo recipe (ResNet-34 from scratch, ``ClassifierTrainConfig.demo``);
- ``hybrid``: what the demo recipe ships (``server/bootstrap_head.py``): the CNN trained without a 20 %
  stacking part, then a logistic regression on [the CNN's logit, the three standardised log volumes] fitted
  on that part (C by validation log-loss) and folded into a ``Linear(515, 2)``;
- ``cnn-long``: the CNN trained 3x longer (more epochs), keeping the best validation epoch.

    python benchmarks/bench_reference_sweep.py --make-data
    python benchmarks/bench_reference_sweep.py --seeds 0 1 2 --candidates volume cnn hybrid

Writes ``benchmarks/results/reference_sweep.json`` with every per-seed, per-set value and the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

DEFAULT_DATA = ROOT / "build" / "reference_sweep" / "crops.npz"
EXTERNAL = ("hamburg-like", "community-hospital", "lowdose-mobile", "oncology-referral")
Z95 = 1.959963984540054


def _crops_of(profile: str, indices: range, seed: int, crop_spec) -> dict[str, np.ndarray]:
    from shared.pipeline import prepare
    from simulations.cohort import make_case

    crops, labels, vols = [], [], []
    for k in indices:
        case = make_case(profile, k, seed, scale="demo")
        image, mask = case.images()
        prep = prepare(image, crop_spec, mask=mask)
        if prep.crop.lesion_found:
            crops.append((np.clip(prep.crop.array, 0, 1) * 255).round().astype(np.uint8))
            labels.append(case.record.label)
            vols.append((prep.volumetrics.ich_ml, prep.volumetrics.phe_ml))
    return {"crops": np.stack(crops), "labels": np.asarray(labels), "volumes": np.asarray(vols)}


def make_data(path: Path, n_dev: int, n_heldout: int, n_external: int) -> None:
    """Write the crops file: development train/val (bootstrap's split of seed 0), held-out dev, externals."""
    from server.bootstrap import RECIPES, split_cases
    from shared.plumbing.atomic import atomic_path

    recipe = RECIPES["demo"]
    dev = _crops_of("charite-like", range(n_dev), 0, recipe.crop)
    # bootstrap's own split of the development cases (train / validation / test), by index
    cases = [dataclasses.make_dataclass("C", ["i", "label"])(i, int(y)) for i, y in enumerate(dev["labels"])]
    split = split_cases(cases, recipe.test_fraction, recipe.validation_fraction, seed=0)
    parts = {"train": [c.i for c in split.train], "val": [c.i for c in split.validation]}
    arrays = {}
    for part, idx in parts.items():
        for key in ("crops", "labels", "volumes"):
            arrays[f"{part}_{key}"] = dev[key][idx]
    sets = {"heldout": _crops_of("charite-like", range(n_heldout), 1, recipe.crop)}
    for profile in EXTERNAL:
        sets[profile] = _crops_of(profile, range(n_external), 2, recipe.crop)
    for name, d in sets.items():
        for key in ("crops", "labels", "volumes"):
            arrays[f"{name}_{key}"] = d[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    print(f"wrote {path}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items() if k.endswith("_labels")))


def _auc_ci(y: np.ndarray, p: np.ndarray) -> dict:
    from shared.evaluation.rocstats import delong_auc

    est = delong_auc(y, p)
    se = math.sqrt(est.variance)
    return {"auc": est.estimate, "ci": [est.estimate - Z95 * se, est.estimate + Z95 * se], "n": int(len(y))}


def _part(data: dict, name: str, idx: np.ndarray | None = None) -> dict:
    """A set as bootstrap's parts are dicts (crops, labels, volumes), optionally a subset of its rows."""
    part = {key: data[f"{name}_{key}"] for key in ("crops", "labels", "volumes")}
    return part if idx is None else {k: v[idx] for k, v in part.items()}


def run_candidate(name: str, data: dict, seed: int, sets: list[str]) -> dict:
    """Scores of one candidate on every evaluation set."""
    from server.bootstrap_head import reference_model, stacking_split
    from server.training.classifier_training import (
        ClassifierTrainConfig,
        train_classifier,
    )
    from shared.models.classifier import predict_log_probs
    from shared.models.volume_baseline import VolumeBaseline

    t0 = time.perf_counter()
    extra: dict = {}
    if name == "volume":
        v = data["train_volumes"]
        model = VolumeBaseline.fit(v[:, 0], v[:, 1], data["train_labels"])
        scores = {s: model.p_neoplastic(data[f"{s}_volumes"][:, 0], data[f"{s}_volumes"][:, 1]) for s in sets}
    else:
        cfg = ClassifierTrainConfig.demo()
        if name == "cnn-long":
            cfg = dataclasses.replace(cfg, epochs=cfg.epochs * 3)
        # The hybrid CNN trains without the stacking part its head is then fitted on, exactly as bootstrap does.
        cnn_idx, stack_idx = (stacking_split(data["train_labels"], 0.2, seed) if name == "hybrid"
                              else (np.arange(len(data["train_labels"])), None))
        result = train_classifier(data["train_crops"][cnn_idx], data["train_labels"][cnn_idx], data["val_crops"],
                                  data["val_labels"], cfg, device="cpu", seed=seed)
        if name == "hybrid":
            ref = reference_model(result.model, "hybrid", _part(data, "train"), _part(data, "train", stack_idx),
                                  _part(data, "val"), "cpu")
            scores = {s: ref.p_neoplastic(_part(data, s), "cpu") for s in sets}
            extra["head_fit"] = ref.fit
        else:
            scores = {s: np.exp(predict_log_probs(result.model, data[f"{s}_crops"], "cpu")[:, 1]) for s in sets}
        extra["history"] = result.history
    return {"candidate": name, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
            "sets": {s: _auc_ci(data[f"{s}_labels"], scores[s]) for s in sets}, **extra}


def summarise(runs: list[dict]) -> dict:
    """Mean ± SD over seeds of each candidate's AUC per set, and the mean within-site AUC of the externals."""
    out: dict = {}
    for cand in sorted({r["candidate"] for r in runs}):
        rs = [r for r in runs if r["candidate"] == cand]
        per_set = {}
        for s in rs[0]["sets"]:
            vals = [r["sets"][s]["auc"] for r in rs]
            per_set[s] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                          "per_seed": vals}
        ext = [float(np.mean([r["sets"][p]["auc"] for p in EXTERNAL if p in r["sets"]])) for r in rs]
        out[cand] = {"sets": per_set, "mean_external_site_auc": {"mean": float(np.mean(ext)), "per_seed": ext}}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-data", action="store_true")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--dev-cases", type=int, default=480)
    ap.add_argument("--heldout-cases", type=int, default=400)
    ap.add_argument("--external-cases", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--candidates", nargs="+", default=["volume", "cnn", "hybrid"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reference_sweep.json")
    args = ap.parse_args()
    if args.make_data:
        make_data(args.data, args.dev_cases, args.heldout_cases, args.external_cases)
        return 0
    raw = np.load(args.data)
    data = {k: (raw[k].astype(np.float32) / 255.0 if k.endswith("_crops") else raw[k]) for k in raw.files}
    sets = ["val", "heldout", *EXTERNAL]
    from shared.plumbing.atomic import write_json

    runs, load = [], [os.getloadavg()]
    for seed in args.seeds:
        for cand in args.candidates:
            if cand == "volume" and seed != args.seeds[0]:
                continue  # deterministic: one fit
            runs.append(run_candidate(cand, data, seed, sets))
            load.append(os.getloadavg())
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "history"}), flush=True)
            write_json(args.out, {"data": str(args.data), "n": {s: int(len(data[f"{s}_labels"])) for s in ["train", *sets]},
                                  "load_average": load, "summary": summarise(runs), "runs": runs})
    print(json.dumps(summarise(runs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
