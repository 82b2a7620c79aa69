"""Does federation help a new hospital? Every arm run by the production site code, with oracles,
replicates and hierarchical-bootstrap CIs (issue #20).

Sites: the eight simulated sites of ``federation_features.PROFILES`` (five shifted built-in
profiles, three with a stronger scanner shift) x ``--cases`` cases, plus the real-background
site (``--real-profile`` on the real GE head CT), which federates with them and is reported on
its own line; ``--seeds`` independent cohorts. Features are cached once (``federation_features``);
each of ``--replicates`` draws takes ``--fine-tune`` stratified cases per site to fine-tune on and
holds out the rest. Every federated arm is a real ``SiteSession`` per site and Flower's FedAvg
aggregation in process (``federation_arms``); oracles: a site linear model on 300 cases, a
centralised one on the pooled 8 x 12 and 8 x 300 cases, the volume-only baseline and the same
patients imaged on the development scanner.

    python benchmarks/bench_federation.py --bundle demo_out/bundle --pilot   # 10 replicates: the design
    python benchmarks/bench_federation.py --bundle demo_out/bundle           # the replicates it set

Writes ``benchmarks/results/federation.json`` and ``.md`` (``federation_pilot.*`` with ``--pilot``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import device_info  # noqa: E402

log = logging.getLogger("bench_federation")
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--pubkey", type=Path, default=None, help="default: BUNDLE-keys/ beside the bundle")
    p.add_argument("--sites", type=int, default=8, help="simulated sites (at most 8)")
    p.add_argument("--cases", type=int, default=400, help="labelled cases per site")
    p.add_argument("--unlabelled", type=int, default=100, help="unlabelled scans per site for its BatchNorm statistics")
    p.add_argument("--fine-tune", type=int, default=12, help="stratified fine-tune cases per site and replicate")
    p.add_argument("--replicates", type=int, default=None,
                   help="draws per cohort seed (default: the pilot's design, else 100)")
    p.add_argument("--seeds", type=int, default=3, help="independent cohort seeds")
    p.add_argument("--seed", type=int, default=0, help="first cohort seed")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cross-fit-folds", type=int, default=5)
    p.add_argument("--dev-cases", type=int, default=400, help="development cases the volume baseline is fitted on")
    p.add_argument("--real-profile", default="oncology-referral", help="population of the real-background site ('' none)")
    p.add_argument("--masks", choices=("true", "predicted"), default="true",
                   help="crops from the true masks (no nnU-Net) or the bundle's segmentation (end to end)")
    p.add_argument("--scale", default="demo", choices=("ci", "demo"))
    p.add_argument("--boot", type=int, default=1000, help="hierarchical bootstrap resamples")
    p.add_argument("--pilot", action="store_true", help="10 replicates; writes the design for >= 0.03 AUC at 80 %% power")
    p.add_argument("--design", type=Path, default=RESULTS / "federation_pilot.json", help="the pilot result to follow")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--jobs", type=int, default=1, help="worker processes (feature cache, oracles, replicate chunks)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench_federation")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/federation[_pilot].json")
    args = p.parse_args(argv)
    if not 1 <= args.sites <= 8:
        p.error("--sites: must be 1..8")
    if args.fine_tune < 5 or args.fine_tune > args.cases - 4:
        p.error("--fine-tune: must be at least 5 (the site's minimum) and leave cases to hold out")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from federation_run import context, run_all

    from shared.plumbing.atomic import write_json, write_text

    bundle, _ = context(args)
    replicates, design_source = choose_replicates(args)
    out = args.out or RESULTS / ("federation_pilot.json" if args.pilot else "federation.json")
    load_start = list(os.getloadavg())
    t0 = time.perf_counter()
    cohorts, runs = run_all(args, [args.seed + i for i in range(args.seeds)], replicates)
    result = summarise(args, bundle, cohorts, runs, replicates, design_source)
    result["wall_s"] = {"total": round(time.perf_counter() - t0, 1), "jobs": args.jobs}
    result["load_average"] = {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]}
    from federation_summary import render

    write_json(out, result)
    write_text(out.with_suffix(".md"), render(result))
    print(render(result))
    print(f"wrote {out}")
    return 0


def choose_replicates(args) -> tuple[int, str]:
    """``--replicates``, else the pilot's design (``--design``), else 100; and where it came from."""
    if args.pilot:
        return args.replicates or 10, "pilot"
    if args.replicates:
        return args.replicates, "--replicates"
    if args.design.is_file():
        needed = (json.loads(args.design.read_text(encoding="utf-8")).get("design_check", {}).get("pilot") or {}) \
            .get("replicates_needed")
        if needed:
            return max(int(needed), 10), f"pilot {args.design.name}"
    return 100, "default (no pilot design)"


