"""`ichfed predict`: segment and classify one or more head CTs with a signed bundle."""

from __future__ import annotations

import json
import logging
import sys

from shared.errors import IchfedError

log = logging.getLogger(__name__)


def add_bundle_args(p) -> None:
    """Options every command that loads a bundle shares."""
    p.add_argument("--bundle", required=True, help="model bundle directory or .tar")
    p.add_argument("--pubkey", help="coordinator's Ed25519 public key that must have signed the bundle")
    p.add_argument(
        "--site-config",
        help="site config TOML: its public key verifies the bundle and its locally calibrated threshold is used",
    )
    p.add_argument(
        "--allow-unsigned", action="store_true", help="development only: accept a bundle without a valid signature"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (default: auto)")


def register(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="segment ICH/PHE and classify neoplastic vs non-neoplastic",
        description="Read each IMAGE (NIfTI, DICOM folder or zip of one series), segment ICH and PHE, "
        "and print volumes, densities and the neoplastic probability. The model is loaded once.",
    )
    add_bundle_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print one JSON object per image (JSON Lines)")
    p.add_argument("--save-masks", metavar="DIR", help="write each predicted label map to DIR")
    p.add_argument("--mirroring", choices=("auto", "on", "off"), default="auto",
                   help="nnU-Net test-time mirroring (default auto: on with CUDA, off on CPU, where it costs 8x)")
    p.add_argument("--tile-step-size", type=float, default=0.5, metavar="F",
                   help="nnU-Net sliding-window step as a fraction of the patch, in (0, 1] (default 0.5, "
                   "nnU-Net's; 0.75 needs about a third of the patches on large images, slightly less accurate)")
    p.set_defaults(func=run)


def load_predictor(args, threshold_config: str | None = None):
    """Verify and load the bundle named on the command line into a ``Predictor``.

    With a site config, its coordinator key verifies the bundle and the site's locally calibrated
    threshold for that exact bundle (by hash) replaces the bundle's own.
    """
    from shared.bundle import open_bundle
    from shared.pipeline import Predictor

    mirroring = {"auto": None, "on": True, "off": False}[getattr(args, "mirroring", "auto")]
    tile_step = getattr(args, "tile_step_size", 0.5)
    if not 0.0 < tile_step <= 1.0:  # checked before minutes of bundle verification and model loading
        raise IchfedError(f"--tile-step-size: must be in (0, 1], got {tile_step:g}")
    pubkey = args.pubkey
    site = None
    site_config = threshold_config or getattr(args, "site_config", None)
    if site_config:
        from client.runtime import load_site_config

        site = load_site_config(site_config)
        pubkey = pubkey or site.public_key
    if pubkey is None and not args.allow_unsigned:
        raise IchfedError("--pubkey: a trusted public key is required to verify the bundle (or --site-config)")
    bundle = open_bundle(args.bundle, pubkey, allow_unsigned=args.allow_unsigned)  # a folder or a packed .tar
    threshold = None
    if site is not None:
        from client.overlay import load_overlay

        # The one reader of a site's overlay: a broken threshold file is a one-line error here.
        overlay = load_overlay(site.state_dir, bundle.hash)
        threshold = None if overlay is None else overlay.threshold
        if threshold is None:
            log.warning(
                "%s: no local threshold for bundle %s in %s; using the bundle's threshold",
                site_config,
                bundle.hash[:12],
                site.state_dir,
            )
    return Predictor(bundle, device=args.device, threshold=threshold, use_mirroring=mirroring, tile_step_size=tile_step)


def run(args) -> int:
    """Predict every image; a failure is reported for its image and the rest still run (exit 2 if any failed)."""
    if args.save_masks:
        _check_masks_dir(args.save_masks)
        _check_mask_names(args.images)
    predictor = load_predictor(args)
    failed = 0
    for image in args.images:
        try:
            result = predictor.predict(image, save_masks_dir=args.save_masks)
        except IchfedError as e:
            # One bad file must not cost the results of the others.
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        except (KeyboardInterrupt, BrokenPipeError):
            raise
        except Exception as e:  # any failure (a library bug, out of memory) is this image's, not the run's
            if getattr(args, "debug", False):
                log.exception("%s", image)
            print(f"error: {image}: failed ({type(e).__name__}: {e})", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(format_result(result), flush=True)
    return 2 if failed else 0


def _check_masks_dir(path: str) -> None:
    """Refuse a --save-masks target that is an existing file, before minutes of model loading."""
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise IchfedError(f"--save-masks: {p} is an existing file, not a folder")
    if not p.exists() and not p.parent.is_dir():
        raise IchfedError(f"--save-masks: parent folder {p.parent} does not exist")


def _check_mask_names(images: list[str]) -> None:
    """Refuse inputs whose saved masks would overwrite each other (same file stem)."""
    from pathlib import Path

    from shared.pipeline import mask_file_name

    seen: dict[str, str] = {}
    for image in images:
        name = mask_file_name(Path(image))
        if name in seen:
            raise IchfedError(f"--save-masks: {image} and {seen[name]} would both be saved as {name}; rename one")
        seen[name] = image


def format_result(r: dict) -> str:
    """Human-readable summary of one prediction."""
    lines = [f"{r['source']}"]
    if not r["lesion_found"]:
        lines.append("  no hemorrhage found (not classified)")
    else:
        lines.append(f"  ICH  {r['ich_ml']:.1f} ml  mean {_hu(r['ich_mean_hu'])}   lesions: {r['n_components']}")
        lines.append(f"  PHE  {r['phe_ml']:.1f} ml  mean {_hu(r['phe_mean_hu'])}")
        flags = r.get("quality_flags") or []
        # A flagged (implausible) segmentation never gets a confident label, here as in the reader.
        verdict = f"not reliable, review (model: {r['label']})" if flags else r["label"]
        lines.append(
            f"  p(neoplastic) = {r['p_neoplastic']:.3f}  (threshold {r['threshold']:.3f}, "
            f"{r['threshold_source']})  ->  {verdict}"
        )
    if r.get("quality_flags"):
        lines.append(f"  quality flags: {', '.join(r['quality_flags'])}")
    if r.get("extracranial_ml_removed"):
        lines.append(f"  removed outside the skull: {r['extracranial_ml_removed']:.1f} ml")
    t = ", ".join(f"{k} {v:.2f}s" for k, v in r["timings"].items())
    lines.append(f"  bundle {r['bundle']['name']} {r['bundle']['version']}   timings: {t}")
    return "\n".join(lines)


def _hu(v) -> str:
    return "n/a" if v is None else f"{v:.0f} HU"
