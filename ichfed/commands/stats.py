"""`ichfed stats`: a federated Table 1 (counts and fixed-bin histograms per site, pooled), no training."""

from __future__ import annotations

import logging
from pathlib import Path

from shared.plumbing.errors import IchfedError

from ..bundle_args import default_public_key

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "stats",
        help="describe the federation before training: a Table 1 per site and pooled, built without moving data",
        description="Runs the ServerApp in statistics mode (mode=\"stats\") with the sites' ClientApps in Flower's "
        "simulation engine: each site sends case counts, class prevalence, lesion counts, ICH/PHE volume and mean "
        "HU as fixed-bin histograms and scanner metadata as counts, every value below its min_cases_for_metrics "
        "suppressed at the site. Writes table1.json/.md/.html and a volume figure to OUT/table1. In a deployment "
        "run the same app with: flwr run . <federation> --run-config \"mode='stats' ...\".",
    )
    p.add_argument("--site-configs", help="comma-separated existing site config TOMLs (else simulated sites)")
    p.add_argument("--sites", type=int, help="number of simulated sites (default: one per --site-dirs folder)")
    p.add_argument("--profiles", help="comma-separated site profiles, cycled over the sites")
    p.add_argument("--site-dirs", help="comma-separated existing site folders instead of simulated cohorts")
    p.add_argument("--cases-per-site", type=int, default=30,
                   help="cases per simulated site (default 30, as ichfed simulate: the same cohorts)")
    p.add_argument("--scale", default="ci", choices=["ci", "demo", "paper"], help="simulated image scale (default ci)")
    p.add_argument("--bundle", required=True, help="signed reference bundle (segments cases without masks)")
    p.add_argument("--pubkey", help="coordinator's Ed25519 public key (default: the development key beside --bundle)")
    p.add_argument("--out", required=True, help="output folder (sites, site configs, table1/)")
    p.add_argument("--min-cases", type=int, default=5,
                   help="fewest cases a count or bin may describe before a site suppresses it (at least 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated cohorts")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="site compute device (default cpu)")
    p.set_defaults(func=run)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def run(args) -> int:
    from server.table1 import markdown
    from simulations.stats_sim import run_stats

    if args.site_configs and (args.sites or args.site_dirs or args.profiles):
        raise IchfedError("--site-configs: cannot be combined with --sites, --site-dirs or --profiles")
    table = run_stats(args.out, args.bundle, args.pubkey or default_public_key(args.bundle),
                      site_configs=_csv(args.site_configs), n_sites=args.sites, profiles=_csv(args.profiles),
                      site_dirs=_csv(args.site_dirs), cases_per_site=args.cases_per_site, scale=args.scale,
                      seed=args.seed, min_cases_for_metrics=args.min_cases, device=args.device)
    print(markdown(table).split("\n![")[0])
    print(f"table 1: {Path(args.out) / 'table1' / 'table1.html'}")
    return 0
