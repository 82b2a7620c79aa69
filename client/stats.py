"""A site's Table 1 (``ichfed stats``): counts and fixed-bin histograms of its own cases, nothing per case.

Volumes and mean HU come from the site's reference masks when a case has one, otherwise from the
bundle's segmentation (``shared.pipeline.Predictor.preprocess``, the same code as every other
path). Scanner metadata comes from ingest (``shared.imaging.ingest.Ingested.scanner``).

Suppression happens here, before anything is built into a reply: every count and every histogram
bin between 1 and ``min_cases_for_metrics - 1`` is left out (bins are set to 0, counts are dropped
with the reason ``fewer-cases-than-minimum``), and scanner categories that small are merged into
``other`` (dropped too when ``other`` is still that small). The bins are open at both ends, so no
minimum or maximum leaves the site. ``client/privacy.py`` checks the result again.

Differencing: a table is sent only if it differs from every table this site released before by 0 or
at least ``min_cases_for_metrics`` cases in every cell; otherwise the last release is sent again
(``client/stats_ledger.py``), so running ``ichfed stats`` before and after adding one case shows nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from shared.federation import protocol as P
from shared.federation import stats_protocol as S
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CaseStats:
    """What one case contributes (kept in memory at the site, never sent)."""

    cls: str  # one of stats_protocol.CLASSES
    ich_ml: float
    phe_ml: float
    ich_mean_hu: float | None
    phe_mean_hu: float | None
    n_components: int
    from_mask: bool
    scanner: dict[str, str]  # stats_protocol.SCANNER_FIELDS -> category label


@dataclasses.dataclass
class SiteTable1:
    """The reply's content: ``metrics`` (stats keys), ``reasons`` (why a key is missing), ``scanner``."""

    metrics: dict[str, Any]
    reasons: dict[str, str]
    scanner: dict[str, dict[str, int]]


class NeedsBundle(IchfedError):
    """A case has no reference mask and no verified bundle was given to segment it."""


def measure_cases(site, bundle=None, device: str = "cpu",
                  cache_dir: Path | None = None) -> tuple[list[CaseStats], int]:
    """Measure every case of ``site`` (``shared.imaging.sitedata.SiteData``); returns (rows, unusable count).

    ``bundle`` (a verified ``shared.bundle.Bundle``) segments cases without a reference mask; the
    ``Predictor`` is built only when such a case comes up. Raises ``NeedsBundle`` if one does and
    no bundle was given. With ``cache_dir``, what segmentation measured is kept there by image
    content and bundle hash (at the site), so a second statistics run does not segment again.
    """
    from tqdm import tqdm

    predictor = _Lazy(bundle, device)
    rows: list[CaseStats] = []
    unusable = len({p.case_id for p in site.problems if p.case_id is not None})
    for case in tqdm(site.cases, desc="table 1: measuring cases", unit="case", disable=None):
        if case.label is None:  # an unlabelled case has no class to be counted in
            log.warning("table 1: case %s has no label; left out", case.case_id)
            unusable += 1
            continue
        if case.mask_path is None and bundle is None:
            raise NeedsBundle(f"{case.case_id}: no reference mask and no bundle to segment it")
        try:
            rows.append(_measure_cached(case, bundle, predictor, cache_dir))
        except IchfedError as e:
            log.warning("table 1: case %s unusable: %s", case.case_id, e)
            unusable += 1
        except Exception:  # one broken case must not cost the site its other cases
            log.exception("table 1: case %s failed", case.case_id)
            unusable += 1
    return rows, unusable


class _Lazy:
    """The bundle's ``Predictor``, built (nnU-Net and classifier loaded) only when a case needs it."""

    def __init__(self, bundle, device: str) -> None:
        self.bundle, self.device, self._p = bundle, device, None

    def get(self):
        if self._p is None:
            from shared.pipeline import Predictor

            self._p = Predictor(self.bundle, device=self.device)
        return self._p


