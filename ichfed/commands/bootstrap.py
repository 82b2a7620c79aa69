"""`ichfed bootstrap`: train the reference nnU-Net and ResNet-34 and write a signed bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

# Measured: ci 298 s on 2 busy cores (the test fixture), demo 844 s on 2 idle cores
# (benchmarks/results/bootstrap.json). README.md states the same.
DURATIONS = ("ci about 5 min on 2 CPU cores (a smoke test: 16 cases, 2 test cases), demo about 15 min on 2 cores "
             "(480 synthetic cases), paper hours (the paper's sizes; use a GPU)")


def register(sub) -> None:
    p = sub.add_parser(
        "bootstrap",
        help="train reference segmentation + classifier models and write a signed bundle",
        description="Generate the development cohort (charite-like) or use --site, train nnU-Net and the "
        "ResNet-34, evaluate end to end on the held-out 10% and write a signed bundle plus a report "
        "(OUT-report.md / OUT-report.json). Sign with the coordinator's key (--key pki/bundle_signing_key.pem "
        "from 'ichfed pki init'): the sites trust only that key. Expected duration on CPU: " + DURATIONS + ".",
    )
    p.add_argument("--profile", default="demo", choices=["ci", "demo", "paper"],
                   help="run size, the bootstrap recipe (default: demo): " + DURATIONS)
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--site", help="train on this site folder (site data layout) instead of the synthetic cohort")
    p.add_argument("--key", help="Ed25519 private key that signs the bundle: the coordinator's "
                   "pki/bundle_signing_key.pem (default: a new development key in OUT-keys/, for trying things out)")
    p.add_argument("--work", help="working folder for cohort, nnU-Net data and curves (default: OUT-work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from server.bootstrap import bootstrap, get_recipe, render_report

    out = Path(args.out)
    recipe = get_recipe(args.profile)
    work_dir = Path(args.work) if args.work else out.parent / f"{out.name}-work"
    options = dict(out=out, work_dir=work_dir, seed=args.seed, key_path=Path(args.key) if args.key else None,
                   device=args.device)
    if args.site:
        report = bootstrap(recipe, site_dir=Path(args.site), **options)
    else:  # the synthetic development cohort, written into the work folder first
        from simulations.reference import bootstrap_development

        report = bootstrap_development(recipe, **options)
    print(render_report(report))
    print(f"bundle: {report['bundle']}\nsigning key: {report['signing_key']}")
    return 0
