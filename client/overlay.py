"""A site's own state on top of a bundle: the site overlay, keyed by bundle hash.

An overlay holds the site's out-of-sample threshold, the site's re-fitted probability calibration
and, optionally, the site's own BatchNorm statistics of the classifier backbone (AdaBN/FedBN,
``shared.models.batchnorm_stats``). It lives in ``<state_dir>/overlay/<bundle hash>.json``, the
statistics beside it in ``<bundle hash>.norm.safetensors`` (their sha256 in the JSON; read
without pickle and checked against the backbone before use). None of it leaves the site.

``load_overlay`` is the one reader: ``ichfed predict --site-config``, ``ichfed reader
--threshold-from`` and the ClientApp all go through it, so a broken file (NaN, ``null``, a
string, a threshold outside (0, 1) or off the 0.01 grid, a calibration whose slope is not positive
or not bounded, bad JSON) is the same one-line ``IchfedError`` naming the file and field everywhere, never a server error or a silent "all non-neoplastic". Files from
before the overlay (``<state_dir>/thresholds/<hash>.json``) are read as overlay version 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from shared.federation import protocol as P
from shared.plumbing import rules
from shared.plumbing.errors import IchfedError

OVERLAY_VERSION = 1
OVERLAY_DIR = "overlay"
NORM_SUFFIX = ".norm.safetensors"
LEGACY_DIR = "thresholds"  # overlay version 0: {"bundle_hash", "threshold", "source", "site"}


@dataclasses.dataclass(frozen=True)
class SiteOverlay:
    """What a site keeps for one bundle. ``calibration`` is ``Calibration.to_dict()`` or None;
    ``norm_stats`` is ``{"file", "sha256", "n_cases"}`` of the site's BatchNorm statistics or None."""

    bundle_hash: str
    threshold: float
    threshold_source: str = "site-calibrated"
    calibration: dict[str, Any] | None = None
    site: str | None = None
    version: int = OVERLAY_VERSION
    norm_stats: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def overlay_path(state_dir: str | os.PathLike, bundle_hash: str) -> Path:
    """Where the overlay for ``bundle_hash`` lives in a site's state folder."""
    return Path(state_dir) / OVERLAY_DIR / f"{bundle_hash}.json"


def norm_stats_path(state_dir: str | os.PathLike, bundle_hash: str) -> Path:
    """Where the site's BatchNorm statistics for ``bundle_hash`` live, beside its overlay."""
    return Path(state_dir) / OVERLAY_DIR / f"{bundle_hash}{NORM_SUFFIX}"


def save_overlay(state_dir: str | os.PathLike, overlay: SiteOverlay, norm_stats=None) -> Path:
    """Validate and write ``overlay`` atomically; returns its path.

    ``norm_stats`` (``shared.models.batchnorm_stats.NormStats``) are written first, beside the overlay,
    and the overlay records their file and sha256; without them the overlay keeps whatever
    ``overlay.norm_stats`` says (None: the bundle's own statistics are used).
    """
    from shared.plumbing.atomic import write_json

    path = overlay_path(state_dir, overlay.bundle_hash)
    if norm_stats is not None:
        from shared.models import batchnorm_stats

        target = norm_stats_path(state_dir, overlay.bundle_hash)
        digest = batchnorm_stats.save(norm_stats, target)
        overlay = dataclasses.replace(overlay, norm_stats={"file": target.name, "sha256": digest,
                                                           "n_cases": int(norm_stats.n_cases)})
    # Validate what we write with the same rules as what we read, so a bad value fails here, at the site.
    parse_overlay(overlay.to_dict(), path, overlay.bundle_hash)
    write_json(path, overlay.to_dict())
    return path


def load_overlay(state_dir: str | os.PathLike, bundle_hash: str) -> SiteOverlay | None:
    """The site's overlay for ``bundle_hash`` (or its v0 threshold file), validated; None when there is none."""
    for path in (overlay_path(state_dir, bundle_hash), Path(state_dir) / LEGACY_DIR / f"{bundle_hash}.json"):
        if path.is_file():
            return read_overlay_file(path, bundle_hash)
    return None