def _measure_cached(case, bundle, predictor: _Lazy, cache_dir: Path | None) -> CaseStats:
    """``_measure``, through the site's cache for segmented cases (masks are cheap to re-read)."""
    if cache_dir is None or case.mask_path is not None:
        return _measure(case, predictor)
    import hashlib
    import json

    from shared.plumbing.atomic import write_json

    from .cache import content_hash

    key = hashlib.sha256(f"{content_hash(case.image_path)}|{bundle.hash}|table1-v1".encode()).hexdigest()
    path = Path(cache_dir) / f"{key}.json"
    label = S.CLASS_OF_LABEL[int(case.label)]  # the label may change without the image changing
    try:
        return CaseStats(**{**json.loads(path.read_text(encoding="utf-8")), "cls": label})
    except (OSError, ValueError, TypeError):
        pass  # absent or damaged: measure again
    row = _measure(case, predictor)
    write_json(path, dataclasses.asdict(row))
    return row


def _measure(case, predictor: _Lazy) -> CaseStats:
    from shared.imaging.ingest import read_image
    from shared.imaging.sitedata import read_mask
    from shared.imaging.volumetrics import measure

    ingested = read_image(case.image_path)
    if case.mask_path is not None:
        vol = measure(ingested.image, read_mask(case.mask_path, like=ingested.image))
    else:
        vol = predictor.get().preprocess(ingested.image).volumetrics
    return CaseStats(cls=S.CLASS_OF_LABEL[int(case.label)], ich_ml=vol.ich_ml, phe_ml=vol.phe_ml,
                     ich_mean_hu=vol.ich_mean_hu, phe_mean_hu=vol.phe_mean_hu, n_components=vol.n_components,
                     from_mask=case.mask_path is not None, scanner=scanner_categories(ingested.scanner))


def scanner_categories(scanner) -> dict[str, str]:
    """The category label of each scanner field (``shared.imaging.ingest.Scanner`` -> short fixed-form strings)."""
    thickness = scanner.slice_thickness_mm
    tilt = scanner.tilt_deg
    return {
        "manufacturer": _label(scanner.manufacturer),
        "model": _label(scanner.model),
        "kernel": _label(scanner.kernel),
        # Rounded to 0.5 mm: a category, not a measurement.
        "slice-thickness": S.UNKNOWN if thickness is None else f"{round(thickness * 2) / 2:g} mm",
        "tilt": S.UNKNOWN if tilt is None else ("0" if tilt < 0.5 else "0.5-10 deg" if tilt < 10 else "10+ deg"),
    }


def _label(text: str | None) -> str:
    """A tag value as a category: printable, at most 48 characters, else ``other``."""
    text = re.sub(r"[^A-Za-z0-9 ._+/()-]", " ", (text or "").strip())
    text = re.sub(r"\s+", " ", text).strip()[:48].strip()
    if not text:
        return S.UNKNOWN
    return text if S.CATEGORY_RE.match(text) else S.OTHER


def table1(rows: list[CaseStats], unusable: int, min_cases: int) -> SiteTable1:
    """Aggregate ``rows`` into the suppressed counts and histograms a stats reply carries."""
    k = max(int(min_cases), P.MIN_CASES_FLOOR)
    out = SiteTable1(metrics={}, reasons={}, scanner={})
    _count(out, S.site_key(S.N), len(rows), k)
    _count(out, S.site_key(S.N_UNUSABLE), unusable, k)
    _count(out, S.site_key(S.N_FROM_MASKS), sum(r.from_mask for r in rows), k)
    for cls in S.CLASSES:
        _class_block(out, cls, [r for r in rows if r.cls == cls], k)
    for field in S.SCANNER_FIELDS:
        counts = _suppress_categories(Counter(r.scanner[field] for r in rows), k)
        if counts:
            out.scanner[field] = counts
    return out


