"""`make demo`: the main job end to end on the built-in synthetic default.

1. ``ichfed bootstrap --profile demo``: reference nnU-Net + ResNet-34 on the synthetic development
   site (charite-like), signed bundle and Table-2-style report. Cached: a second run reuses it.
2. ``ichfed simulate``: three external simulated hospitals fine-tune the last layer with Flower's
   simulation engine; prints the four arms (reference, reference at the site threshold, local-only,
   federated) with pooled and meta-analytic AUC and 95 % CIs, and the paired differences.
3. ``ichfed predict``: one held-out case read with the federated bundle and the site's own threshold.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shared.plumbing.errors import IchfedError

log = logging.getLogger("ichfed.demo")

SITE_PROFILES = ("hamburg-like", "community-hospital", "lowdose-mobile")


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m simulations.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--profile", default="demo", choices=["ci", "demo"], help="bootstrap profile (default demo)")
    parser.add_argument("--cases-per-site", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the whole log on the console too")
    args = parser.parse_args(argv)
    # Console: banners, progress and results; Flower, Ray and per-case lines go to OUT/ichfed.log.
    from shared.plumbing.logs import setup

    log_file = setup(Path(args.out), verbose=args.verbose)
    try:
        run(Path(args.out), args.profile, args.cases_per_site, args.rounds, args.seed)
    except IchfedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not sys.stderr.isatty():
        print(f"log: {log_file}", file=sys.stderr)  # on a terminal it was named at the start
    return 0


def run(out: Path, profile: str, cases_per_site: int, rounds: int, seed: int) -> None:
    """Bootstrap (cached), federate three simulated sites, then read one case."""
    import json

    from server.bootstrap import get_recipe, render_report
    from server.report_arms import (
        arms_table_markdown,
        comparisons_table_markdown,
        verdict,
    )
    from shared.bundle import load_bundle
    from shared.pipeline import Predictor
    from shared.plumbing.logs import flush_tallies
    from shared.result_text import format_result
    from shared.security.keys import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME
    from simulations.flower_sim import run as simulate
    from simulations.reference import bootstrap_development

    out = out.resolve()
    bundle_dir = out / "bundle"
    key_dir = out / "bundle-keys"
    report_path = out / "bundle-report.json"

    _banner(f"1/3 reference models (bootstrap --profile {profile})")
    if report_path.is_file() and bundle_dir.is_dir():
        load_bundle(bundle_dir, key_dir / PUBLIC_KEY_NAME)  # a cached bundle must still verify
        report = json.loads(report_path.read_text(encoding="utf-8"))
        print(f"reusing the bundle in {bundle_dir} (delete {out} to retrain)")
    else:
        report = bootstrap_development(get_recipe(profile), out=bundle_dir, work_dir=out / "bundle-work", seed=seed)
        flush_tallies()  # repeated case-level conditions of the development site, once each
    print(render_report(report))

    _banner(f"2/3 federated last-layer fine-tuning: {len(SITE_PROFILES)} simulated sites, {rounds} rounds")
    sim_out = out / "federation"
    sim = simulate(
        sim_out,
        bundle_dir,
        key_dir / PUBLIC_KEY_NAME,
        rounds,
        profiles=list(SITE_PROFILES),
        n_sites=len(SITE_PROFILES),
        cases_per_site=cases_per_site,
        scale=profile,
        seed=seed,
        signing_key=key_dir / PRIVATE_KEY_NAME,
    )
    # The four arms with CIs and the paired differences: whether fine-tuning helped, at a glance.
    print(arms_table_markdown(sim))
    print(comparisons_table_markdown(sim))
    print(verdict(sim))
    print(f"full report: {sim_out / 'report' / 'report.md'}")

    _banner("3/3 reading a case with the federated model and the site's own threshold")
    site_dir = sorted((sim_out / "sites").iterdir())[0]
    case = sorted((site_dir / "data" / "images").iterdir())[-1]
    final = _final_bundle(sim_out)
    bundle = load_bundle(final or bundle_dir, key_dir / PUBLIC_KEY_NAME)
    from client.overlay import load_overlay

    overlay = load_overlay(site_dir / "state", bundle.hash)  # the site's threshold for this exact bundle
    threshold = None if overlay is None else overlay.threshold
    result = Predictor(bundle, threshold=threshold).predict(case)
    print(format_result(result))


def _final_bundle(sim_out: Path) -> Path | None:
    """The federated bundle the server wrote, if the run produced one."""
    candidates = sorted((sim_out / "server").glob("**/manifest.json"))
    return candidates[-1].parent if candidates else None


if __name__ == "__main__":
    sys.exit(main())
