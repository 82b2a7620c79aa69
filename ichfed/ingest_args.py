"""Options shared by the commands that read a scan (``ichfed ingest``, ``ichfed predict``).

By default ingestion refuses a DICOM series with a missing slice and a NIfTI file whose qform,
sform and pixdim disagree; these options accept one explicitly, and the JSON's notes say so.
A command module never imports another command; what two of them share lives here.
"""

from __future__ import annotations


def add_ingest_args(p) -> None:
    """Add ``--allow-missing-slices`` and ``--nifti-geometry`` to parser ``p``."""
    p.add_argument("--allow-missing-slices", action="store_true",
                   help="DICOM: interpolate across missing slices (a gap in InstanceNumber or in position) "
                   "instead of refusing the series; the JSON notes say where")
    p.add_argument("--nifti-geometry", choices=("sform", "qform"), default=None,
                   help="NIfTI: when the qform and sform (or pixdim) disagree, use this form instead of "
                   "refusing the file; the JSON notes say so (default: refuse; the standard uses the sform)")


def ingest_options(args):
    """The ``shared.imaging.ingest.IngestOptions`` the parsed options name."""
    from shared.imaging.ingest import IngestOptions

    return IngestOptions(allow_missing_slices=bool(getattr(args, "allow_missing_slices", False)),
                         nifti_geometry=getattr(args, "nifti_geometry", None))