def summarise(args, bundle, cohorts: dict, runs: dict, replicates: int, design_source: str) -> dict[str, Any]:
    """The result: design, per-replicate values, endpoints with CIs, headroom, design check, targets."""
    import federation_summary as S

    from shared.evaluation.site_bootstrap import Block, SiteScores, bootstrap_sites

    names = [d.spec.name for d in next(iter(cohorts.values()))]
    real = [d.spec.name for d in next(iter(cohorts.values())) if d.spec.background == "real"]
    simulated = [n for n in names if n not in real]
    first = runs[next(iter(runs))][simulated[0]]
    models = [*first["scores"], *first["fixed"]]

    def site_scores(name: str) -> SiteScores:
        return SiteScores(name, [Block(runs[s][name]["labels"], {**runs[s][name]["scores"], **runs[s][name]["fixed"]},
                                       runs[s][name]["mask"]) for s in runs])

    boot = bootstrap_sites([site_scores(n) for n in simulated], models, n_boot=args.boot, seed=1)
    per_replicate = {str(s): {n: _per_replicate(runs[s][n]) for n in names} for s in runs}
    result: dict[str, Any] = {
        "benchmark": "federation", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "device": device_info(args.device),
        "bundle": {"path": str(args.bundle), "name": bundle.manifest.name, "version": bundle.manifest.version,
                   "hash": bundle.hash},
        "design": {"simulated_sites": simulated, "real_site": real[0] if real else None, "cases": args.cases,
                   "unlabelled": args.unlabelled, "fine_tune": args.fine_tune, "replicates": replicates,
                   "replicates_from": design_source, "seeds": list(runs), "rounds": args.rounds,
                   "cross_fit_folds": args.cross_fit_folds, "masks": args.masks, "scale": args.scale,
                   "bootstrap": args.boot, "dev_cases": args.dev_cases, "models": models},
        "per_replicate": per_replicate,
        "endpoints": S.endpoints(boot), "headroom": S.headroom(boot),
        "balanced_accuracy": S.balanced_accuracy(per_replicate, simulated, list(first["metrics"])),
    }
    if real:
        own = [m for m in models if m in runs[next(iter(runs))][real[0]]["fixed"] or m in first["scores"]]
        one = bootstrap_sites([site_scores(real[0])], own, n_boot=args.boot, seed=2)
        result["real_site"] = {"name": real[0], **S.endpoints(one), "headroom": S.headroom(one)}
    result["design_check"] = design_check(args, boot, per_replicate, simulated, site_scores, models)
    result["targets"] = S.targets(result)
    return result


def _per_replicate(rec: dict) -> dict[str, Any]:
    """Every model's AUC per replicate on that replicate's held-out cases (and the arms' operating points)."""
    from sklearn.metrics import roc_auc_score

    y, mask = rec["labels"], rec["mask"]
    out = {}
    for m in [*rec["scores"], *rec["fixed"]]:
        s = rec["scores"].get(m)
        rows = [(s[r] if s is not None else rec["fixed"][m])[mask[r]] for r in range(len(mask))]
        out[m] = {"auc": [float(roc_auc_score(y[mask[r]], rows[r])) for r in range(len(mask))]}
        if m in rec["metrics"]:
            out[m].update({k: v for k, v in rec["metrics"][m].items() if k != "auc"})
    return out


def design_check(args, boot, per_replicate: dict, simulated: list[str], site_scores, models) -> dict[str, Any]:
    """The detectable difference this run had (its own bootstrap SE) and, for a pilot, the design."""
    import federation_summary as S

    from shared.evaluation.site_bootstrap import bootstrap_sites

    prim = boot.difference(*S.PRIMARY)
    out: dict[str, Any] = {"primary": f"{S.PRIMARY[0]} − {S.PRIMARY[1]}", "se": prim.se,
                           "detectable_difference_actual": None if prim.se is None else S.Z_POWER * prim.se,
                           "label": "detectable difference = 2.80 x this run's hierarchical-bootstrap SE of the "
                                    "primary endpoint (80 % power, two-sided 5 %)"}
    if args.pilot and prim.se is not None:
        cases_only = bootstrap_sites([site_scores(n) for n in simulated], models, n_boot=args.boot, seed=3,
                                     resample_sites=False).difference(*S.PRIMARY)
        values = S.replicate_values(per_replicate, simulated, *S.PRIMARY)
        out["pilot"] = S.design(values, prim.se, cases_only.se or 0.0)
    return out


if __name__ == "__main__":
    sys.exit(main())
