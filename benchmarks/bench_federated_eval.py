"""Benchmark what federated fine-tuning buys, with its uncertainty: four arms, several split seeds.

Four simulated hospitals (default: hamburg-like, community-hospital, lowdose-mobile and
oncology-referral, the last on the real GE head CT background) with ``--cases-per-site`` cases
each, 20 % fine-tune, ``--rounds`` rounds, run ``--split-seeds`` times on the same cohorts and
cached features (only the fine-tune / held-out split changes: ``simulations.repeats``). For each
arm (reference, reference at the site threshold, local-only, federated) it reports the pooled AUC
(from the sites' score histograms), the fixed- and random-effects AUC with 95 % CI, sensitivity /
specificity, and the paired AUC differences federated - reference and federated - local with CIs,
each as mean ± SD over the split seeds; and the smallest paired AUC difference the design can
detect (two-sided 5 %, 80 % power: 2.80 x the random-effects SE of the difference).

    python benchmarks/bench_federated_eval.py --bundle demo_out/bundle

Writes ``benchmarks/results/federated_eval.json`` and ``.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _common import device_info  # noqa: E402

log = logging.getLogger("bench_federated_eval")

PROFILES = ("hamburg-like", "community-hospital", "lowdose-mobile", "oncology-referral")
Z_POWER = 1.959964 + 0.841621  # two-sided alpha 0.05, power 0.80


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--pubkey", type=Path, default=None, help="default: BUNDLE-keys/ beside the bundle")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated site profiles")
    parser.add_argument("--real-background", default="oncology-referral",
                        help="profile whose cohort is drawn on the real GE head CT background ('' for none)")
    parser.add_argument("--cases-per-site", type=int, default=60)
    parser.add_argument("--fine-tune-fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--split-seeds", type=int, default=3, help="repeats, each with its own split seed")
    parser.add_argument("--scale", default="demo", choices=("ci", "demo"))
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (and first split seed)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench_federated_eval")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federated_eval.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.split_seeds < 1:
        parser.error("--split-seeds: must be at least 1")

    from shared.bundle import load_bundle
    from shared.bundle.transport import bundle_cache_dir, seed_bundle
    from shared.plumbing.atomic import write_json, write_text
    from shared.security.keys import PUBLIC_KEY_NAME
    from simulations.repeats import run_repeats, summary_markdown

    pubkey = args.pubkey or args.bundle.parent / f"{args.bundle.name}-keys" / PUBLIC_KEY_NAME
    bundle = load_bundle(args.bundle, pubkey)
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    out = args.work_dir / f"{len(profiles)}x{args.cases_per_site}-{args.scale}"
    t0 = time.perf_counter()
    site_dirs = make_cohorts(out / "cohorts", profiles, args.cases_per_site, args.scale, args.seed,
                             args.real_background)
    cohort_s = time.perf_counter() - t0
    for i in range(len(site_dirs)):
        # as hospitals that received the bundle out of band: the benchmark is about evaluation
        seed_bundle(bundle, bundle_cache_dir(out / "sites" / f"site-{i + 1}" / "state"))
    t1 = time.perf_counter()
    summary = run_repeats(out, args.bundle, pubkey, args.rounds, args.split_seeds, split_seed=args.seed,
                          site_dirs=[str(d) for d in site_dirs], seed=args.seed, local_epochs=args.local_epochs,
                          learning_rate=args.learning_rate, fine_tune_fraction=args.fine_tune_fraction,
                          min_cases_for_metrics=5, device=args.device)
    run_s = time.perf_counter() - t1
    reports = [json.loads((out / "repeats" / f"split-seed-{s}" / "report.json").read_text(encoding="utf-8"))
               for s in summary["split_seeds"]]
    result = {
        "benchmark": "federated_eval",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "device": device_info(args.device),
        "bundle": {"name": bundle.manifest.name, "version": bundle.manifest.version, "hash": bundle.hash},
        "design": {"profiles": profiles, "real_background": args.real_background or None,
                   "cases_per_site": args.cases_per_site, "fine_tune_fraction": args.fine_tune_fraction,
                   "rounds": args.rounds, "local_epochs": args.local_epochs, "scale": args.scale,
                   "split_seeds": summary["split_seeds"]},
        "held_out": held_out_sizes(reports),
        "detectable_difference": detectable_difference(reports),
        "summary": summary,
        "wall_s": {"cohorts": round(cohort_s, 1), "runs": round(run_s, 1)},
    }
    write_json(args.out, result)
    write_text(args.out.with_suffix(".md"), render(result, summary_markdown(summary)))
    print(render(result, summary_markdown(summary)))
    print(f"wrote {args.out}")
    return 0


def make_cohorts(root: Path, profiles: list[str], n: int, scale: str, seed: int, real: str) -> list[Path]:
    """One cohort per profile (seeded; reused when already there), ``real`` on the real CT background."""
    from simulations.cohort import write_cohort

    dirs = []
    for i, profile in enumerate(profiles):
        background = "real" if profile == real else "phantom"
        d = root / f"{i + 1}-{profile}-{background}"
        meta = d / "cohort.json"
        if meta.is_file():
            m = json.loads(meta.read_text(encoding="utf-8"))
            if (m.get("seed"), m.get("scale"), m.get("n_cases"), m.get("background")) == (seed + 1000 * (i + 1),
                                                                                           scale, n, background):
                dirs.append(d)
                continue
        write_cohort(profile, n, seed + 1000 * (i + 1), d, scale=scale, background=background)
        dirs.append(d)
    return dirs


def held_out_sizes(reports: list[dict]) -> dict:
    """Held-out cases per arm and run (all arms share them), from the federated arm's pooled counts."""
    ns = [((r.get("final") or {}).get("pooled") or {}).get("federated", {}).get("n") for r in reports]
    return {"per_run": ns}


