"""A ``Predictor`` for one site: the bundle verified with the site's key, read at the site's own threshold.

``ichfed predict --site-config`` and the reader page (``ichfed reader --threshold-from``) both load
their model here, so a case gives the same number in both.
"""

from __future__ import annotations

import logging
import os

from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


def open_predictor(bundle: str | os.PathLike | None, *, pubkey: str | os.PathLike | None = None,
                   site_config: str | os.PathLike | None = None, allow_unsigned: bool = False,
                   device: str = "auto", use_mirroring: bool | None = None, tile_step_size: float = 0.5):
    """Verify and load ``bundle`` (a folder or a packed ``.tar``) into a ``shared.pipeline.Predictor``.

    With ``site_config``, its coordinator key verifies the bundle (unless ``pubkey`` is given) and
    the site's overlay for that exact bundle (by hash) supplies the threshold (replacing the
    bundle's), the site's calibration (``p_calibrated``) and its BatchNorm statistics. Without
    ``bundle`` the site's active model is loaded (``client.adoption``: the bundle the site adopted);
    a ``bundle`` the site kept but did not activate is loaded with a warning saying why.
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
        bundle = _site_bundle(site, site_config, bundle)
    if bundle is None:
        raise IchfedError("--bundle: required (or --site-config of a site that has an active model)")
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


def _site_bundle(site, site_config, bundle):
    """``bundle``, or the site's active model when none is given; warns about a kept, not-activated one."""
    from shared.bundle import bundle_hash

    from .adoption import active_model, read_record

    active = active_model(site.state_dir)
    if bundle is None:
        if active is None:
            raise IchfedError(f"--bundle: not given, and {site_config} has no active model yet "
                              "(it gets one at the end of its first federated run)")
        log.info("%s: using the site's active model %s (%s)", site_config, active.bundle_hash[:12], active.source)
        return active.bundle_path
    try:
        given = bundle_hash(bundle)
    except Exception:  # a .tar or unreadable folder: load_bundle says what is wrong
        return bundle
    rec = read_record(site.state_dir, given)
    if rec is not None and (active is None or active.bundle_hash != given):
        log.warning("%s: bundle %s was kept but not activated at this site (%s); the site's model is %s",
                    site_config, given[:12], rec.get("decision"), active.bundle_hash[:12] if active else "none")
    return bundle
