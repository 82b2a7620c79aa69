"""Which classifier recipe learns the class signal: a sweep over training-set size, schedule and crop.

Motivation: the ResNet-34 is trained from scratch (no pretrained weights can be downloaded), and
the demo profile must train it on 2 CPU cores. This sweep, run once on a GPU, says how many cases,
epochs and voxels it needs, and so sizes the demo profile (``server/bootstrap.py``).

Data (``--make-data``, CPU, about 10 min): a ``charite-like`` demo-scale cohort (seed 1, so
none of its cases is in a bootstrap cohort). Training crops come from the true masks, evaluation
crops from a demo bundle's nnU-Net masks, as in ``ichfed bootstrap``. Crops are stored as uint8
(the [0, 1] normalised crop times 255) in one ``.npz``.

Each recipe trains ``shared.models.classifier.train_classifier`` and reports the AUC of the kept model
on the evaluation crops from predicted masks and from the true masks. A logistic regression on
log ICH and log PHE voxel counts gives a reference for what the masks alone carry. Smaller crops
are made by area-averaging the 50 x 50 in-plane grid (the mask re-thresholded at half cover).

    python benchmarks/bench_classifier_recipes.py --make-data --bundle demo_out/bundle
    python benchmarks/bench_classifier_recipes.py --device cuda --budget-s 240

Writes ``benchmarks/results/classifier_recipes_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _common import device_info

DEFAULT_DATA = ROOT / "build" / "classifier_recipes" / "crops.npz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-data", action="store_true", help="generate the crops file and stop")
    parser.add_argument("--bundle", type=Path, help="bundle whose nnU-Net makes the evaluation masks (--make-data)")
    parser.add_argument("--cases", type=int, default=520)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--device", default="cuda", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no recipe after this many seconds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.make_data:
        if args.bundle is None:
            parser.error("--make-data needs --bundle")
        make_data(args.bundle, args.cases, args.data)
        return 0
    from shared.plumbing.atomic import write_json

    dev = device_info(args.device)
    out = args.out or ROOT / "benchmarks" / "results" / f"classifier_recipes_{dev['used']}.json"
    result = sweep(args.data, dev["used"], args.budget_s, lambda r: write_json(out, {**r, "device": dev}))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


def make_data(bundle: Path, n_cases: int, out: Path, n_eval: int = 140) -> None:
    """Write train (true-mask) and eval (predicted- and true-mask) demo crops to ``out``."""
    from server.bootstrap import RECIPES
    from shared.imaging.crop import make_crop
    from shared.imaging.ingest import read_image
    from shared.imaging.sitedata import read_mask, read_site
    from shared.models.segment import Segmenter
    from simulations.cohort import write_cohort

    spec = dataclasses.replace(RECIPES["demo"].crop, size_xyz=(50, 50, 20), spacing_mm=(1.8, 1.8, 5.0))
    site_dir = out.parent / "cohort"
    if not (site_dir / "cases.csv").exists():
        write_cohort("charite-like", n_cases, 1, site_dir, scale="demo")
    cases = [c for c in read_site(site_dir).cases if c.mask_path is not None]
    train, held = cases[:-n_eval], cases[-n_eval:]

    def q(a: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)

    tx, ty = [], []
    for c in train:
        img = read_image(c.image_path).image
        crop = make_crop(img, read_mask(c.mask_path, img), spec)
        if crop.lesion_found:
            tx.append(q(crop.array))
            ty.append(c.label)
    seg = Segmenter(Path(bundle) / "nnunet", device="cpu")
    ex, ey, eg = [], [], []
    for c in held:
        img = read_image(c.image_path).image
        pred = make_crop(img, seg.predict(img), spec)
        gt = make_crop(img, read_mask(c.mask_path, img), spec)
        if pred.lesion_found and gt.lesion_found:
            ex.append(q(pred.array))
            ey.append(c.label)
            eg.append(q(gt.array))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, train_x=np.stack(tx), train_y=np.array(ty), eval_x=np.stack(ex),
                        eval_y=np.array(ey), eval_gt_x=np.stack(eg))


def shrink(x: np.ndarray, size: int) -> np.ndarray:
    """Area-average (N, z, 50, 50) crops to (N, z, size, size); voxels under half lesion cover become 0."""
    import torch

    if x.shape[-1] == size:
        return x
    t = torch.from_numpy(x)[:, None]
    shape = (x.shape[1], size, size)
    v = torch.nn.functional.interpolate(t, size=shape, mode="area")
    cover = torch.nn.functional.interpolate((t > 0).float(), size=shape, mode="area")
    return torch.where(cover >= 0.5, v / cover.clamp_min(1e-6), torch.zeros_like(v))[:, 0].numpy()


def recipes():
    from server.training.classifier_augment import AugmentationConfig
    from server.training.classifier_training import ClassifierTrainConfig

    # The demo profile as it was when the sweep ran: 15 epochs with augmentation, all crops for BatchNorm.
    base = ClassifierTrainConfig(epochs=15, batch_size=8, learning_rate=1e-3, keep="best_val_loss",
                                 precise_batchnorm=True, batchnorm_samples=1_000_000)
    noaug = AugmentationConfig(enabled=False)

    def c(**kw):
        return dataclasses.replace(base, **kw)

    return [  # (name, in-plane size, training cases, config)
        ("s50_n58_15ep", 50, 58, base),
        ("s50_n380_15ep", 50, 380, base),
        ("s50_lr3e-4_n380_15ep", 50, 380, c(learning_rate=3e-4)),
        ("s50_noaug_n380_15ep", 50, 380, c(augmentation=noaug)),
        ("s50_n150_15ep", 50, 150, base),
        ("s50_lr1e-4_n380_15ep", 50, 380, c(learning_rate=1e-4)),
        ("s25_noaug_n380_8ep", 25, 380, c(epochs=8, augmentation=noaug)),
        ("s32_noaug_n380_6ep", 32, 380, c(epochs=6, augmentation=noaug)),
        ("s50_noaug_n380_4ep", 50, 380, c(epochs=4, augmentation=noaug)),
        ("s25_n380_8ep", 25, 380, c(epochs=8)),
        ("s25_noaug_n250_8ep", 25, 250, c(epochs=8, augmentation=noaug)),
        ("s32_noaug_n250_6ep", 32, 250, c(epochs=6, augmentation=noaug)),
        ("s25_noaug_bs16_n380_10ep", 25, 380, c(epochs=10, batch_size=16, augmentation=noaug)),
        ("s25_noaug_lr3e-4_n380_8ep", 25, 380, c(epochs=8, learning_rate=3e-4, augmentation=noaug)),
        ("s32_n380_8ep", 32, 380, c(epochs=8)),
        ("s25_noaug_n150_10ep", 25, 150, c(epochs=10, augmentation=noaug)),
    ]


def sweep(data: Path, device: str, budget_s: float, save) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from server.training.classifier_training import train_classifier
    from shared.models.classifier import predict_log_probs

    def predict_proba(model, crops, device):
        return np.exp(predict_log_probs(model, crops, device)[:, 1])

    d = np.load(data)
    tx, ty = d["train_x"].astype(np.float32) / 255, d["train_y"]
    ex, ey, eg = d["eval_x"].astype(np.float32) / 255, d["eval_y"], d["eval_gt_x"].astype(np.float32) / 255

    def volumes(c: np.ndarray) -> np.ndarray:  # ICH is bright (> ~43 HU), PHE the rest of the mask
        return np.c_[np.log((c > 0.45).sum((1, 2, 3)) + 1), np.log(((c > 0) & (c <= 0.45)).sum((1, 2, 3)) + 1)]

    lr = LogisticRegression().fit(volumes(tx), ty)
    result = {"data": {"train": [len(ty), int(ty.sum())], "eval": [len(ey), int(ey.sum())]},
              "volume_logistic_auc": {"predicted_masks": roc_auc_score(ey, lr.predict_proba(volumes(ex))[:, 1]),
                                      "true_masks": roc_auc_score(ey, lr.predict_proba(volumes(eg))[:, 1])},
              "runs": []}
    t_all = time.perf_counter()
    for name, size, n, cfg in recipes():
        if time.perf_counter() - t_all > budget_s:
            result["runs"].append({"name": name, "skipped": "budget"})
            continue
        idx = np.sort(np.random.default_rng(0).choice(len(ty), size=min(n, len(ty)), replace=False))
        try:
            a, b, g = shrink(tx[idx], size), shrink(ex, size), shrink(eg, size)
            t = time.perf_counter()
            r = train_classifier(a, ty[idx], b, ey, cfg, device=device, seed=0)
            row = {"name": name, "size": size, "n": len(idx), "epochs": cfg.epochs,
                   "wall_s": round(time.perf_counter() - t, 1),
                   "auc_predicted_masks": roc_auc_score(ey, predict_proba(r.model, b, device)),
                   "auc_true_masks": roc_auc_score(ey, predict_proba(r.model, g, device)),
                   "val_auc_per_epoch": [h["val_auc"] for h in r.history]}
        except Exception:
            row = {"name": name, "error": traceback.format_exc()[-600:]}
        result["runs"].append(row)
        save(result)
        print(name, {k: row.get(k) for k in ("wall_s", "auc_predicted_masks", "auc_true_masks")}, flush=True)
    save(result)
    return result


if __name__ == "__main__":
    sys.exit(main())
