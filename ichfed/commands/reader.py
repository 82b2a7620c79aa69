"""`ichfed reader`: the web page where a clinician drops a head CT and reads the result."""

from __future__ import annotations

import logging

from shared.plumbing.errors import IchfedError

from ..bundle_args import add_bundle_args, load_predictor

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "reader",
        help="serve the reader web page (drop a head CT, see ICH/PHE overlays and the prediction)",
        description="Serve a local web page: drop a head CT (NIfTI, zip of one DICOM series, or a DICOM folder) "
        "and see ICH (green) and PHE (red) overlays, volumes, densities and the neoplastic-vs-non-neoplastic bar. "
        "The model is loaded once; cases run one at a time in a temporary folder deleted afterwards.",
    )
    add_bundle_args(p)
    p.add_argument(
        "--threshold-from",
        dest="site_config",
        metavar="SITE_CONFIG",
        help="site config TOML whose locally calibrated threshold (and public key) to use; same as --site-config",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-upload-mb", type=float, default=512.0, help="largest accepted upload in MB (default: 512)")
    p.add_argument(
        "--case-ttl-min", type=float, default=30.0, help="minutes an idle case stays viewable in memory (default: 30)"
    )
    p.add_argument(
        "--max-queued", type=int, default=4,
        help="cases waiting or running at once; more uploads are refused with 429 and Retry-After (default: 4)",
    )
    p.add_argument(
        "--max-cases", type=int, default=8,
        help="cases held at once, finished ones included; finished cases are never evicted for new ones (default: 8)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from client.reader.app import (
        ReaderSettings,
        create_app,
        loopback_hosts,
        make_analyse,
        model_info,
        serve,
    )
    from shared.plumbing.config import from_dict

    if not 0 < args.port < 65536:
        raise IchfedError(f"--port: must be between 1 and 65535, got {args.port}")
    settings = from_dict(
        ReaderSettings,
        {
            "max_upload_mb": args.max_upload_mb,
            "case_ttl_min": args.case_ttl_min,
            "max_queued": args.max_queued,
            "max_cases": args.max_cases,
        },
        source="ichfed reader",
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("reader: binding to %s — the page is reachable from other machines", args.host)
    predictor = load_predictor(args)
    info = model_info(predictor)
    app = create_app(make_analyse(predictor), info, settings, allowed_hosts=loopback_hosts(args.host))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"ichfed reader: {info['bundle']['name']} {info['bundle']['version']} on http://{shown}:{args.port}/ "
        "(Ctrl+C to stop)",
        flush=True,
    )
    serve(app, host=args.host, port=args.port)
    return 0
