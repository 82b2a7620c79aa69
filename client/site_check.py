"""The dry run of a site (``ichfed site check``): config, every case, device and cached bundles.

Nothing leaves the machine; the report is for the hospital's own staff.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


def check_site(config_path: Path, open_images: bool = True) -> dict[str, Any]:
    """Dry run of a site: config, every case, device and cached bundles; nothing leaves the machine.

    A bad config raises ``IchfedError``; everything else is reported in the returned dict,
    with ``ready`` False and ``not_ready`` reasons when the site cannot take part.
    """
    from shared.imaging.sitedata import read_site

    from .site_config import load_site_config

    cfg = load_site_config(config_path)
    not_ready: list[str] = []
    site = read_site(cfg.data_dir, allow_unlabelled=True)
    usable, unusable, skipped = _read_cases(cfg.name, site, open_images)
    n_pos = sum(1 for c in usable if c.label == 1)
    n_neg = sum(1 for c in usable if c.label == 0)
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
            # used only for the site's BatchNorm statistics, never for training or metrics
            "unlabelled": len(usable) - n_pos - n_neg,
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


def _read_cases(name: str, site, open_images: bool) -> tuple[list, list[dict[str, Any]], str | None]:
    """(usable cases, unusable cases with why, what was not checked) of ``site``."""
    from tqdm import tqdm

    unusable = [{"case_id": p.case_id, "message": p.message} for p in site.problems]
    if not open_images:
        n_masks = sum(1 for c in site.cases if c.mask_path is not None)
        return list(site.cases), unusable, (
            f"--headers-only: pixel data of {len(site.cases)} image(s) and {n_masks} mask(s) not read, so "
            "truncated payloads, DICOM pixel data, mask values and zip contents are not checked")
    usable = []
    for case in tqdm(site.cases, desc=f"{name}: reading cases", unit="case", disable=None):
        why = _open_case(case)
        if why:
            unusable.append({"case_id": case.case_id, "message": why})
        else:
            usable.append(case)
    return usable, unusable, None


def _open_case(case) -> str | None:
    """Read a case's image fully and its mask against it; the reason it is unusable, or None."""
    from shared.imaging.ingest import read_image
    from shared.imaging.sitedata import read_mask

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
    from shared.plumbing.device import pick_device

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
    from shared.bundle.transport import bundle_cache_dir, cached_bundle
    from shared.plumbing.errors import BundleVerificationError

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
