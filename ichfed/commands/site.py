"""`ichfed site`: onboard a hospital site (config + SuperNode key, or the coordinator's site kit),
dry-run its data and check its connection before any run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub) -> None:
    """Add ``ichfed site init``, ``check``, ``kit``, ``preflight`` and ``approve``."""
    p = sub.add_parser("site", help="set up a hospital site (config and key, or its kit), dry-run its data, "
                       "check its connection before a run")
    psub = p.add_subparsers(dest="site_command", metavar="ACTION")
    _register_init(psub)
    check = psub.add_parser(
        "check",
        help="dry run: read every case, compute the split a run will use, GPU and cached bundle",
        description="Reads the site config and every case locally; nothing is sent anywhere. Computes the "
                    "fine-tune / held-out split and the cross-fit folds a run will use (fine_tune_fraction of the "
                    "labelled cases of each class): fewer fine-tune cases than min_cases_for_metrics (at least "
                    "5) is NOT READY, with the fine_tune_fraction or the number of added cases that fixes it. "
                    "Also counts the cases with a reference mask in each part (segmenter rounds, "
                    "segmenter_fine_tune). Exit 0 when the site is ready, 1 when it is not, 2 for a bad config.",
    )
    _check_options(check)
    check.set_defaults(func=run_check)
    _register_kit(psub)
    pre = psub.add_parser(
        "preflight",
        help="before a run: reach the SuperLink over TLS with the site's registered key, then run site check",
        description="Connects to the SuperLink as the SuperNode will (TLS verified against the CA certificate, "
                    "Flower's node activation signed with the site's key, deactivated at once; no run is joined), "
                    "then runs 'ichfed site check'. The SuperLink address, CA certificate and key come from the "
                    "options or from supernode.env beside CONFIG (a site kit). Exit 0 ready, 1 not, 2 bad input.",
    )
    _check_options(pre)
    pre.add_argument("--superlink", metavar="HOST:PORT", help="the SuperLink (default: SUPERLINK in supernode.env)")
    pre.add_argument("--root-certificates", type=Path, metavar="CA_CERT",
                     help="the CA certificate (default: ROOT_CERTIFICATES in supernode.env)")
    pre.add_argument("--auth-supernode-private-key", type=Path, metavar="KEY",
                     help="the site's SuperNode private key (default: NODE_KEY in supernode.env)")
    pre.set_defaults(func=run_preflight)
    _register_approve(psub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _register_approve(psub) -> None:
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


def _register_init(psub) -> None:
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


def _check_options(p) -> None:
    p.add_argument("config", type=Path, help="site config TOML")
    p.add_argument("--headers-only", action="store_true",
                   help="only locate files (skip opening every image; faster on large sites)")
    p.add_argument("--cross-fit-folds", type=int, default=None, metavar="K",
                   help="the run's cross-fit-folds (default 5, the run config's default; 0 = off)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _register_kit(psub) -> None:
    kit = psub.add_parser(
        "kit",
        help="coordinator: write one folder per site (config, CA cert, bundle key, fingerprints, start script, "
             "systemd unit)",
        description="Writes OUT/<site>/ for each site from the PKI folder of 'ichfed pki init': site.toml, ca.crt, "
                    "bundle_signing_key.pub.pem, FINGERPRINTS.txt, the SuperNode key pair when PKI/nodes holds it "
                    "(else only the .pub: the site adds its own private key), supernode.env, start-supernode.sh, "
                    "a systemd unit and a README. Hand each kit to its site over a secure channel.",
    )
    kit.add_argument("--pki", required=True, type=Path, metavar="DIR", help="the folder of 'ichfed pki init'")
    kit.add_argument("--sites", required=True, help="comma-separated site names (their node keys are in PKI/nodes)")
    kit.add_argument("--superlink", required=True, metavar="HOST:PORT",
                     help="the SuperLink address the sites connect to (e.g. fl.example.org:9093)")
    kit.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the kits (one per site)")
    kit.add_argument("--install-dir", metavar="PATH",
                     help="where a site puts its kit, for the systemd unit (default /opt/ichfed/<site>)")
    kit.add_argument("--venv", default="/opt/ichfed/.venv",
                     help="the sites' virtual environment holding ichfed (default %(default)s)")
    kit.add_argument("--port", type=int, default=9094, help="the SuperNode's local port (default %(default)s)")
    kit.add_argument("--force", action="store_true", help="replace existing kits")
    kit.set_defaults(func=run_kit)


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
    print("check the site before the first run with")
    print(f"      ichfed site check {result.config_path}")
    print(f"      ichfed site preflight {result.config_path} --superlink <host>:<port> --root-certificates <ca.crt> "
          f"--auth-supernode-private-key {result.private_key}")
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

    report = check_site(args.config, open_images=not args.headers_only, cross_fit_folds=args.cross_fit_folds)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else render_check(report))
    return 0 if report["ready"] else 1


def run_preflight(args) -> int:
    """``ichfed site preflight``: connection and data checks; exit 0 ready, 1 not ready."""
    from client.site_preflight import preflight

    report = preflight(args.config, superlink=args.superlink, root_certificates=args.root_certificates,
                       node_key=args.auth_supernode_private_key, open_images=not args.headers_only,
                       cross_fit_folds=args.cross_fit_folds)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        c = report["connection"]
        lines = [f"superlink   {c['superlink']}",
                 f"tls         {'ok' if c['tls']['ok'] else 'FAILED'}: {c['tls'].get('detail', '')}",
                 f"node key    {'ok' if c['registered']['ok'] else 'FAILED'}: {c['registered'].get('detail', 'not tried')}",
                 f"ca.crt      {c['ca_fingerprint']}"]
        print("\n".join(lines) + "\n" + render_check(report))
    return 0 if report["ready"] else 1


def run_kit(args) -> int:
    """``ichfed site kit``: one folder per site; print each with its fingerprints."""
    from client.site_kit import write_kit

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    if not sites:
        from shared.plumbing.errors import IchfedError

        raise IchfedError("--sites: no site names given")
    for site in sites:
        kit = write_kit(args.pki, site, args.superlink, args.out, install_dir=args.install_dir, venv=args.venv,
                        port=args.port, force=args.force)
        key = "with its SuperNode key pair" if kit.has_private_key else "public node key only: the site adds its own"
        print(f"site {site:<15} {kit.folder}  ({key})")
        for name, fp in kit.fingerprints.items():
            print(f"  {name:<28} {fp}")
    print("hand each kit to its site over a secure channel; read the fingerprints to the site by phone")
    return 0


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
    lines += _split_lines(report.get("split"))
    lines += _segmenter_lines(report.get("segmenter"))
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


def _segmenter_lines(seg: dict | None) -> list[str]:
    """The masks a site has for segmenter rounds (issue 24), as ``site check`` prints them."""
    if not seg:
        return []
    state = "on" if seg["opted_in"] else "off"
    lines = [f"segmenter   {seg['masked_fine_tune']} masked fine-tune case(s) + {seg['masked_unlabelled']} masked "
             f"unlabelled = {seg['masked_for_fine_tuning']} to fine-tune on, {seg['masked_held_out']} masked held-out "
             f"to judge a segmenter on; segmenter_fine_tune {state} (needs {seg['min_cases']})"]
    return lines + [f"warning     {w}" for w in seg["warnings"]]


def _split_lines(split: dict | None) -> list[str]:
    """The split a run will use, as ``site check`` prints it."""
    if not split:
        return []
    f, h = split["fine_tune"], split["held_out"]
    lines = [f"split       fine-tune {split['n_fine_tune']} ({f['neoplastic']} neoplastic, {f['non_neoplastic']} "
             f"non-neoplastic), held out {split['n_held_out']} ({h['neoplastic']} / {h['non_neoplastic']}) at "
             f"fine_tune_fraction {split['fine_tune_fraction']:g}; a head update needs {split['min_cases']} "
             "fine-tune cases (cases without a segmented lesion do not count)"]
    if split["cross_fit_folds"]:
        sizes = ", ".join(str(n) for n in split["fold_sizes"]) or "none"
        lines.append(f"cross-fit   {split['cross_fit_folds']} folds of {sizes} fine-tune case(s)")
    lines += [f"warning     {w}" for w in split["warnings"]]
    return lines
