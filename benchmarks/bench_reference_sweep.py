"""Which reference classifier for the demo profile? The recipe sweep of issue 19, on true-mask crops.

Data (cheap, no nnU-Net; cached in ``--data``): the demo development cohort (``charite-like``, seed 0, as
``ichfed bootstrap --profile demo`` writes it) split as bootstrap splits it (train / validation), 400
further development cases (seed 1, never trained on) and 100 cases of each external profile (seed 2).
Every crop and volume comes from the true masks, so these are classifier-only figures (ceilings of the
end-to-end pipeline, which ``bench_reference.py`` measures with predicted masks).

Candidates, each over ``--seeds`` (mean ± SD of the AUCs, each AUC with its DeLong 95 % CI):
- ``volume``: the volume baseline (``shared.models.volume_baseline``), the bar to clear;
- ``cnn``: the demo recipe (ResNet-34 from scratch, ``ClassifierTrainConfig.demo``);
- ``hybrid``: the same CNN, then its last layer refitted on the 512-d embedding plus the standardised log
  volumes (L2 logistic regression, C chosen on the validation part), the head ``--head hybrid`` ships;
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


def _embed(model, crops: np.ndarray) -> np.ndarray:
    from shared.models.classifier import backbone_and_head, embed

    backbone, _ = backbone_and_head(model)
    return embed(backbone, crops, "cpu", 32)


def _hybrid(model, data: dict, sets: list[str]) -> dict[str, np.ndarray]:
    """Refit the last layer on [embedding, standardised log volumes]; C by validation log-loss."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    from shared.models.volume_baseline import volume_features

    def feats(name):
        v = data[f"{name}_volumes"]
        return np.hstack([_embed(model, data[f"{name}_crops"]), volume_features(v[:, 0], v[:, 1])])

    x_tr, x_va = feats("train"), feats("val")
    scaler = StandardScaler().fit(x_tr)
    best = None
    for c in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0):
        lr = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x_tr), data["train_labels"])
        loss = log_loss(data["val_labels"], lr.predict_proba(scaler.transform(x_va))[:, 1])
        if best is None or loss < best[0]:
            best = (loss, c, lr)
    _, c, lr = best
    out = {name: lr.predict_proba(scaler.transform(feats(name)))[:, 1] for name in sets}
    out["_C"] = c
    return out


def run_candidate(name: str, data: dict, seed: int, sets: list[str]) -> dict:
    """Scores of one candidate on every evaluation set."""
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
        result = train_classifier(data["train_crops"], data["train_labels"], data["val_crops"], data["val_labels"],
                                  cfg, device="cpu", seed=seed)
        if name == "hybrid":
            scores = _hybrid(result.model, data, sets)
            extra["C"] = scores.pop("_C")
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
