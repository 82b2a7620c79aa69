"""`ichfed predict`: segment and classify one or more head CTs with a signed bundle."""

from __future__ import annotations

import json
import logging
import sys

from shared.plumbing.errors import IchfedError

from ..bundle_args import add_bundle_args, load_predictor
from ..ingest_args import add_ingest_args, ingest_options
from ..result_text import format_result

log = logging.getLogger(__name__)


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
    add_ingest_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    """Predict every image; a failure is reported for its image and the rest still run (exit 2 if any failed)."""
    if args.save_masks:
        _check_masks_dir(args.save_masks)
        _check_mask_names(args.images)
    options = ingest_options(args)
    predictor = load_predictor(args)
    failed = 0
    for image in args.images:
        try:
            result = predictor.predict(image, save_masks_dir=args.save_masks, ingest_options=options)
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
            print(json.dumps(result.to_dict()), flush=True)
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
