"""What a site's Table 1 has released, and the rule that stops a difference of two releases revealing a case.

The threat: ``ichfed stats`` run twice, with one case added to (or removed from) a site in between,
gave two tables whose difference was that one case: its class, ICH and PHE volume bins, HU bins and
lesion count. Suppressing small cells inside each table does not help: the difference of two
allowed tables is a table of one case.

The defence (a release ledger, ``docs/stats.md``): the site keeps every Table 1 it has released, as
its true, unsuppressed cell counts, in ``<state_dir>/table1-releases.json`` (owner-only, never
sent). A new table is released only if, against *every* earlier release, every cell's true count is
unchanged or differs by at least ``k`` cases (``min_cases_for_metrics``, never below the floor of
5): the same floor every single cell obeys, applied to every difference an attacker can form.
Otherwise the site sends its latest release again, byte for byte, and logs which cell held it back.

It holds for one added or removed case (any 1..k-1): the site total ``n`` then changes by fewer
than ``k`` cases, so no new table can be released and every difference the coordinator can take is
zero. Checking against every earlier release, not only the last, closes chains (+k, +k, -(2k-1)).
The price: a site's Table 1 is updated only when its cohort changes by at least ``k`` cases in
every cell that changes; until then the coordinator sees the earlier one (the log says so).
Deleting the ledger gives up the protection against a coordinator that kept the earlier replies.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from shared.federation import stats_protocol as S

log = logging.getLogger(__name__)

LEDGER = "table1-releases.json"


def true_cells(rows: list, unusable: int) -> dict[str, int]:
    """Every cell a Table 1 can show, as its true count (before suppression): the ledger's unit.

    ``rows`` are ``client.stats.CaseStats``; histogram bins are ``"<key>[i]"``, scanner categories
    ``"scanner.<field>.<label>"``.
    """
    cells: Counter = Counter()
    cells[S.site_key(S.N)] = len(rows)
    cells[S.site_key(S.N_UNUSABLE)] = int(unusable)
    cells[S.site_key(S.N_FROM_MASKS)] = sum(1 for r in rows if r.from_mask)
    for r in rows:
        cells[S.class_key(r.cls, S.N)] += 1
        if r.ich_ml <= 0:
            cells[S.class_key(r.cls, S.N_NO_LESION)] += 1
            continue
        if r.n_components >= 1:
            cells[S.class_key(r.cls, S.LESIONS[min(r.n_components, 3) - 1])] += 1
        for name, value in (("hist-ich-ml", r.ich_ml), ("hist-phe-ml", r.phe_ml), ("hist-ich-hu", r.ich_mean_hu),
                            ("hist-phe-hu", r.phe_mean_hu if r.phe_ml > 0 else None)):
            if value is not None:
                cells[f"{S.class_key(r.cls, name)}[{S.bin_index(float(value), S.HISTOGRAMS[name])}]"] += 1
    for r in rows:
        for field in S.SCANNER_FIELDS:
            cells[f"{S.SCANNER}.{field}.{r.scanner[field]}"] += 1
    return dict(cells)


@dataclasses.dataclass(frozen=True)
class Held:
    """Why a new table was held back: the cell, its change, and the release it was compared with."""

    cell: str
    change: int
    released_utc: str


def closest_call(cells: dict[str, int], releases: list[dict[str, Any]], k: int) -> Held | None:
    """The first cell whose true count differs from an earlier release by 1..k-1 cases (None: releasable)."""
    for release in releases:
        old = release["cells"]
        for cell in sorted(set(cells) | set(old)):
            change = int(cells.get(cell, 0)) - int(old.get(cell, 0))
            if 0 < abs(change) < k:
                return Held(cell, change, str(release.get("released_utc", "?")))
    return None


class ReleaseLedger:
    """The site's released Table 1s in ``<state_dir>/table1-releases.json`` (see the module doc)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LEDGER

    def releases(self) -> list[dict[str, Any]]:
        """Every release so far, oldest first (an unreadable ledger is an error, never a fresh start)."""
        from shared.plumbing.errors import IchfedError
        from shared.plumbing.files import read_json

        if not self.path.is_file():
            return []
        data = read_json(self.path)
        releases = data.get("releases")
        if not isinstance(releases, list) or not all(isinstance(r, dict) and isinstance(r.get("cells"), dict)
                                                     and isinstance(r.get("reply"), dict) for r in releases):
            raise IchfedError(f"{self.path}: not a Table 1 release ledger (delete it only to give up the "
                              "protection against differencing earlier releases)")
        return releases

    def decide(self, cells: dict[str, int], reply: dict[str, Any], k: int) -> tuple[dict[str, Any], Held | None]:
        """The reply to send for a table with true ``cells`` (``reply`` when releasable), and why not."""
        releases = self.releases()
        if releases and releases[-1]["cells"] == cells:
            return releases[-1]["reply"], None  # nothing changed: the same table again
        held = closest_call(cells, releases, k)
        if held is not None:
            return releases[-1]["reply"], held
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._write(releases + [{"released_utc": now, "cells": cells, "reply": reply}])
        return reply, None

    def _write(self, releases: list[dict[str, Any]]) -> None:
        from shared.plumbing.atomic import write_private_bytes

        # True counts of the site's patients: owner-only from the first byte.
        write_private_bytes(self.path, json.dumps({"releases": releases}, indent=1, sort_keys=True).encode("utf-8"))
