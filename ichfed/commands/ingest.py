"""`ichfed ingest`: read a NIfTI file, DICOM folder or zip into a HU NIfTI volume."""

from __future__ import annotations

import json
from pathlib import Path

from shared.plumbing.errors import IchfedError

from ..ingest_args import add_ingest_args, ingest_options


def register(sub) -> None:
    """Add the ``ingest`` subcommand."""
    p = sub.add_parser(
        "ingest",
        help="read a CT (NIfTI, DICOM folder or zip) into a float32 HU NIfTI; prints a JSON summary",
        description=(
            "Read a NIfTI file, a folder holding one DICOM series, or a .zip of one, into a float32 "
            "Hounsfield-unit volume. Gantry tilt and uneven slice spacing are resampled onto a regular "
            "grid. Writes OUT atomically and prints one JSON object (shape in x,y,z order, spacing, "
            "origin, direction, modality, hu_min, hu_max, corrections, source_slices, notes). A DICOM "
            "series with a missing slice, or a NIfTI file whose qform/sform/pixdim disagree, is refused "
            "unless accepted with the options below."
        ),
    )
    p.add_argument("input", metavar="INPUT", help="a .nii/.nii.gz file, a DICOM series folder, or a .zip of one")
    p.add_argument("-o", "--output", metavar="OUT.nii.gz", required=True, help="where to write the volume (.nii.gz or .nii)")
    add_ingest_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    """Ingest ``args.input``, write ``args.output``, print the summary JSON."""
    import SimpleITK as sitk

    from shared.imaging.ingest import describe, read_image
    from shared.plumbing.atomic import atomic_path

    out = Path(args.output)
    if not out.name.lower().endswith((".nii.gz", ".nii")):
        raise IchfedError(f"{out}: output must end in .nii.gz or .nii")
    if not out.parent.is_dir():
        # A typo in the folder would otherwise create a tree somewhere unexpected; checked before reading.
        raise IchfedError(f"{out}: parent folder {out.parent} does not exist")
    if out.is_dir():
        raise IchfedError(f"{out}: is a folder; give a file name ending in .nii.gz or .nii")
    ingested = read_image(args.input, ingest_options(args))
    try:
        with atomic_path(out) as tmp:
            sitk.WriteImage(ingested.image, str(tmp), useCompression=True)
    except (OSError, RuntimeError) as e:
        raise IchfedError(f"{out}: cannot write ({str(e).strip().splitlines()[-1]})") from None
    print(json.dumps(describe(ingested)))
    return 0
