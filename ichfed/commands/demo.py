"""`ichfed demo` (what `make demo` runs): the main job end to end on the built-in synthetic default."""

from __future__ import annotations

from pathlib import Path

from ..result_text import format_result


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole job on synthetic data: reference bundle, 3 federated sites, one case read",
        description="1. bootstrap a reference bundle on the synthetic development site (cached in OUT); "
        "2. federate three simulated hospitals (last layer, Flower simulation) and print the four arms; "
        "3. read one case of a site with its active model (the federated bundle if the site adopted it) and "
        "the site's overlay, as `ichfed predict --site-config` does. The log goes to OUT/ichfed.log.",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out); rerun to reuse its caches")
    p.add_argument("--profile", default="demo", choices=["ci", "demo"], help="bootstrap profile (default demo)")
    p.add_argument("--cases-per-site", type=int, default=30, help="cases per simulated site (default 30)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cohorts, training and splits (default 0)")
    p.set_defaults(func=run)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(args) -> int:
    from server.bootstrap import render_report
    from server.report_arms import (
        arms_table_markdown,
        comparisons_table_markdown,
        verdict,
    )
    from simulations import demo

    out = Path(args.out).resolve()
    _banner(f"1/3 reference models (bootstrap --profile {args.profile})")
    ref = demo.reference_bundle(out, args.profile, args.seed)
    if ref.reused:
        print(f"reusing the bundle in {ref.bundle_dir} (delete {out} to retrain)")
    print(render_report(ref.report))
    for line in demo.reference_warnings(ref.report):
        print(f"warning: {line}", flush=True)

    _banner(f"2/3 federated last-layer fine-tuning: {len(demo.SITE_PROFILES)} simulated sites, {args.rounds} rounds")
    sim = demo.federate(out, ref, rounds=args.rounds, cases_per_site=args.cases_per_site, profile=args.profile,
                        seed=args.seed)
    # The four arms with CIs and the paired differences: whether fine-tuning helped, at a glance.
    print(arms_table_markdown(sim))
    print(comparisons_table_markdown(sim))
    print(verdict(sim))
    print(f"full report: {demo.federation_dir(out) / 'report' / 'report.md'}")

    _banner("3/3 reading a case as a site does: its active model with its overlay")
    reading = demo.read_one_case(demo.federation_dir(out), ref.bundle_dir)
    how = f"its active model since {reading.active.since_utc} ({reading.active.source})" if reading.active \
        else "no active model; the run's bundle"
    print(f"site {reading.site_config.stem}: {how}, {reading.bundle_dir}")
    if reading.n_read > 1:
        print(f"({reading.n_read - 1} case(s) read before this one were flagged for review; the first unflagged "
              "one is shown)" if not reading.result.flagged else
              f"(all {reading.n_read} cases read were flagged for review; the last is shown)")
    print(format_result(reading.result))
    return 0
