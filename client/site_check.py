"""The dry run of a site (``ichfed site check``): config, every case, device and cached bundles.

Nothing leaves the machine; the report is for the hospital's own staff.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


def check_site(config_path: Path, open_images: bool = True, cross_fit_folds: int | None = None) -> dict[str, Any]:
    """Dry run of a site: config, every case, the split a run will use, device and cached bundles;
    nothing leaves the machine.

    A bad config raises ``IchfedError``; everything else is reported in the returned dict,
    with ``ready`` False and ``not_ready`` reasons (each with its fix) when the site cannot take
    part. ``cross_fit_folds`` is the run's ``cross-fit-folds`` (default: the run config's default).
    """
    from shared.imaging.sitedata import read_site

    from .site_config import load_site_config
    from .split_plan import DEFAULT_CROSS_FIT_FOLDS, plan_split

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
    folds = DEFAULT_CROSS_FIT_FOLDS if cross_fit_folds is None else cross_fit_folds
    plan = plan_split({c.case_id: int(c.label) for c in usable if c.label is not None}, cfg.fine_tune_fraction,
                      cfg.min_cases, cfg.seed, folds, masked=[c.case_id for c in usable if c.mask_path is not None])
    if n_pos and n_neg and plan.problems:  # one class only is said above, and no fraction fixes it
        not_ready.append("; ".join(plan.problems) + f"; fix: {plan.fix}")
    device = _device_report(cfg.device)
    if device["selected"] is None:
        not_ready.append(device["error"])
    bundles = _bundle_report(cfg)
    not_ready += _key_and_bundle_problems(cfg, bundles)
    return {
        "site": cfg.name,
        "config": str(Path(config_path).resolve()),
        "data_dir": str(cfg.data_dir),
        "state_dir": str(cfg.state_dir),
        "cases": _case_counts(site, usable, unusable, n_pos, n_neg, open_images),
        "unusable": unusable,
        "skipped": skipped,
        "split": plan.to_dict(),
        "segmenter": segmenter_report(cfg, plan, usable),
        "device": device,
        "public_key": str(cfg.public_key) if cfg.public_key else None,
        "bundles": bundles,
        "ready": not not_ready,
        "not_ready": not_ready,
    }


def segmenter_report(cfg, plan, usable: list) -> dict[str, Any]:
    """The site's masks for segmenter rounds (issue 24): how many masked cases it would fine-tune on (masked
    fine-tune cases and masked unlabelled ones) and be judged on (masked held-out cases), and what it lacks."""
    unlabelled = sum(1 for c in usable if c.label is None and c.mask_path is not None)
    n_fine = plan.masked_fine_tune + unlabelled
    warnings = []
    if cfg.segmenter_fine_tune and n_fine < cfg.min_cases:
        warnings.append(f"segmenter_fine_tune is on, but {n_fine} masked fine-tune case(s) are fewer than the minimum "
                        f"of {cfg.min_cases}: this site will not fine-tune the segmenter (add masks of fine-tune or "
                        "unlabelled cases in masks/, or raise fine_tune_fraction)")
    if plan.masked_held_out < cfg.min_cases:
        warnings.append(f"{plan.masked_held_out} masked held-out case(s), fewer than {cfg.min_cases}: this site cannot "
                        "check a federated segmenter and keeps the reference one")
    return {"opted_in": cfg.segmenter_fine_tune, "masked_fine_tune": plan.masked_fine_tune,
            "masked_unlabelled": unlabelled, "masked_for_fine_tuning": n_fine,
            "masked_held_out": plan.masked_held_out, "min_cases": cfg.min_cases,
            "would_fine_tune": cfg.segmenter_fine_tune and n_fine >= cfg.min_cases, "warnings": warnings}


def _case_counts(site, usable: list, unusable: list[dict[str, Any]], n_pos: int, n_neg: int,
                 open_images: bool) -> dict[str, Any]:
    return {
        "listed": len(site.cases) + len({p.case_id for p in site.problems if p.case_id is not None}),
        "usable": len(usable),
        "unusable": len({u["case_id"] for u in unusable if u["case_id"] is not None}),
        "neoplastic": n_pos,
        "non_neoplastic": n_neg,
        # used only for the site's BatchNorm statistics, never for training or metrics
        "unlabelled": len(usable) - n_pos - n_neg,
        "with_mask": sum(1 for c in usable if c.mask_path is not None),
        "images_opened": open_images,
    }


def _key_and_bundle_problems(cfg, bundles: list[dict[str, Any]]) -> list[str]:
    out = []
    if cfg.public_key is None:
        out.append("no public_key: the site cannot verify (and so will refuse) any bundle")
    elif not Path(cfg.public_key).is_file():
        out.append(f"public_key {cfg.public_key} not found")
    if any(b["status"] != "verified" for b in bundles):
        out.append("a cached bundle does not verify (delete it; the server sends it again)")
    return out


def _read_cases(name: str, site, open_images: bool) -> tuple[list, list[dict[str, Any]], str | None]:
    """(usable cases, unusable cases with why, what was not checked) of ``site``."""
    from shared.plumbing.progress import bar

    unusable = [{"case_id": p.case_id, "message": p.message} for p in site.problems]
    if not open_images:
        n_masks = sum(1 for c in site.cases if c.mask_path is not None)
        return list(site.cases), unusable, (
            f"--headers-only: pixel data of {len(site.cases)} image(s) and {n_masks} mask(s) not read, so "
            "truncated payloads, DICOM pixel data, mask values and zip contents are not checked")
    usable = []
    for case in bar(site.cases, desc=f"{name}: reading cases", unit="case"):
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
