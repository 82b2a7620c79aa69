"""The site's content-addressed preprocessing cache.

One entry per case: the crop, its frozen-backbone embedding, and what evaluation needs
(whether a lesion was segmented, the segmentation scored against a reference mask). The key is the
sha256 of the case's bytes (and its mask's), the bundle hash and the crop spec, so a changed image,
mask, bundle or crop spec gets a new entry and an unchanged case is never recomputed, across rounds
and across restarts. The bundle hash is the sha256 of a manifest that lists the sha256 of every model
file, the segmenter's checkpoint among them: a bundle carrying a fine-tuned segmenter (issue 24)
keys every case afresh, so a case is re-segmented and re-embedded, never read from a stale entry.

Beside it, :class:`AdaptedCache` keeps the site's own BatchNorm statistics and the embeddings
under them (``client.adaptation``), keyed by the cases the statistics were estimated on, so a
restarted site (a new run, another simulation worker) does not re-estimate or re-embed.

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

from shared.evaluation.segmentation import SegmentationScore
from shared.plumbing.atomic import atomic_path, write_json

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
    """The entry key: change the case, its reference mask, the bundle (its segmenter or classifier files)
    or the crop spec and it changes."""
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
    # Names of the segmentation's failed plausibility checks (shared.imaging.quality.FLAGS).
    quality_flags: tuple[str, ...] = ()
    # The segmentation against the reference mask (shared.evaluation.segmentation); None without a mask.
    seg_score: SegmentationScore | None = None


class CaseCache:
    """A folder of cache entries, ``<root>/<key[:2]>/<key>/``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str, with_crop: bool = False, with_mask: bool = False) -> CachedCase | None:
        """The entry for ``key``, or None when absent or incomplete (``with_mask``: the case has a
        reference mask, so an entry from before segmentation scores is recomputed)."""
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
            seg = meta["seg_score"] if with_mask else meta.get("seg_score")
            seg = SegmentationScore(**seg) if seg is not None else None
        except (OSError, ValueError, KeyError, TypeError) as e:
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
            seg_score=seg,
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
                "seg_score": dataclasses.asdict(case.seg_score) if case.seg_score is not None else None,
            },
        )


class AdaptedCache:
    """The site's BatchNorm statistics and embeddings under them, ``<root>/<digest[:2]>/<digest>/``.

    ``digest`` (:meth:`digest`) names what the statistics were estimated from: the bundle, the
    crop spec and the sorted cache keys of those cases. The same cases give the same folder, and a
    case's features under those statistics are stored by the case's own cache key. Each folder
    is owner-only, and the statistics file is written as the site overlay's is.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @staticmethod
    def digest(bundle_hash: str, crop_spec_key: str, case_keys: list[str]) -> str:
        """The folder name for statistics estimated on the cases ``case_keys`` (order ignored)."""
        parts = ["adapted-v1", bundle_hash, crop_spec_key, *sorted(case_keys)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _dir(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def stats(self, digest: str):
        """The ``NormStats`` stored under ``digest``, or None (absent, or damaged: then recomputed)."""
        from shared.models import batchnorm_stats
        from shared.plumbing.errors import IchfedError

        d = self._dir(digest)
        if not (d / "stats.json").is_file():
            return None
        try:
            sha = json.loads((d / "stats.json").read_text(encoding="utf-8"))["sha256"]
            return batchnorm_stats.load(d / "stats.safetensors", sha)
        except (OSError, ValueError, KeyError, IchfedError) as e:
            log.warning("adapted cache %s unreadable (%s); re-estimating", digest[:12], e)
            return None

    def put_stats(self, digest: str, stats) -> None:
        """Store ``stats`` under ``digest`` (the weights first, ``stats.json`` with their sha256 last)."""
        from shared.models import batchnorm_stats

        d = self._dir(digest)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json(d / "stats.json", {"sha256": batchnorm_stats.save(stats, d / "stats.safetensors"),
                                      "n_cases": int(stats.n_cases)})

    def features(self, digest: str, case_key: str) -> np.ndarray | None:
        """A case's features under the statistics ``digest``, or None."""
        path = self._dir(digest) / f"{case_key}.npy"
        if not path.is_file():
            return None
        try:
            return np.load(path)
        except (OSError, ValueError) as e:
            log.warning("adapted cache entry %s unreadable (%s); re-embedding", case_key[:12], e)
            return None

    def put_features(self, digest: str, case_key: str, features: np.ndarray) -> None:
        """Store one case's features under ``digest`` atomically."""
        d = self._dir(digest)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_path(d / f"{case_key}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(features, dtype=np.float32))