def detectable_difference(reports: list[dict]) -> dict:
    """Smallest paired AUC difference detectable at two-sided 5 % with 80 % power, per comparison:
    2.80 x the random-effects SE of the meta-analysed difference, mean ± SD over the runs."""
    out = {}
    for key in ("minus_reference_meta", "minus_local_meta"):
        ses = []
        for r in reports:
            meta = (((r.get("final") or {}).get("pooled") or {}).get("federated") or {}).get(key) or {}
            se = (meta.get("random") or {}).get("se")
            if se is not None:
                ses.append(Z_POWER * float(se))
        out[key] = {"mean": statistics.fmean(ses) if ses else None,
                    "sd": statistics.stdev(ses) if len(ses) > 1 else None, "values": ses}
    return out


def render(result: dict, table: str) -> str:
    """The Markdown result: design, detectable difference, and the mean ± SD table."""
    d = result["design"]
    mdd = result["detectable_difference"]

    def fmt(x):
        return "n/a" if x["mean"] is None else f"{x['mean']:.3f}" + ("" if x["sd"] is None else f" ± {x['sd']:.3f}")

    return "\n".join([
        f"# Federated evaluation benchmark ({result['created_utc']})", "",
        f"{len(d['profiles'])} sites ({', '.join(d['profiles'])}; real CT background: {d['real_background']}), "
        f"{d['cases_per_site']} {d['scale']}-scale cases each, {d['fine_tune_fraction']:.0%} fine-tune, "
        f"{d['rounds']} rounds x {d['local_epochs']} epochs, split seeds {d['split_seeds']}; "
        f"held-out cases per run: {result['held_out']['per_run']}.", "",
        "Smallest detectable paired AUC difference (two-sided 5 %, 80 % power, 2.80 x random-effects SE): "
        f"federated − reference {fmt(mdd['minus_reference_meta'])}, "
        f"federated − local-only {fmt(mdd['minus_local_meta'])}.", "",
        table,
    ])


if __name__ == "__main__":
    sys.exit(main())