def read_overlay_file(path: str | os.PathLike, bundle_hash: str | None = None) -> SiteOverlay:
    """Read and validate one overlay (or v0 threshold) file; one-line ``IchfedError`` when it is unusable."""
    p = Path(path)
    try:
        # NaN / Infinity are not JSON, but Python's json accepts them; they reach the field check
        # below as floats so the error names the field.
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise IchfedError(f"{p}: not a readable site overlay ({_first_line(e)})") from None
    return parse_overlay(data, p, bundle_hash)


def parse_overlay(data: Any, path: str | os.PathLike, bundle_hash: str | None = None) -> SiteOverlay:
    """Validate a decoded overlay dict (v0 or v1) from ``path``."""
    if not isinstance(data, dict):
        raise IchfedError(f"{path}: a site overlay must be a JSON object, got {type(data).__name__}")
    version = data.get("version", 0)
    if version not in (0, OVERLAY_VERSION) or isinstance(version, bool):
        raise IchfedError(f"{path}: version: unsupported site overlay version {version!r}")
    # A site threshold lies strictly inside (0, 1) and on the grid the site rule puts it on
    # (shared.plumbing.rules.threshold): 1e-300 or 0.9999999999 was never chosen by this site.
    threshold = rules.threshold(data.get("threshold"), f"{path}: threshold", grid=P.THRESHOLD_GRID)
    stored_hash = data.get("bundle_hash", bundle_hash)
    if not isinstance(stored_hash, str) or not P.HASH_RE.match(stored_hash):
        raise IchfedError(f"{path}: bundle_hash: must be a 64-character hex bundle hash")
    if bundle_hash is not None and stored_hash != bundle_hash:
        raise IchfedError(f"{path}: bundle_hash: written for bundle {stored_hash[:12]}, not {bundle_hash[:12]}")
    source = data.get("threshold_source", data.get("source", "site-calibrated"))
    if not isinstance(source, str):
        raise IchfedError(f"{path}: threshold_source: must be a string")
    calibration = data.get("calibration")
    if calibration is not None:
        _validate_calibration(calibration, path)
    site = data.get("site")
    if site is not None and not isinstance(site, str):
        raise IchfedError(f"{path}: site: must be a string")
    norm = data.get("norm_stats")
    if norm is not None:
        _validate_norm_stats(norm, stored_hash, f"{path}: norm_stats")
    return SiteOverlay(bundle_hash=stored_hash, threshold=threshold, threshold_source=source,
                       calibration=calibration, site=site, version=int(version), norm_stats=norm)


def load_norm_stats(state_dir: str | os.PathLike, overlay: SiteOverlay | None):
    """The site's BatchNorm statistics the overlay names (``NormStats``, sha256-checked), or None.

    They are only decoded here; ``shared.models.batchnorm_stats.apply`` checks that they fit the backbone.
    """
    if overlay is None or overlay.norm_stats is None:
        return None
    from shared.models import batchnorm_stats

    return batchnorm_stats.load(norm_stats_path(state_dir, overlay.bundle_hash), overlay.norm_stats["sha256"])


def _validate_norm_stats(value: Any, bundle_hash: str, where: str) -> None:
    if not isinstance(value, dict) or set(value) != {"file", "sha256", "n_cases"}:
        raise IchfedError(f"{where}: must be an object with exactly file, sha256 and n_cases")
    # The file name is fixed by the bundle hash, so an overlay cannot point anywhere else.
    if value["file"] != f"{bundle_hash}{NORM_SUFFIX}":
        raise IchfedError(f"{where}: file: must be {bundle_hash[:12]}...{NORM_SUFFIX}, got {str(value['file'])[:80]!r}")
    if not isinstance(value["sha256"], str) or not P.HASH_RE.match(value["sha256"]):
        raise IchfedError(f"{where}: sha256: must be a 64-character hex digest")
    n = value["n_cases"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise IchfedError(f"{where}: n_cases: must be a non-negative integer")


def _validate_calibration(value: Any, path: str | os.PathLike) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
        raise IchfedError(f"{path}: calibration: must be an object with a 'kind'")
    try:
        from shared.evaluation.calibration import Calibration
    except ImportError:  # the calibration module is optional for reading a threshold
        return
    try:
        Calibration.from_dict(value)  # the slope and intercept rules of shared.plumbing.rules
    except IchfedError as e:  # "calibration.slope: must be positive ..."
        raise IchfedError(f"{path}: {_first_line(e)}") from None
    except Exception as e:  # a malformed calibration is the file's fault, said in one line
        raise IchfedError(f"{path}: calibration: not a valid calibration ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
