"""A ``Predictor`` for one site: the bundle verified with the site's key, read at the site's own threshold.

``ichfed predict --site-config`` and the reader page (``ichfed reader --threshold-from``) both load
their model here, so a case gives the same number in both.
"""

from __future__ import annotations

import logging
import os

from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


def open_predictor(bundle: str | os.PathLike, *, pubkey: str | os.PathLike | None = None,
                   site_config: str | os.PathLike | None = None, allow_unsigned: bool = False,
                   device: str = "auto", use_mirroring: bool | None = None, tile_step_size: float = 0.5):
    """Verify and load ``bundle`` (a folder or a packed ``.tar``) into a ``shared.pipeline.Predictor``.

    With ``site_config``, its coordinator key verifies the bundle (unless ``pubkey`` is given) and
    the site's overlay for that exact bundle (by hash) supplies the threshold (replacing the
    bundle's), the site's calibration (``p_calibrated``) and its BatchNorm statistics.
    Raises ``IchfedError`` for a bad option, a missing key or a bundle that does not verify.
    """
    from shared.bundle import open_bundle
    from shared.pipeline import Predictor

    if not 0.0 < tile_step_size <= 1.0:  # checked before minutes of bundle verification and model loading
        raise IchfedError(f"--tile-step-size: must be in (0, 1], got {tile_step_size:g}")
    site = None
    if site_config:
        from .site_config import load_site_config

        site = load_site_config(site_config)
        pubkey = pubkey or site.public_key
    if pubkey is None and not allow_unsigned:
        raise IchfedError("--pubkey: a trusted public key is required to verify the bundle (or --site-config)")
    opened = open_bundle(bundle, pubkey, allow_unsigned=allow_unsigned)
    threshold = overlay = norm_stats = None
    if site is not None:
        from .overlay import load_norm_stats, load_overlay

        # The one reader of a site's overlay: a broken threshold file is a one-line error here.
        overlay = load_overlay(site.state_dir, opened.hash)
        threshold = None if overlay is None else overlay.threshold
        norm_stats = load_norm_stats(site.state_dir, overlay)  # the site's own BatchNorm statistics, if any
        if threshold is None:
            log.warning("%s: no local threshold for bundle %s in %s; using the bundle's threshold",
                        site_config, opened.hash[:12], site.state_dir)
    return Predictor(opened, device=device, threshold=threshold, use_mirroring=use_mirroring,
                     tile_step_size=tile_step_size, norm_stats=norm_stats,
                     calibration=None if overlay is None else overlay.calibration)
