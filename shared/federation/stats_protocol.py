"""The statistics message (``query.stats``, ``ichfed stats``): its keys and its fixed bins.

A statistics run trains nothing. The server asks each site for the aggregates of a Table 1
(the paper's cohort description) and pools them; the site answers with counts only:

    query.stats   server -> site: bundle hash (to segment cases without reference masks)
                  site -> server: ``metrics`` (counts and fixed-bin histograms by class),
                                  ``scanner`` (category labels and their counts), ``info``

Every count and every histogram bin is either 0 or at least the site's
``min_cases_for_metrics`` (never below ``protocol.MIN_CASES_FLOOR``); smaller ones are left out
at the site with the reason ``fewer-cases-than-minimum``. No minimum, maximum or per-case value
has a key: the outermost bins are open-ended. ``client/privacy.py`` checks all of this.
"""

from __future__ import annotations

import math
import re

ACTION_STATS = "stats"
QUERY_STATS = f"query.{ACTION_STATS}"

PREFIX = "table1"  # every metric key of a stats reply starts with "table1."
SCANNER = "scanner"  # ConfigRecord: "<field>" -> [labels], "<field>.n" -> [counts]

CLASSES = ("neoplastic", "non-neoplastic")  # class label 1, 0
CLASS_OF_LABEL = {1: "neoplastic", 0: "non-neoplastic"}

# Counts: the whole site, and per class
N = "n"  # usable cases
N_UNUSABLE = "n-unusable"
N_FROM_MASKS = "n-from-masks"  # measured on the site's reference masks (the rest: bundle segmentation)
N_NO_LESION = "n-no-lesion"  # no ICH in the mask
LESIONS = ("lesions-1", "lesions-2", "lesions-3plus")  # cases by number of ICH components
SITE_COUNTS = (N, N_UNUSABLE, N_FROM_MASKS)
CLASS_COUNTS = (N, N_NO_LESION, *LESIONS)

# Histograms: bin i counts values in [EDGES[i-1], EDGES[i]); bin 0 is (-inf, EDGES[0]) and the
# last bin [EDGES[-1], inf). Open outer bins mean no extreme value leaves a site.
# Coarse on purpose: a site suppresses every bin below its minimum count, and fine bins on a site of
# a few dozen cases would all be suppressed. The price is precision: a median is known to its bin.
VOLUME_EDGES_ML = (0.0, 5.0, 10.0, 20.0, 40.0, 80.0)
HU_EDGES = tuple(float(v) for v in range(0, 101, 5))
HISTOGRAMS = {
    "hist-ich-ml": VOLUME_EDGES_ML,
    "hist-phe-ml": VOLUME_EDGES_ML,
    "hist-ich-hu": HU_EDGES,  # mean HU inside the ICH label
    "hist-phe-hu": HU_EDGES,  # mean HU inside the PHE label
}
HISTOGRAM_UNITS = {"hist-ich-ml": "ml", "hist-phe-ml": "ml", "hist-ich-hu": "HU", "hist-phe-hu": "HU"}

# Scanner metadata (read at ingest) as category counts over all usable cases.
SCANNER_FIELDS = ("manufacturer", "model", "kernel", "slice-thickness", "tilt")
MAX_CATEGORIES = 32
UNKNOWN = "unknown"
OTHER = "other"  # categories below the minimum, merged (and itself left out when still too small)
CATEGORY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+/()-]{0,47}$")


def n_bins(edges: tuple[float, ...]) -> int:
    """Bins of a histogram on ``edges`` (two open outer bins included)."""
    return len(edges) + 1


def bin_index(value: float, edges: tuple[float, ...]) -> int:
    """The bin ``value`` falls in (see ``HISTOGRAMS``)."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite value: {value!r}")
    i = 0
    while i < len(edges) and value >= edges[i]:
        i += 1
    return i


def site_key(metric: str) -> str:
    """``"table1.<metric>"`` for a whole-site count."""
    return f"{PREFIX}.{metric}"


def class_key(cls: str, metric: str) -> str:
    """``"table1.<class>.<metric>"``."""
    return f"{PREFIX}.{cls}.{metric}"


def split_key(key: str) -> tuple[str | None, str] | None:
    """``(class or None, metric)`` of a stats metric key; None for anything else."""
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == PREFIX and parts[1] in SITE_COUNTS:
        return None, parts[1]
    if len(parts) == 3 and parts[0] == PREFIX and parts[1] in CLASSES and (
            parts[2] in CLASS_COUNTS or parts[2] in HISTOGRAMS):
        return parts[1], parts[2]
    return None
