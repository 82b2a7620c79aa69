"""Benchmark what cross-fitting does to the federated threshold, on synthetic embeddings.

Synthetic, not CT: each site's cases are 512-d Gaussian embeddings whose first 64 features carry
the class (shift ``--signal``) plus a per-site offset (domain shift), so a 1,026-parameter head
separates a dozen fine-tune cases perfectly. ``--sites`` sites with ``--fine-tune`` fine-tune and
``--held-out`` held-out cases each run ``--rounds`` rounds of FedAvg over the main head and K fold
heads with the ichfed client code (``client.cross_fit``, ``client.calibrate``). Each site then
places the federated threshold by the midpoint rule twice: on the main head's own (in-sample)
fine-tune scores, and on the fold heads' out-of-fold scores. Both thresholds are applied to the
same held-out cases; reported as mean ± SD over ``--seeds`` seeds of the pooled held-out
sensitivity, specificity and balanced accuracy (AUC does not depend on the threshold).

    python benchmarks/bench_cross_fit.py

Writes ``benchmarks/results/cross_fit.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _site(rng, n_fine: int, n_held: int, signal: float, dims: int = 64):
    """Fine-tune and held-out embeddings of one site (balanced classes, a site-wide offset)."""
    offset = rng.normal(scale=0.5, size=512)

    def draw(n):
        y = np.array([1] * (n // 2) + [0] * (n - n // 2), np.int64)
        x = rng.normal(size=(n, 512)) + offset
        x[:, :dims] += (2 * y[:, None] - 1) * signal / 2
        return x.astype(np.float32), y

    return draw(n_fine), draw(n_held)


def _run(seed: int, args) -> dict:
    from client.calibrate import site_threshold
    from client.cross_fit import case_folds, cross_fit_scores, train_head_set
    from client.features import Part
    from client.finetune import train_head
    from client.seeds import cross_fit_seed, fold_head_seed, round_seed
    from shared.models.head import Head, HeadSet

    rng = np.random.default_rng(seed)
    sites = [_site(rng, args.fine_tune, args.held_out, args.signal) for _ in range(args.sites)]
    parts = [Part(features=x, labels=y, n_no_lesion=0, dice_ich=[], dice_phe=[], has_masks=False,
                  case_ids=tuple(f"s{i}-c{j:03d}" for j in range(len(y)))) for i, ((x, y), _) in enumerate(sites)]
    (xr, yr), _ = _site(rng, 40, 0, args.signal)  # the "bundle's" head: trained elsewhere, weakly
    start = train_head(Head(np.zeros((2, 512), np.float32), np.zeros(2, np.float32)), xr, yr, epochs=3,
                       learning_rate=1e-2, batch_size=16, seed=seed).head
    heads = HeadSet(main=start, folds=(start,) * args.folds)
    folds = [case_folds(p, args.folds, cross_fit_seed(seed + i)) for i, p in enumerate(parts)]
    for r in range(1, args.rounds + 1):
        updates = []
        for i, part in enumerate(parts):
            def train(h, x, y, k, i=i):
                s = round_seed(seed + i, r) if k < 0 else fold_head_seed(seed + i, r, k)
                out = train_head(h, x, y, epochs=args.epochs, learning_rate=args.lr, batch_size=16, seed=s)
                return out.head, out.loss
            updates.append(train_head_set(heads, part, folds[i], train)[0].to_arrays())
        weights = [p.n for p in parts]
        mean = {k: sum(u[k] * w for u, w in zip(updates, weights)) / sum(weights) for k in updates[0]}
        heads = HeadSet.from_arrays({k: v.astype(np.float32) for k, v in mean.items()})
    counts = {rule: {"tp": 0, "fn": 0, "tn": 0, "fp": 0} for rule in ("in-sample", "cross-fit")}
    for i, (part, (_, (xh, yh))) in enumerate(zip(parts, sites)):
        rules = {"in-sample": heads.main.p_neoplastic(part.features),
                 "cross-fit": cross_fit_scores(heads, part, folds[i])}
        held = heads.main.p_neoplastic(xh)
        for rule, scores in rules.items():
            t = site_threshold(part.labels, scores, 0.5).p
            pred = held >= t
            c = counts[rule]
            c["tp"] += int((pred & (yh == 1)).sum())
            c["fn"] += int((~pred & (yh == 1)).sum())
            c["tn"] += int((~pred & (yh == 0)).sum())
            c["fp"] += int((pred & (yh == 0)).sum())
    out = {}
    for rule, c in counts.items():
        sens, spec = c["tp"] / (c["tp"] + c["fn"]), c["tn"] / (c["tn"] + c["fp"])
        out[rule] = {"sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--fine-tune", type=int, default=12)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--signal", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cross_fit.json")
    args = parser.parse_args()
    from shared.plumbing.atomic import write_json

    t0 = time.perf_counter()
    runs = [_run(s, args) for s in range(args.seeds)]
    summary = {}
    for rule in ("in-sample", "cross-fit"):
        summary[rule] = {m: {"mean": round(statistics.mean(r[rule][m] for r in runs), 4),
                             "sd": round(statistics.stdev(r[rule][m] for r in runs), 4) if len(runs) > 1 else 0.0}
                         for m in ("sensitivity", "specificity", "balanced_accuracy")}
    result = {"what": "pooled held-out sensitivity / specificity of the federated head at each site's threshold, "
                      "placed on in-sample vs cross-fit out-of-fold fine-tune scores; synthetic 512-d embeddings",
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "summary_mean_sd_over_seeds": summary, "runs": runs,
              "wall_s": round(time.perf_counter() - t0, 1)}
    write_json(args.out, result)
    for rule, m in summary.items():
        print(f"{rule:10s} " + "  ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" for k, v in m.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
