"""`ichfed site`: onboard a hospital site (config + SuperNode key) and dry-run its data."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from shared.errors import IchfedError

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
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_init(args) -> int:
    """``ichfed site init``: validate, write the config and the node key pair, print next steps."""
    overrides = {
        k: getattr(args, k)
        for k in ("fine_tune_fraction", "local_epochs", "learning_rate", "batch_size", "min_cases_for_metrics", "seed")
        if getattr(args, k) is not None
    }
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


def run_check(args) -> int:
    """``ichfed site check``: print the dry-run report; exit 0 ready, 1 not ready."""
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
        f"cases       {c['usable']} usable: {c['neoplastic']} neoplastic, {c['non_neoplastic']} non-neoplastic; "
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


# -- the work behind the two actions (ichfed may import client; shared may not) -------------


@dataclasses.dataclass(frozen=True)
class SiteInit:
    """What ``init_site`` wrote."""

    config_path: Path
    private_key: Path
    public_key: Path
    new_key: bool


def node_key_paths(state_dir: Path, name: str) -> tuple[Path, Path]:
    """Where a site's SuperNode key pair lives: ``<state_dir>/keys/<name>`` and ``.pub``."""
    return state_dir / "keys" / name, state_dir / "keys" / f"{name}.pub"


def init_site(
    name: str,
    data_dir: Path,
    out: Path | None = None,
    state_dir: Path | None = None,
    public_key: Path | None = None,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    new_key: bool = False,
) -> SiteInit:
    """Write a validated site config and make (or keep) the site's SuperNode key pair.

    Paths are stored absolute so the SuperNode can be started from any folder. An existing
    key pair is kept by default because the coordinator has registered its public half.
    """
    from client.runtime import SiteConfig, load_site_config, write_site_config
    from shared.config import from_dict
    from shared.pki import check_site_name, write_node_keypair

    check_site_name(name, "--name")
    data = Path(data_dir).resolve()
    if not data.is_dir():
        raise IchfedError(f"--data: {data} is not a folder")
    if not (data / "cases.csv").is_file():
        raise IchfedError(f"--data: {data / 'cases.csv'} not found (a site folder holds cases.csv, images/, masks/)")
    if public_key is not None:
        from shared.signing import load_public_key

        load_public_key(public_key)  # a wrong file is caught now, not at the first federated round
    state = (Path(state_dir) if state_dir is not None else Path(".ichfed") / "sites" / name).resolve()
    config_path = Path(out) if out is not None else Path("site_configs") / f"{name}.toml"
    if config_path.exists() and not force:
        raise IchfedError(f"{config_path}: already exists (pass --force to replace it)")
    raw = {"name": name, "data_dir": str(data), "state_dir": str(state), "device": device, **(overrides or {})}
    if public_key is not None:
        raw["public_key"] = str(Path(public_key).resolve())
    cfg = from_dict(SiteConfig, raw, source="ichfed site init")
    private, public = node_key_paths(state, name)
    made = False
    if new_key or not private.exists() or not public.exists():
        write_node_keypair(private, public, force=True)
        made = True
    else:
        from shared.pki import load_node_public_key

        load_node_public_key(public)
        log.info("keeping existing SuperNode key %s", private)
    write_site_config(cfg, config_path)
    load_site_config(config_path)  # what we wrote must read back
    return SiteInit(config_path=config_path.resolve(), private_key=private, public_key=public, new_key=made)


