"""`ichfed site`: onboard a hospital site (config + SuperNode key) and dry-run its data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub) -> None:
    """Add ``ichfed site init`` and ``ichfed site check``."""
    p = sub.add_parser("site", help="set up a hospital site and check its data without contacting the server")
    psub = p.add_subparsers(dest="site_command", metavar="ACTION")

    init = psub.add_parser(
        "init",
        help="write a site config TOML and the site's SuperNode key pair",
        description=(
            "Writes site_configs/<name>.toml (or --out) and an EC P-384 SuperNode key pair in "
            "<state-dir>/keys/. Send the .pub file to the coordinator, who registers it with "
            "'flwr supernode register'. An existing key pair is kept unless --new-key."
        ),
    )
    init.add_argument("--name", required=True, help="site name (letters, digits, '.', '_', '-')")
    init.add_argument("--data", required=True, type=Path, help="the site folder (cases.csv, images/, masks/)")
    init.add_argument("--out", type=Path, default=None, help="config path (default site_configs/<name>.toml)")
    init.add_argument("--state-dir", type=Path, default=None,
                      help="where the site keeps caches, bundles and keys (default .ichfed/sites/<name>)")
    init.add_argument("--public-key", type=Path, default=None,
                      help="the coordinator's bundle-signing public key (PEM); without it no bundle is trusted")
    init.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    init.add_argument("--fine-tune-fraction", type=float, default=None)
    init.add_argument("--local-epochs", type=int, default=None)
    init.add_argument("--learning-rate", type=float, default=None)
    init.add_argument("--batch-size", type=int, default=None)
    init.add_argument("--min-cases-for-metrics", type=int, default=None)
    init.add_argument("--seed", type=int, default=None)
    init.add_argument("--force", action="store_true", help="replace an existing config file")
    init.add_argument("--new-key", action="store_true",
                      help="replace an existing SuperNode key (the coordinator must register the new one)")
    init.set_defaults(func=run_init)

    check = psub.add_parser(
        "check",
        help="dry run: read every case, count labels, list unusable cases, GPU and cached bundle",
        description="Reads the site config and every case locally; nothing is sent anywhere. "
                    "Exit 0 when the site is ready, 1 when it is not, 2 for a bad config.",
    )
    check.add_argument("config", type=Path, help="site config TOML")
    check.add_argument("--headers-only", action="store_true",
                       help="only locate files (skip opening every image; faster on large sites)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=run_check)

    approve = psub.add_parser(
        "approve",
        help="make a kept federated bundle the site's model (manual adoption)",
        description="A federated bundle that a run delivered but the site did not activate (adoption = "
                    "\"manual\" in the site config, too little evidence, or clearly worse on the site's own "
                    "out-of-fold scores) stays in the site's cache. This makes it the site's active model, the one "
                    "'ichfed predict --site-config' and the reader use. Without --bundle: the latest kept one.",
    )
    approve.add_argument("config", type=Path, help="site config TOML")
    approve.add_argument("--bundle", metavar="HASH", help="the kept bundle's hash (default: the latest kept one)")
    approve.add_argument("--force", action="store_true",
                         help="also activate a bundle kept as clearly worse on this site's evidence")
    approve.set_defaults(func=run_approve)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_init(args) -> int:
    """``ichfed site init``: validate, write the config and the node key pair, print next steps."""
    overrides = {
        k: getattr(args, k)
        for k in ("fine_tune_fraction", "local_epochs", "learning_rate", "batch_size", "min_cases_for_metrics", "seed")
        if getattr(args, k) is not None
    }
    from client.site_init import init_site

    result = init_site(
        name=args.name, data_dir=args.data, out=args.out, state_dir=args.state_dir, public_key=args.public_key,
        device=args.device, overrides=overrides, force=args.force, new_key=args.new_key,
    )
    print(f"site config      {result.config_path}")
    print(f"SuperNode key    {result.private_key}  ({'new' if result.new_key else 'kept existing'})")
    print(f"public key       {result.public_key}")
    print("next: send the public key to the coordinator, who runs")
    print(f"      flwr supernode register {result.public_key} <connection>")
    print("then start the SuperNode with")
    print(f"      flower-supernode --superlink <host>:<port> --root-certificates <ca.crt> "
          f"--auth-supernode-private-key {result.private_key} "
          f"--node-config \"site-config='{result.config_path}'\"")
    return 0


def run_approve(args) -> int:
    """``ichfed site approve``: activate a kept federated bundle; print what it was and why it was kept."""
    from client.adoption import approve
    from client.site_config import load_site_config

    model, record = approve(load_site_config(args.config), bundle_hash=args.bundle, force=args.force)
    ev = record.get("evidence") or {}

    def f(key: str) -> str:
        v = ev.get(key)
        return "n/a" if v is None else f"{v:.3f}"

    print(f"active model  {model.bundle_hash}  ({model.bundle_path})")
    print(f"was kept as   {record.get('decision')}: fine-tune AUC {f('candidate_auc')} ({ev.get('candidate_scores')}) "
          f"vs {f('current_auc')} for {str(record.get('compared_with', ''))[:12]}, "
          f"sensitivity {f('candidate_sensitivity')}, specificity {f('candidate_specificity')}")
    return 0


def run_check(args) -> int:
    """``ichfed site check``: print the dry-run report; exit 0 ready, 1 not ready."""
    from client.site_check import check_site

    report = check_site(args.config, open_images=not args.headers_only)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_check(report))
    return 0 if report["ready"] else 1


def render_check(report: dict) -> str:
    """The human-readable form of a ``check_site`` report."""
    c = report["cases"]
    lines = [
        f"site {report['site']}  (config {report['config']})",
        f"data        {report['data_dir']}",
        f"cases       {c['usable']} usable: {c['neoplastic']} neoplastic, {c['non_neoplastic']} non-neoplastic, "
        f"{c.get('unlabelled', 0)} unlabelled (normalisation statistics only); "
        f"{c['with_mask']} with reference masks; {c['unusable']} unusable",
    ]
    for u in report["unusable"]:
        lines.append(f"  unusable  {u['case_id'] or '(site)'}: {u['message']}")
    if report.get("skipped"):
        lines.append(f"skipped     {report['skipped']}")
    dev = report["device"]
    lines.append(f"device      {dev['selected'] or 'unavailable'} (config '{dev['config']}'; GPU: {dev['gpu'] or 'none'})")
    lines.append(f"public key  {report['public_key'] or 'not set'}")
    if report["bundles"]:
        for b in report["bundles"]:
            lines.append(f"bundle      {b['hash']}  {b['name']} {b['version']}  {b['status']}")
    else:
        lines.append("bundle      none cached yet (the server sends it on the first run)")
    lines.append("ready" if report["ready"] else "NOT READY: " + "; ".join(report["not_ready"]))
    return "\n".join(lines)