def _class_block(out: SiteTable1, cls: str, rows: list[CaseStats], k: int) -> None:
    if not _count(out, S.class_key(cls, S.N), len(rows), k) or not rows:
        return  # a class this small says nothing more
    lesion = [r for r in rows if r.ich_ml > 0]
    _count(out, S.class_key(cls, S.N_NO_LESION), len(rows) - len(lesion), k)
    for name, n in zip(S.LESIONS, (1, 2, 3)):
        _count(out, S.class_key(cls, name), sum(1 for r in lesion if min(r.n_components, 3) == n), k)
    values = {
        "hist-ich-ml": [r.ich_ml for r in lesion],
        "hist-phe-ml": [r.phe_ml for r in lesion],
        "hist-ich-hu": [r.ich_mean_hu for r in lesion if r.ich_mean_hu is not None],
        "hist-phe-hu": [r.phe_mean_hu for r in lesion if r.phe_mean_hu is not None and r.phe_ml > 0],
    }
    for name, vals in values.items():
        hist = histogram(vals, S.HISTOGRAMS[name], k)
        key = S.class_key(cls, name)
        if sum(hist) == 0:
            out.reasons[key] = P.REASON_TOO_FEW
        else:
            out.metrics[key] = hist


def histogram(values: list[float], edges: tuple[float, ...], k: int) -> list[int]:
    """Counts of ``values`` in the fixed bins of ``edges``; a bin holding 1..k-1 values reads 0."""
    counts = [0] * S.n_bins(edges)
    for v in values:
        counts[S.bin_index(float(v), edges)] += 1
    return [c if c >= k else 0 for c in counts]


def _count(out: SiteTable1, key: str, n: int, k: int) -> bool:
    """Put ``n`` under ``key`` unless it is 1..k-1 (then record why it is missing); True if put."""
    if 0 < n < k:
        out.reasons[key] = P.REASON_TOO_FEW
        return False
    out.metrics[key] = int(n)
    return True


def _suppress_categories(counts: Counter, k: int) -> dict[str, int]:
    """Categories with at least ``k`` cases; the rest merged into ``other`` (dropped if still below ``k``)."""
    kept = {c: n for c, n in counts.most_common() if n >= k and c != S.OTHER}
    kept = dict(list(kept.items())[: S.MAX_CATEGORIES - 1])
    rest = sum(counts.values()) - sum(kept.values())
    if rest >= k:
        kept[S.OTHER] = rest
    return kept


def site_table1(config, bundle=None, device: str = "cpu") -> SiteTable1:
    """The whole site job behind a ``query.stats`` message: read, measure, aggregate, suppress."""
    from shared.imaging.sitedata import read_site

    site = read_site(config.data_dir)
    for problem in site.problems:
        log.warning("site %s: %s%s", config.name, f"{problem.case_id}: " if problem.case_id else "", problem.message)
    rows, unusable = measure_cases(site, bundle, device, cache_dir=Path(config.state_dir) / "table1-cache")
    log.info("site %s: table 1 over %d cases (%d from reference masks), %d unusable",
             config.name, len(rows), sum(r.from_mask for r in rows), unusable)
    return release(config, rows, unusable, table1(rows, unusable, config.min_cases_for_metrics))


def release(config, rows: list[CaseStats], unusable: int, t1: SiteTable1) -> SiteTable1:
    """The Table 1 to send: ``t1`` when the site's release ledger allows it, else the last one released.

    A table that will not be sent at all (no usable count) is not recorded, so it never holds a later one back.
    """
    from .stats_ledger import ReleaseLedger, true_cells

    if not t1.metrics.get(S.site_key(S.N)):
        return t1
    k = max(int(config.min_cases_for_metrics), P.MIN_CASES_FLOOR)
    reply = {"metrics": t1.metrics, "reasons": t1.reasons, "scanner": t1.scanner}
    sent, held = ReleaseLedger(config.state_dir).decide(true_cells(rows, unusable), reply, k)
    if held is not None:
        log.warning("site %s: Table 1 not updated: %s changed by %+d case(s) since the release of %s, fewer than %d; "
                    "that release is sent again (docs/stats.md, differencing)", config.name, held.cell, held.change,
                    held.released_utc, k)
    return SiteTable1(metrics=dict(sent["metrics"]), reasons=dict(sent["reasons"]),
                      scanner={field: dict(counts) for field, counts in sent["scanner"].items()})
