"""The work of ``bench_federation.py`` as tasks, run in this process or in ``--jobs`` worker processes.

Three kinds of task, each self-contained (it loads the bundle and the cached features itself):
``build`` one site's feature cache; ``oracles`` of one cohort seed (the fits that do not change
across replicates); ``chunk``: a range of replicates of one cohort seed, every recipe's
federation on real site sessions. Replicate r of seed s draws its fine-tune cases from
``default_rng([s, r, 20])`` wherever it runs, so ``--jobs`` never changes a result.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench_federation")


def context(args: argparse.Namespace):
    """(bundle, public key path) of the run, verified."""
    from shared.bundle import load_bundle
    from shared.security.keys import PUBLIC_KEY_NAME

    pubkey = (args.pubkey or args.bundle.parent / f"{args.bundle.name}-keys" / PUBLIC_KEY_NAME).resolve()
    return load_bundle(args.bundle, pubkey), pubkey


def sites_of(args, bundle, seed: int, only: int | None = None) -> list:
    """The sites of cohort ``seed`` from the feature cache (each built there first if absent)."""
    from federation_features import Models, cache_key, load_or_build, site_specs

    folder = args.work_dir / "features" / cache_key(bundle, args.masks, args.scale, args.cases, args.unlabelled)
    specs = site_specs(args.sites, seed, args.real_profile or None)
    models: list = []

    class Lazy:  # the backbone and segmenter are built only when a cache file is missing
        def __getattr__(self, name):
            if not models:
                models.append(Models(bundle, args.masks, args.device))
            return getattr(models[0], name)

    picked = specs if only is None else [specs[only]]
    return [load_or_build(folder, spec, bundle, n_cases=args.cases, n_unlabelled=args.unlabelled, scale=args.scale,
                          masks=args.masks, device=args.device, models=Lazy()) for spec in picked]


def development_volumes(n: int, seed: int, scale: str):
    """(ICH ml, PHE ml, labels) of ``n`` development-profile cases from their true masks (mask only: fast)."""
    from federation_features import DEVELOPMENT

    from simulations.cohort import make_case

    cases = [make_case(DEVELOPMENT, k, seed * 7_919 + 5, scale=scale, mask_only=True).record for k in range(n)]
    return (np.array([c.ich_ml for c in cases]), np.array([c.phe_ml for c in cases]),
            np.array([c.label for c in cases]))


def task(payload: tuple) -> Any:
    """Run one task: ``(args dict, kind, seed, *rest)``; see the module doc."""
    arg_dict, kind, seed, *rest = payload
    args = argparse.Namespace(**arg_dict)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bundle, pubkey = context(args)
    if kind == "build":
        sites_of(args, bundle, seed, only=rest[0])
        return None
    sites = sites_of(args, bundle, seed)
    if kind == "oracles":
        return _oracles(args, bundle, sites, seed)
    return _chunk(args, bundle, pubkey, sites, seed, range(rest[0], rest[1]))


def _oracles(args, bundle, sites: list, seed: int) -> dict[str, dict[str, np.ndarray]]:
    from federation_arms import fixed_oracles, volume_model

    from shared.models.head import Head

    simulated = [d for d in sites if d.spec.background == "phantom"]
    volume = volume_model(*development_volumes(args.dev_cases, seed, args.scale))
    return fixed_oracles(sites, simulated, Head.from_bundle(bundle), volume, seed).scores


def _chunk(args, bundle, pubkey: Path, sites: list, seed: int, reps: range) -> dict[str, Any]:
    """Replicates ``reps`` of one seed: per site the held-out masks, every arm's scores and operating points."""
    from federation_arms import SESSION_ARMS, Federation, central_small, draw_fine_tune

    from shared.models.head import Head

    anchor = Head.from_bundle(bundle)
    simulated = {d.spec.name for d in sites if d.spec.background == "phantom"}
    arms = [a for a, _, _ in SESSION_ARMS]
    n_r = len(reps)
    rec = {d.spec.name: {"mask": np.zeros((n_r, d.n), bool),
                         "scores": {a: np.zeros((n_r, d.n)) for a in [*arms, "oracle-central-12"]},
                         "metrics": {a: {k: [] for k in ("auc", "sensitivity", "specificity", "threshold")}
                                     for a in arms}} for d in sites}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    state_root = Path(tempfile.mkdtemp(prefix=f"states-{seed}-{reps.start}-", dir=args.work_dir))
    try:
        fed = Federation(sites, bundle, pubkey, state_root, rounds=args.rounds, folds=args.cross_fit_folds,
                         device=args.device)
        for i, r in enumerate(reps):
            rng = np.random.default_rng([seed, r, 20])
            splits = []
            for d in sites:
                fine = draw_fine_tune(d.labels, d.lesion, args.fine_tune, rng)
                splits.append((fine, np.setdiff1d(np.arange(d.n), fine)))
            res = fed.replicate(splits)
            small = central_small(sites, simulated, splits, anchor, seed * 1000 + r)
            for d, (_, held) in zip(sites, splits):
                _record(rec[d.spec.name], i, d, held, res[d.spec.name], small[d.spec.name])
            log.info("seed %d replicate %d: federated (converged) − reference %s", seed, r + 1,
                     {d.spec.name: round(res[d.spec.name]["federated-converged"]["auc"]
                                         - res[d.spec.name]["reference"]["auc"], 3) for d in sites})
    finally:
        shutil.rmtree(state_root, ignore_errors=True)
    return rec


