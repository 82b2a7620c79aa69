"""Benchmark what each site adaptation adds: local BatchNorm statistics, unlabelled cases, a regularised head.

Four simulated hospitals (hamburg-like, community-hospital, lowdose-mobile, oncology-referral, the
last on the real GE head CT background) with ``--cases-per-site`` labelled cases and
``--unlabelled-per-site`` more whose label is never read; 20 % of the labelled cases fine-tune,
the rest are held out; ``--rounds`` rounds of FedAvg of heads; ``--split-seeds`` repeats (only the
fine-tune / held-out split changes). Every case is segmented and cropped once by the shared
pipeline (``adaptation_prep``); each arm then runs the site-side functions ichfed uses
(``shared.models.batchnorm_stats``, ``client.finetune.local_update``, ``client.calibrate``,
``client.evaluate``) and the server's pooling (``server.pooling.pool_model``) in one process, so
ten arms cost minutes, not ten Flower simulations. All arms are scored on the same held-out cases.

Arms (``ARMS``): the reference model at the bundle's and at the site's threshold; the reference
model with the site's BatchNorm statistics; local-only and federated fine-tuning as in the paper
(plain last layer); federated with local statistics (fine-tune crops only, then with the unlabelled
cases too); federated with the regularised head (FedProx proximal term + early stopping by inner
folds); and local-only and federated with all three. Trained arms take their threshold from
out-of-fold scores of the fine-tune split (for federated heads: a local update from the previous
round's global head on the other folds), so every site threshold is out-of-sample.

    python benchmarks/bench_adaptation.py --bundle /tmp/coord/demo-bundle

Writes ``benchmarks/results/adaptation.json`` and ``.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import device_info  # noqa: E402

log = logging.getLogger("bench_adaptation")

PROFILES = ("hamburg-like", "community-hospital", "lowdose-mobile", "oncology-referral")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way a site could use the bundle. ``stats``: whose BatchNorm statistics embed the crops
    ("bundle", "fine-tune" crops, or "fine-tune+unlabelled"); ``training``: none, local or federated;
    ``regularised``: FedProx proximal term + early stopping; ``threshold``: bundle's or site's."""

    name: str
    stats: str
    training: str
    regularised: bool
    threshold: str
    local: str | None = None  # the local-only arm its paired "minus local" difference is against


