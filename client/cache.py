"""The site's content-addressed preprocessing cache.

One entry per case: the crop, its frozen-backbone embedding, and what evaluation needs
(whether a lesion was segmented, Dice against a reference mask). The key is the sha256 of the
case's bytes, the bundle hash and the crop spec, so a changed image, bundle or crop spec gets a
new entry and an unchanged case is never recomputed, across rounds and across restarts.

Every file is written atomically and ``case.json`` last, so an entry either exists whole or
not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from shared.atomic import atomic_path, write_json

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def content_hash(path: str | os.PathLike) -> str:
    """sha256 over a file's bytes, or over every file of a folder (relative names and bytes, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if f is not p:
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def cache_key(case_hash: str, bundle_hash: str, crop_spec_key: str, mask_hash: str | None = None) -> str:
    """The entry key: change the case, its reference mask, the bundle or the crop spec and it changes."""
    parts = [case_hash, mask_hash or "-", bundle_hash, crop_spec_key]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


@dataclasses.dataclass
class CachedCase:
    """What the site keeps of one preprocessed case. ``features`` is None when no ICH was segmented."""

    lesion_found: bool
    features: np.ndarray | None
    crop: np.ndarray | None = None
    dice_ich: float | None = None
    dice_phe: float | None = None
    ich_ml: float | None = None
    phe_ml: float | None = None
    # Names of the segmentation's failed plausibility checks (shared.quality.FLAGS).
    quality_flags: tuple[str, ...] = ()


class CaseCache:
    """A folder of cache entries, ``<root>/<key[:2]>/<key>/``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str, with_crop: bool = False) -> CachedCase | None:
        """The entry for ``key``, or None when absent or incomplete."""
        d = self._dir(key)
        meta_path = d / "case.json"
        if not meta_path.is_file():
            self.misses += 1
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            features = np.load(d / "features.npy") if meta["lesion_found"] else None
            crop = np.load(d / "crop.npy") if with_crop and meta["lesion_found"] else None
            flags = tuple(meta["quality_flags"])  # an entry from before quality flags is recomputed
        except (OSError, ValueError, KeyError) as e:
            # A damaged entry is recomputed rather than trusted.
            log.warning("cache entry %s unreadable (%s); recomputing", key[:12], e)
            self.misses += 1
            return None
        self.hits += 1
        return CachedCase(
            lesion_found=bool(meta["lesion_found"]),
            features=features,
            crop=crop,
            dice_ich=meta.get("dice_ich"),
            dice_phe=meta.get("dice_phe"),
            ich_ml=meta.get("ich_ml"),
            phe_ml=meta.get("phe_ml"),
            quality_flags=flags,
        )

    def put(self, key: str, case: CachedCase) -> None:
        """Store ``case`` under ``key`` atomically (arrays first, ``case.json`` last)."""
        d = self._dir(key)
        d.mkdir(parents=True, exist_ok=True)
        if case.lesion_found:
            for name, arr in (("features", case.features), ("crop", case.crop)):
                if arr is None:
                    continue
                with atomic_path(d / f"{name}.npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, np.asarray(arr, dtype=np.float32))
        write_json(
            d / "case.json",
            {
                "lesion_found": bool(case.lesion_found),
                "dice_ich": case.dice_ich,
                "dice_phe": case.dice_phe,
                "ich_ml": case.ich_ml,
                "phe_ml": case.phe_ml,
                "quality_flags": list(case.quality_flags),
            },
        )
