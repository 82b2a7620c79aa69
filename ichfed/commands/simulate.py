"""`ichfed simulate`: a whole federation in Flower's simulation engine, then the run report."""

from __future__ import annotations

import sys
from pathlib import Path

from shared.plumbing.errors import IchfedError

from ..bundle_args import default_public_key


def register(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="run federated fine-tuning on simulated (or given) sites in Flower's simulation engine",
        description="Makes synthetic site cohorts (or uses --site-dirs), runs the same ServerApp and ClientApp "
        "as a real deployment in Flower's simulation engine (Ray), and writes the run report comparing the "
        "reference model, local-only and federated last-layer fine-tuning on the same held-out splits. "
        "A site whose split is too small to train is named before any case is preprocessed. Duration: "
        "3 sites of 30 ci-scale cases (the defaults) took 5 minutes for 2 rounds on 2 busy CPU cores, most of it "
        "segmenting each case once (cached for the next run); demo and paper scale take far longer.",
    )
    p.add_argument("--sites", type=int, help="number of simulated sites (default: one per --site-dirs folder)")
    p.add_argument("--profiles", help="comma-separated site profiles, cycled over the sites")
    p.add_argument("--site-dirs", help="comma-separated existing site folders instead of simulated cohorts")
    p.add_argument("--cases-per-site", type=int, default=30,
                   help="cases per simulated site (default 30: at the default --fine-tune-fraction 0.2 each site "
                   "gets the 5 fine-tune cases a head update needs)")
    p.add_argument("--scale", default="ci", choices=["ci", "demo", "paper"], help="simulated image scale (default ci)")
    p.add_argument("--rounds", type=int, required=True, help="federated rounds")
    p.add_argument("--bundle", required=True, help="signed reference bundle folder")
    p.add_argument("--pubkey", help="coordinator's Ed25519 public key (default: the development key that "
                   "'ichfed bootstrap' wrote in <bundle>-keys/)")
    p.add_argument("--signing-key", help="coordinator's private key: sign and distribute the federated bundle")
    p.add_argument("--out", required=True, help="output folder (sites, server state, report)")
    p.add_argument("--local-epochs", type=int, default=20, help="head epochs per round at each site (default 20)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate of the head (default 1e-3)")
    p.add_argument("--fine-tune-fraction", type=float, default=0.2,
                   help="share of each site's labelled cases (per class) for fine-tuning (default 0.2)")
    p.add_argument("--min-cases", type=int, default=5,
                   help="fewest cases for a site to report metrics or send a head update (at least 5)")
    p.add_argument("--min-sites", type=int, help="fewest usable sites per round (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated cohorts (and of the first split)")
    p.add_argument("--repeats", type=int, default=1, metavar="K",
                   help="run the federation K times with split seeds seed..seed+K-1 on the same cohorts and "
                   "cached features; report mean ± SD of every headline figure (default 1)")
    p.add_argument("--segmenter-rounds", type=int, default=0, metavar="R",
                   help="federated nnU-Net fine-tuning rounds before the head rounds, every site opted in "
                   "(needs --signing-key; docs/federation.md, 'Segmenter rounds'; default 0: off)")
    p.add_argument("--segmenter-trainable", default="all", choices=["decoder", "all"],
                   help="what the sites fine-tune in segmenter rounds (default all)")
    p.add_argument("--segmenter-epochs", type=int, default=10,
                   help="nnU-Net epochs per segmenter round (default 10)")
    p.add_argument("--segmenter-iterations", type=int, default=15,
                   help="nnU-Net iterations per epoch in segmenter rounds (default 15)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="site compute device (default cpu)")
    p.add_argument("--resume", action="store_true", help="continue after the last checkpoint in OUT/server")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="run the virtual sites on an existing Ray cluster (the address 'ray start --head' "
                   "printed, e.g. 10.0.0.5:6379); every node must see OUT and the bundle at the same paths "
                   "(default: a private Ray instance on this machine)")
    p.set_defaults(func=run)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def run(args) -> int:
    from server.report_arms import (
        arms_table_markdown,
        bootstrap_lines,
        comparisons_table_markdown,
    )
    from simulations.flower_sim import run as simulate

    if args.rounds < 1:
        raise IchfedError(f"--rounds: must be at least 1, got {args.rounds}")
    if args.repeats < 1:
        raise IchfedError(f"--repeats: must be at least 1, got {args.repeats}")
    pubkey = args.pubkey or default_public_key(args.bundle)
    kwargs = dict(
        n_sites=args.sites, profiles=_csv(args.profiles), site_dirs=_csv(args.site_dirs),
        cases_per_site=args.cases_per_site, scale=args.scale, seed=args.seed, signing_key=args.signing_key,
        local_epochs=args.local_epochs, learning_rate=args.learning_rate,
        fine_tune_fraction=args.fine_tune_fraction, min_cases_for_metrics=args.min_cases,
        min_sites=args.min_sites, device=args.device, ray_address=args.ray_address,
        segmenter_fine_tune=args.segmenter_rounds > 0,
        server_overrides={"segmenter_rounds": args.segmenter_rounds, "segmenter_trainable": args.segmenter_trainable,
                          "segmenter_epochs": args.segmenter_epochs, "segmenter_iterations": args.segmenter_iterations},
    )
    if args.repeats > 1:
        from simulations.repeats import run_repeats, summary_markdown

        if args.resume:
            raise IchfedError("--resume: cannot be combined with --repeats")
        summary = run_repeats(args.out, args.bundle, pubkey, args.rounds, args.repeats, split_seed=args.seed, **kwargs)
        print(summary_markdown(summary))
        print(f"summary: {args.out}/repeats/summary.md")
        return 0
    if sys.stderr.isatty():  # a script finds it in docs/simulations.md; its stderr stays quiet
        print(f"progress: {Path(args.out) / 'server' / 'runs'}/<run id>/events.jsonl (one JSON line per event; "
              f"{Path(args.out) / 'server' / 'latest_run'} names the run)", file=sys.stderr)
    report = simulate(args.out, args.bundle, pubkey, args.rounds, resume=args.resume, **kwargs)
    print(arms_table_markdown(report))
    print(comparisons_table_markdown(report))
    for line in bootstrap_lines(report):
        print(line)
    print(f"report: {args.out}/report/report.md")
    return 0