ARMS = (
    Arm("reference", "bundle", "none", False, "bundle"),
    Arm("reference-site", "bundle", "none", False, "site"),
    Arm("reference+stats", "fine-tune+unlabelled", "none", False, "site"),
    Arm("local (paper)", "bundle", "local", False, "site"),
    Arm("local+all", "fine-tune+unlabelled", "local", True, "site"),
    Arm("federated (paper)", "bundle", "federated", False, "site", local="local (paper)"),
    Arm("federated+stats", "fine-tune", "federated", False, "site", local="local (paper)"),
    Arm("federated+stats+unlabelled", "fine-tune+unlabelled", "federated", False, "site", local="local (paper)"),
    Arm("federated+head", "bundle", "federated", True, "site", local="local (paper)"),
    Arm("federated+all", "fine-tune+unlabelled", "federated", True, "site", local="local+all"),
)
HEADLINE_ARM = "federated+all"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Head training settings shared by every trained arm (as the site config's)."""

    rounds: int
    local_epochs: int
    learning_rate: float
    batch_size: int
    proximal_mu: float


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--pubkey", type=Path, default=None, help="default: BUNDLE-keys/ beside the bundle")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--real-background", default="oncology-referral")
    parser.add_argument("--cases-per-site", type=int, default=60)
    parser.add_argument("--unlabelled-per-site", type=int, default=30)
    parser.add_argument("--fine-tune-fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--proximal-mu", type=float, default=None,
                        help="FedProx mu of the regularised arms (default: the site config's default)")
    parser.add_argument("--split-seeds", type=int, default=3)
    parser.add_argument("--only-split-seed", type=int, default=None,
                        help="run just this split seed (kept in WORK/runs/); run the seeds in parallel, then once "
                        "without this option to summarise")
    parser.add_argument("--scale", default="demo", choices=("ci", "demo"))
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (and first split seed)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--segmentation", default="nnunet", choices=("nnunet", "truth"),
                        help="crops from the bundle's nnU-Net (as at a site) or the cohorts' reference masks")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench_adaptation")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adaptation.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from adaptation_prep import prepare

    from shared.bundle import load_bundle
    from shared.plumbing.atomic import write_json, write_text
    from shared.security.keys import PUBLIC_KEY_NAME

    pubkey = args.pubkey or args.bundle.parent / f"{args.bundle.name}-keys" / PUBLIC_KEY_NAME
    bundle = load_bundle(args.bundle, pubkey)
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    work = args.work_dir / segmentation_key(bundle, args.segmentation)
    t0 = time.perf_counter()
    sites = prepare(work, bundle, profiles, args.cases_per_site, args.unlabelled_per_site, args.scale, args.seed,
                    args.real_background, args.device, args.segmentation)
    prep_s = time.perf_counter() - t0
    from client.adaptation import Adaptation

    mu = Adaptation().proximal_mu if args.proximal_mu is None else args.proximal_mu
    recipe = Recipe(args.rounds, args.local_epochs, args.learning_rate, args.batch_size, mu)
    t1 = time.perf_counter()
    seeds = [args.seed + k for k in range(args.split_seeds)]
    if args.only_split_seed is not None:
        seeds = [args.only_split_seed]
    runs = [cached_run(work / "runs", bundle, sites, s, args.fine_tune_fraction, recipe, args.device, args.scale)
            for s in seeds]
    if args.only_split_seed is not None:
        return 0
    result = {
        "benchmark": "adaptation",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "device": device_info(args.device),
        "bundle": {"path": str(args.bundle), "name": bundle.manifest.name, "version": bundle.manifest.version,
                   "hash": bundle.hash},
        "design": {"profiles": profiles, "real_background": args.real_background or None,
                   "cases_per_site": args.cases_per_site, "unlabelled_per_site": args.unlabelled_per_site,
                   "fine_tune_fraction": args.fine_tune_fraction, "scale": args.scale, "split_seeds": seeds,
                   "segmentation": args.segmentation,
                   "recipe": dataclasses.asdict(recipe), "arms": [dataclasses.asdict(a) for a in ARMS]},
        "sites": [{"name": s.name, "cases": len(s.case_ids), "unlabelled": int((s.labels < 0).sum()),
                   "no_lesion": int((~s.lesion_found).sum())} for s in sites],
        "runs": runs,
        "summary": summarise(runs),
        "wall_s": {"prepare": round(prep_s, 1), "arms": round(time.perf_counter() - t1, 1)},
    }
    result["targets"] = targets(result["summary"])
    write_json(args.out, result)
    text = render(result)
    write_text(args.out.with_suffix(".md"), text)
    print(text)
    print(f"wrote {args.out}")
    return 0


def segmentation_key(bundle, segmentation: str) -> str:
    """Crops depend on the segmentation (the bundle's nnU-Net files, or the reference masks) and the
    crop spec only, not on the classifier, so a new reference classifier reuses them."""
    import hashlib
    import json

    seg = bundle.nnunet_file_hashes if segmentation == "nnunet" else "truth"
    blob = json.dumps({"segmentation": seg, "crop": bundle.crop_spec.key()}, sort_keys=True)
    return f"{segmentation}-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- one split seed