def _record(rec: dict, i: int, d, held: np.ndarray, arms: dict, small: np.ndarray) -> None:
    rows = held[d.lesion[held]]  # the held-out rows the site scored, in its order
    rec["mask"][i, rows] = True
    for arm, v in arms.items():
        rec["scores"][arm][i, rows] = v["scores"]
        for k in rec["metrics"][arm]:
            rec["metrics"][arm][k].append(v.get(k))
    rec["scores"]["oracle-central-12"][i] = small


def run_all(args, seeds: list[int], replicates: int) -> tuple[dict[int, list], dict[int, dict]]:
    """Build the feature caches, then the oracles and replicate chunks of every seed (``--jobs`` processes).

    Returns ``(sites per seed, runs per seed)``; a run maps each site name to its labels, the
    held-out mask (replicates x cases), every model's scores and the arms' operating points."""
    from federation_features import site_specs

    payload = vars(args)
    n_sites = len(site_specs(args.sites, seeds[0], args.real_profile or None))
    _map(args, [(payload, "build", s, i) for s in seeds for i in range(n_sites)])
    size = math.ceil(replicates / max(args.jobs, 1))
    chunks = [(s, a, min(a + size, replicates)) for s in seeds for a in range(0, replicates, size)]
    results = _map(args, [(payload, "oracles", s) for s in seeds] + [(payload, "chunk", *c) for c in chunks])
    bundle, _ = context(args)
    cohorts = {s: sites_of(args, bundle, s) for s in seeds}
    runs = {}
    for k, s in enumerate(seeds):
        parts = [r for c, r in zip(chunks, results[len(seeds):]) if c[0] == s]
        runs[s] = {d.spec.name: _merge(d, results[k][d.spec.name], [p[d.spec.name] for p in parts])
                   for d in cohorts[s]}
    return cohorts, runs


def _merge(d, fixed: dict[str, np.ndarray], parts: list[dict]) -> dict[str, Any]:
    return {"labels": d.labels, "fixed": fixed, "mask": np.concatenate([p["mask"] for p in parts]),
            "scores": {a: np.concatenate([p["scores"][a] for p in parts]) for a in parts[0]["scores"]},
            "metrics": {a: {k: sum((p["metrics"][a][k] for p in parts), []) for k in parts[0]["metrics"][a]}
                        for a in parts[0]["metrics"]}}


def _map(args, tasks: list) -> list:
    if args.jobs <= 1 or len(tasks) <= 1:
        return [task(t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(task, tasks))