def check_site(config_path: Path, open_images: bool = True) -> dict[str, Any]:
    """Dry run of a site: config, every case, device and cached bundles; nothing leaves the machine.

    A bad config raises ``IchfedError``; everything else is reported in the returned dict,
    with ``ready`` False and ``not_ready`` reasons when the site cannot take part.
    """
    from tqdm import tqdm

    from client.runtime import load_site_config
    from shared.sitedata import read_site

    cfg = load_site_config(config_path)
    not_ready: list[str] = []
    site = read_site(cfg.data_dir)
    unusable = [{"case_id": p.case_id, "message": p.message} for p in site.problems]
    usable = []
    skipped = None
    if open_images:
        for case in tqdm(site.cases, desc=f"{cfg.name}: reading cases", unit="case", disable=None):
            why = _open_case(case)
            if why:
                unusable.append({"case_id": case.case_id, "message": why})
            else:
                usable.append(case)
    else:
        usable = list(site.cases)
        n_masks = sum(1 for c in usable if c.mask_path is not None)
        skipped = (f"--headers-only: pixel data of {len(usable)} image(s) and {n_masks} mask(s) not read, so "
                   "truncated payloads, DICOM pixel data, mask values and zip contents are not checked")
    n_pos = sum(1 for c in usable if c.label == 1)
    n_neg = len(usable) - n_pos
    if not usable:
        not_ready.append("no usable cases")
    elif not n_pos or not n_neg:
        not_ready.append("usable cases of only one class (fine-tuning needs both)")

    device = _device_report(cfg.device)
    if device["selected"] is None:
        not_ready.append(device["error"])

    if cfg.public_key is None:
        not_ready.append("no public_key: the site cannot verify (and so will refuse) any bundle")
    elif not Path(cfg.public_key).is_file():
        not_ready.append(f"public_key {cfg.public_key} not found")
    bundles = _bundle_report(cfg)
    if any(b["status"] != "verified" for b in bundles):
        not_ready.append("a cached bundle does not verify (delete it; the server sends it again)")

    return {
        "site": cfg.name,
        "config": str(Path(config_path).resolve()),
        "data_dir": str(cfg.data_dir),
        "state_dir": str(cfg.state_dir),
        "cases": {
            "listed": len(site.cases) + len({p.case_id for p in site.problems if p.case_id is not None}),
            "usable": len(usable),
            "unusable": len({u["case_id"] for u in unusable if u["case_id"] is not None}),
            "neoplastic": n_pos,
            "non_neoplastic": n_neg,
            "with_mask": sum(1 for c in usable if c.mask_path is not None),
            "images_opened": open_images,
        },
        "unusable": unusable,
        "skipped": skipped,
        "device": device,
        "public_key": str(cfg.public_key) if cfg.public_key else None,
        "bundles": bundles,
        "ready": not not_ready,
        "not_ready": not_ready,
    }


def _open_case(case) -> str | None:
    """Read a case's image fully and its mask against it; the reason it is unusable, or None."""
    from shared.ingest import read_image
    from shared.sitedata import read_mask

    try:
        image = read_image(case.image_path).image
        if case.mask_path is not None:
            read_mask(case.mask_path, image)
    except IchfedError as e:
        return str(e)
    except Exception as e:  # a reader failure on one case must not hide the report on the others
        log.debug("case %s", case.case_id, exc_info=True)
        return f"{case.image_path}: unreadable ({type(e).__name__}: {e})"
    return None


def _device_report(preference: str) -> dict[str, Any]:
    from shared.device import pick_device

    try:
        dev = pick_device(preference)
    except IchfedError as e:
        return {"config": preference, "selected": None, "gpu": None, "error": str(e)}
    gpu = None
    if dev.type == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(dev)
    return {"config": preference, "selected": dev.type, "gpu": gpu, "error": None}


def _bundle_report(cfg) -> list[dict[str, Any]]:
    """Every bundle in the site's cache, checked against the site's public key."""
    from shared.bundle import load_bundle
    from shared.errors import BundleVerificationError
    from shared.transport import bundle_cache_dir, cached_bundle

    cache = bundle_cache_dir(cfg.state_dir)
    out: list[dict[str, Any]] = []
    if not cache.is_dir():
        return out
    for d in sorted(cache.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        entry: dict[str, Any] = {"hash": d.name, "name": None, "version": None}
        try:
            if cached_bundle(cache, d.name) is None:
                entry["status"] = "hash mismatch"
            elif cfg.public_key is None:
                entry["status"] = "not verified (no public_key)"
            else:
                b = load_bundle(d, cfg.public_key)
                entry.update(name=b.manifest.name, version=b.manifest.version, status="verified")
        except BundleVerificationError as e:
            entry["status"] = f"verification failed: {e}"
        except IchfedError as e:
            entry["status"] = f"not a bundle: {e}"
        out.append(entry)
    return out