def cached_run(folder: Path, bundle, sites, seed: int, fraction: float, recipe: Recipe, device: str,
               scale: str) -> dict[str, Any]:
    """``run_seed``, kept in ``folder`` keyed by bundle, design and seed (so seeds can run in parallel)."""
    import hashlib
    import json

    from shared.plumbing.atomic import write_json

    key = hashlib.sha256(json.dumps({"bundle": bundle.hash, "fraction": fraction, "recipe": dataclasses.asdict(recipe),
                                     "scale": scale, "sites": [s.name for s in sites],
                                     "arms": [dataclasses.asdict(a) for a in ARMS]},
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = folder / f"{key}-split-seed-{seed}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    run = run_seed(bundle, sites, seed, fraction, recipe, device)
    write_json(path, run)
    return run


def run_seed(bundle, sites, seed: int, fraction: float, recipe: Recipe, device: str) -> dict[str, Any]:
    """Every arm on every site for one split seed; the pooled figures per arm."""
    from server.pooling import pool_model

    views = [site_view(bundle, s, seed, fraction, device) for s in sites]
    heads = train_arms(bundle, views, recipe, seed, device)
    heads["_order"] = [v.name for v in views]
    rows = [{} for _ in views]
    for arm in ARMS:
        for i, v in enumerate(views):
            rows[i].update(site_metrics(arm, v, heads, float(bundle.threshold.p), recipe, seed, device))
    pooled = {arm.name: _slim(pool_model(rows, arm.name)) for arm in ARMS}
    for arm in ARMS:
        if arm.training == "federated" and arm.name != "federated (paper)":
            pooled[arm.name]["minus_paper_meta"] = _meta_of(rows, arm.name, "auc-minus-paper")
    log.info("split seed %d: %s", seed, {a: round(p["pooled_auc"] or float("nan"), 3) for a, p in pooled.items()})
    return {"split_seed": seed, "pooled": pooled,
            "sites": [{"n_fine_tune": v.parts["bundle"][0].n, "n_held_out": v.parts["bundle"][1].n,
                       "n_stats": v.n_stats} for v in views]}


@dataclasses.dataclass
class SiteView:
    """One site under one split: fine-tune / held-out ``Part`` per statistics variant."""

    name: str
    parts: dict[str, tuple[Any, Any]]
    n_stats: dict[str, int]


def site_view(bundle, site, seed: int, fraction: float, device: str) -> SiteView:
    """The split of the labelled cases and the features under each statistics variant.

    The statistics are estimated on crops with a lesion from the fine-tune split (plus the
    unlabelled cases for the "+unlabelled" variant); held-out crops never enter them.
    """
    from client.split import stratified_split
    from shared.models import batchnorm_stats
    from shared.models.classifier import embed

    labelled = {cid: int(y) for cid, y in zip(site.case_ids, site.labels) if y >= 0}
    split = stratified_split(labelled, fraction, seed)
    index = {cid: i for i, cid in enumerate(site.case_ids)}
    fine = np.array([index[c] for c in split.fine_tune])
    held = np.array([index[c] for c in split.held_out])
    unl = np.flatnonzero(site.labels < 0)
    backbone = _backbone(bundle)
    parts, n_stats = {}, {}
    for variant in ("bundle", "fine-tune", "fine-tune+unlabelled"):
        bb = backbone
        if variant != "bundle":
            pool = np.concatenate([fine, unl]) if variant.endswith("unlabelled") else fine
            pool = pool[site.lesion_found[pool]]
            stats = batchnorm_stats.estimate(backbone, site.crops[pool], device)
            bb = _adapted(backbone, stats)
            n_stats[variant] = int(len(pool))
        found = np.flatnonzero(site.lesion_found)
        feats = np.zeros((len(site.case_ids), 512), np.float32)
        feats[found] = embed(bb, site.crops[found], device)
        parts[variant] = (_part(site, feats, fine), _part(site, feats, held))
    return SiteView(site.name, parts, n_stats)


_BACKBONES: dict[str, Any] = {}


def _backbone(bundle):
    """The bundle's backbone, built once per process (never modified: statistics go on copies)."""
    from shared.models.classifier import backbone_and_head

    if bundle.hash not in _BACKBONES:
        _BACKBONES[bundle.hash] = backbone_and_head(bundle.build_classifier("cpu").eval())[0]
    return _BACKBONES[bundle.hash]


def _adapted(backbone, stats):
    import copy

    from shared.models import batchnorm_stats

    bb = copy.deepcopy(backbone)
    batchnorm_stats.apply(bb, stats)
    return bb


def _part(site, feats: np.ndarray, idx: np.ndarray):
    from client.features import Part

    ok = idx[site.lesion_found[idx]]
    no = idx[~site.lesion_found[idx]]
    return Part(features=feats[ok], labels=site.labels[ok].astype(np.int64), n_no_lesion=int(len(no)),
                n_no_lesion_pos=int((site.labels[no] == 1).sum()), dice_ich=[], dice_phe=[], has_masks=False)


def _reference_head(bundle):
    from shared.models.classifier import backbone_and_head
    from shared.models.head import Head

    _, fc = backbone_and_head(bundle.build_classifier("cpu"))
    return Head(weight=fc.weight.detach().numpy().astype(np.float32).copy(),
                bias=fc.bias.detach().numpy().astype(np.float32).copy())


def _update_kw(recipe: Recipe, regularised: bool, epochs: int, seed: int, device: str) -> dict[str, Any]:
    return dict(max_epochs=epochs, learning_rate=recipe.learning_rate, batch_size=recipe.batch_size, seed=seed,
                device=device, proximal_mu=recipe.proximal_mu if regularised else 0.0, early_stopping=regularised)


def train_arms(bundle, views: list[SiteView], recipe: Recipe, seed: int, device: str) -> dict[str, Any]:
    """``{arm: {"final": [head per site] | head, "previous": global head before the last round}}``."""
    from client.finetune import local_update

    ref = _reference_head(bundle)
    out: dict[str, Any] = {}
    for arm in ARMS:
        if arm.training == "none":
            out[arm.name] = {"final": ref}
        elif arm.training == "local":
            out[arm.name] = {"final": [local_update(ref, v.parts[arm.stats][0].features, v.parts[arm.stats][0].labels,
                                                    **_update_kw(recipe, arm.regularised,
                                                                 recipe.rounds * recipe.local_epochs,
                                                                 seed * 100_003, device)).head for v in views]}
        else:
            out[arm.name] = federate(ref, [v.parts[arm.stats][0] for v in views], recipe, arm.regularised, seed,
                                     device)
    return out


def federate(start, fine_parts, recipe: Recipe, regularised: bool, seed: int, device: str) -> dict[str, Any]:
    """FedAvg of heads weighted by fine-tune cases (as ``server.strategy``), ``recipe.rounds`` rounds."""
    from client.finetune import local_update
    from shared.models.head import Head

    head, previous = start, start
    for r in range(recipe.rounds):
        updates = [(local_update(head, p.features, p.labels,
                                 **_update_kw(recipe, regularised, recipe.local_epochs, seed * 100_003 + r + 1,
                                              device)).head, p.n) for p in fine_parts if p.n]
        total = sum(n for _, n in updates)
        previous, head = head, Head(weight=sum(h.weight * (n / total) for h, n in updates).astype(np.float32),
                                    bias=sum(h.bias * (n / total) for h, n in updates).astype(np.float32))
    return {"final": head, "previous": previous}


def oof_scores(start, part, kw: dict[str, Any]) -> np.ndarray:
    """p(neoplastic) of each fine-tune case from a local update of ``start`` on the other folds
    (5-fold stratified, leave-one-out below 10 cases: the rule of ``client.calibrate``)."""
    from sklearn.model_selection import KFold, LeaveOneOut, StratifiedKFold

    from client.calibrate import FOLDS, LOO_BELOW
    from client.finetune import local_update

    x, y = part.features, part.labels
    oof = start.p_neoplastic(x)
    if len(y) < 2:
        return oof
    counts = np.bincount(y, minlength=2)
    splitter = (LeaveOneOut() if len(y) < LOO_BELOW else
                StratifiedKFold(min(FOLDS, int(counts.min())), shuffle=True, random_state=kw["seed"])
                if counts.min() >= 2 else KFold(FOLDS, shuffle=True, random_state=kw["seed"]))
    for k, (tr, te) in enumerate(splitter.split(x, y)):
        head = local_update(start, x[tr], y[tr], **dict(kw, seed=kw["seed"] * 1009 + k)).head
        oof[te] = head.p_neoplastic(x[te])
    return oof


def site_metrics(arm: Arm, view: SiteView, heads: dict, bundle_threshold: float, recipe: Recipe, seed: int,
                 device: str) -> dict[str, Any]:
    """``{arm: {metric: value}}`` for one site, with the paired differences to reference, local and paper."""
    from client.calibrate import site_threshold
    from client.evaluate import arm_metrics, paired_metrics

    fine, held = view.parts[arm.stats]
    head = _site_head(heads[arm.name]["final"], view, heads)
    if arm.threshold == "bundle":
        t, why = bundle_threshold, None
    elif arm.training == "none":
        st = site_threshold(fine.labels, head.p_neoplastic(fine.features), bundle_threshold)
        t, why = st.p, st.reason
    else:
        start = heads[arm.name].get("previous", heads["reference"]["final"])
        epochs = recipe.local_epochs if arm.training == "federated" else recipe.rounds * recipe.local_epochs
        st = site_threshold(fine.labels, oof_scores(start, fine, _update_kw(recipe, arm.regularised, epochs,
                                                                           seed * 100_003, device)),
                            bundle_threshold)
        t, why = st.p, st.reason
    p = head.p_neoplastic(held.features)
    metrics, _ = arm_metrics(arm.name, held, p, t, min_cases=5, seed=seed, threshold_reason=why)
    others = {}
    if arm.name not in ("reference", "reference-site"):  # the same scores as the reference: no difference
        others["reference"] = heads["reference"]["final"].p_neoplastic(view.parts["bundle"][1].features)
    if arm.local:
        local = ARMS_BY_NAME[arm.local]
        others["local"] = _site_head(heads[local.name]["final"], view, heads).p_neoplastic(
            view.parts[local.stats][1].features)
    if arm.training == "federated" and arm.name != "federated (paper)":
        others["paper"] = heads["federated (paper)"]["final"].p_neoplastic(view.parts["bundle"][1].features)
    paired, _ = paired_metrics(arm.name, held.labels, p, others, min_cases=5)
    metrics.update(paired)
    prefix = arm.name + "."
    return {arm.name: {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}}


ARMS_BY_NAME = {a.name: a for a in ARMS}


def _site_head(final, view: SiteView, heads: dict):
    """A local-only arm has one head per site (in the order of ``heads["_order"]``)."""
    if isinstance(final, list):
        return final[heads["_order"].index(view.name)]
    return final


def _meta_of(rows: list[dict], arm: str, metric: str) -> dict[str, Any] | None:
    from shared.evaluation.rocstats import meta_analysis

    pairs = [(r[arm][metric], r[arm][metric + "-var"]) for r in rows
             if r.get(arm, {}).get(metric) is not None and r[arm].get(metric + "-var") is not None]
    if not pairs:
        return None
    return meta_analysis([e for e, _ in pairs], [v for _, v in pairs]).to_dict()


def _slim(pooled: dict[str, Any]) -> dict[str, Any]:
    """The pooled summary without its curves (kept small for the JSON)."""
    return {k: v for k, v in pooled.items() if k not in ("pooled_roc", "hist_neg", "hist_pos", "reliability")}


# ----------------------------------------------------------------------------- summary


FIGURES = (
    ("pooled AUC", ("pooled_auc",)),
    ("AUC random effects", ("auc_meta", "random", "estimate")),
    ("AUC RE CI low", ("auc_meta", "random", "ci_low")),
    ("AUC RE CI high", ("auc_meta", "random", "ci_high")),
    ("sensitivity", ("sensitivity",)),
    ("specificity", ("specificity",)),
    ("Δ vs reference", ("minus_reference_meta", "random", "estimate")),
    ("Δ vs reference CI low", ("minus_reference_meta", "random", "ci_low")),
    ("Δ vs reference CI high", ("minus_reference_meta", "random", "ci_high")),
    ("Δ vs local", ("minus_local_meta", "random", "estimate")),
    ("Δ vs local CI low", ("minus_local_meta", "random", "ci_low")),
    ("Δ vs local CI high", ("minus_local_meta", "random", "ci_high")),
    ("Δ vs paper", ("minus_paper_meta", "random", "estimate")),
    ("Δ vs paper CI low", ("minus_paper_meta", "random", "ci_low")),
    ("Δ vs paper CI high", ("minus_paper_meta", "random", "ci_high")),
)


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean, SD and per-seed values of every figure of every arm."""
    out: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        out[arm.name] = {}
        for name, path in FIGURES:
            values = []
            for r in runs:
                v: Any = r["pooled"].get(arm.name)
                for step in path:
                    v = v.get(step) if isinstance(v, dict) else None
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values.append(float(v))
            if values:
                out[arm.name][name] = {"mean": statistics.fmean(values),
                                       "sd": statistics.stdev(values) if len(values) > 1 else None, "values": values}
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #14's targets for the headline arm, each with its measured value and whether it is met."""
    fed, ref = summary[HEADLINE_ARM], summary["reference"]

    def m(arm: dict, key: str) -> float | None:
        return (arm.get(key) or {}).get("mean")

    gain = None if m(fed, "pooled AUC") is None else m(fed, "pooled AUC") - m(ref, "pooled AUC")
    rows = [
        ("pooled AUC federated − reference ≥ 0.05", gain, 0.05),
        ("paired Δ vs reference: 95 % CI low > 0", m(fed, "Δ vs reference CI low"), 0.0),
        ("pooled AUC federated − local-only (local+all) ≥ 0", None if gain is None else
         m(fed, "pooled AUC") - m(summary["local+all"], "pooled AUC"), 0.0),
        ("pooled AUC federated − local-only (paper) ≥ 0", None if gain is None else
         m(fed, "pooled AUC") - m(summary["local (paper)"], "pooled AUC"), 0.0),
        ("pooled sensitivity ≥ 0.60", m(fed, "sensitivity"), 0.60),
        ("pooled specificity ≥ 0.60", m(fed, "specificity"), 0.60),
    ]
    out = []
    for name, value, bound in rows:
        strict = "CI low" in name
        met = None if value is None else (value > bound if strict else value >= bound)
        out.append({"target": name, "value": value, "bound": bound, "met": met,
                    "missed_by": None if value is None or met else bound - value})
    return out


def render(result: dict[str, Any]) -> str:
    """The Markdown result: design, the per-arm table (mean ± SD over split seeds) and the targets."""
    d, s = result["design"], result["summary"]
    seg = "the reference masks" if d.get("segmentation") == "truth" else "the bundle's nnU-Net"

    def f(arm: str, key: str) -> str:
        x = s[arm].get(key)
        if not x:
            return "–"
        return f"{x['mean']:.3f}" + ("" if x["sd"] is None else f" ± {x['sd']:.3f}")

    def ci(arm: str, key: str) -> str:
        lo, hi = s[arm].get(f"{key} CI low"), s[arm].get(f"{key} CI high")
        return "" if not lo or not hi else f" [{lo['mean']:.3f}, {hi['mean']:.3f}]"

    lines = [
        f"# Site adaptation benchmark ({result['created_utc']})", "",
        f"Bundle `{result['bundle']['path']}` ({result['bundle']['name']} {result['bundle']['version']}, "
        f"hash {result['bundle']['hash'][:12]}). {len(d['profiles'])} sites ({', '.join(d['profiles'])}; real CT "
        f"background: {d['real_background']}), {d['cases_per_site']} labelled + {d['unlabelled_per_site']} unlabelled "
        f"{d['scale']}-scale cases each (crops from {seg}), {d['fine_tune_fraction']:.0%} of the labelled cases fine-tune, "
        f"{d['recipe']['rounds']} rounds × {d['recipe']['local_epochs']} epochs, proximal μ "
        f"{d['recipe']['proximal_mu']}, split seeds {d['split_seeds']}.", "",
        "Mean ± SD over the split seeds; CIs are the mean of the per-seed random-effects 95 % CIs. "
        "Δ: paired AUC difference (DeLong per site, random-effects across sites); 'vs local' is against the "
        "arm's matching local-only arm, 'vs paper' against federated (paper).", "",
        "| Arm | pooled AUC | AUC (random effects) [95 % CI] | sensitivity | specificity | Δ vs reference [CI] "
        "| Δ vs local [CI] | Δ vs paper [CI] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        n = arm.name
        lines.append(f"| {n} | {f(n, 'pooled AUC')} | {f(n, 'AUC random effects')}{ci(n, 'AUC RE')} | "
                     f"{f(n, 'sensitivity')} | {f(n, 'specificity')} | {f(n, 'Δ vs reference')}"
                     f"{ci(n, 'Δ vs reference')} | {f(n, 'Δ vs local')}{ci(n, 'Δ vs local')} | "
                     f"{f(n, 'Δ vs paper')}{ci(n, 'Δ vs paper')} |")
    lines += ["", f"Targets (issue #14) for `{HEADLINE_ARM}`:", "", "| target | measured | met |", "|---|---:|---|"]
    for t in result["targets"]:
        v = "n/a" if t["value"] is None else f"{t['value']:+.3f}" if "−" in t["target"] or "Δ" in t["target"] \
            else f"{t['value']:.3f}"
        met = "n/a" if t["met"] is None else "yes" if t["met"] else f"no (missed by {t['missed_by']:.3f})"
        lines.append(f"| {t['target']} | {v} | {met} |")
    lines += ["", f"Wall time: preparation {result['wall_s']['prepare']} s, arms {result['wall_s']['arms']} s "
              f"({result['device']['used']}, {result['machine']['cpus']} CPUs)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
