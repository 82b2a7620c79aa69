"""`ichfed cohort`: synthetic multi-site ICH cohorts (make, preview, profiles, baseline)."""

from __future__ import annotations

import argparse
import json


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def register(sub) -> None:
    """Add the ``cohort`` subcommand and its actions."""
    p = sub.add_parser(
        "cohort",
        help="generate synthetic ICH site cohorts (images, masks, cases.csv) and preview them",
        description="Synthetic multi-site ICH cohorts with known truth, for tests, the demo and site simulation.",
    )
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    actions = p.add_subparsers(dest="cohort_action", metavar="ACTION")

    m = actions.add_parser(
        "make",
        help="write a site folder: images/, masks/, cases.csv (deterministic for a seed)",
        description=(
            "Generate N cases of a site profile and write images/<case>.nii.gz (int16 HU), "
            "masks/<case>.nii.gz (0 background, 1 ICH, 2 PHE) and cases.csv. Prints a JSON summary."
        ),
    )
    m.add_argument("--profile", required=True, metavar="NAME|FILE.toml", help="built-in profile name or a profile TOML")
    m.add_argument("--cases", required=True, type=_positive_int, metavar="N", help="number of cases")
    m.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    m.add_argument("--out", required=True, metavar="DIR", help="output site folder (empty or a previous cohort)")
    m.add_argument("--scale", choices=("demo", "paper", "ci"), default="demo",
                   help="grid: paper ~512x512x30 @0.45 mm, demo ~128x128x24 @1.8 mm, ci ~64x64x16 @3.6 mm")
    m.add_argument("--background", choices=("phantom", "real"), default="phantom",
                   help="synthetic phantom head, or the real hemorrhage-free head CT in ../shared/data/ct")
    m.set_defaults(func=run_make)

    v = actions.add_parser("preview", help="montage of axial slices with ICH (green) and PHE (red) outlines")
    v.add_argument("folder", metavar="DIR", help="a site folder (cases.csv, images/, masks/)")
    v.add_argument("-o", "--output", required=True, metavar="PREVIEW.png", help="image to write")
    v.add_argument("--cases", type=_positive_int, default=6, metavar="K", help="number of cases shown (default 6)")
    v.set_defaults(func=run_preview)

    lp = actions.add_parser("profiles", help="list the built-in site profiles")
    lp.set_defaults(func=run_profiles)

    b = actions.add_parser(
        "baseline",
        help="AUC of logistic regression on the true PHE/ICH volume ratio (how hard a profile is)",
    )
    b.add_argument("--profile", required=True, metavar="NAME|FILE.toml")
    b.add_argument("--cases", type=_positive_int, default=4000, metavar="N")
    b.add_argument("--seed", type=int, default=0, metavar="S")
    b.set_defaults(func=run_baseline)


def run_make(args) -> int:
    """Write the cohort and print its summary."""
    from pathlib import Path

    from simulations.cohort import write_cohort

    summary = write_cohort(args.profile, args.cases, args.seed, Path(args.out), scale=args.scale,
                           background=args.background)
    print(json.dumps(summary.to_dict(), sort_keys=True))
    return 0


def run_preview(args) -> int:
    """Render the preview montage."""
    from simulations.preview import render_preview

    out = render_preview(args.folder, args.output, n_cases=args.cases)
    print(str(out))
    return 0


def run_profiles(args) -> int:
    """Print one line per built-in profile: name and description."""
    from simulations.profiles import list_profiles, load_profile

    for name in list_profiles():
        print(f"{name}\t{load_profile(name).description}")
    return 0


def run_baseline(args) -> int:
    """Print the volume-ratio baseline AUC as JSON."""
    from simulations.cohort import volume_ratio_auc

    print(json.dumps(volume_ratio_auc(args.profile, n_cases=args.cases, seed=args.seed), sort_keys=True))
    return 0
