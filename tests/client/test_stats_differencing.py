"""Issue 21 item 12: ``ichfed stats`` run twice with one case added (or removed) must not reveal that case.

A real synthetic site folder (``simulations.cohort.write_cohort``, reference masks), its Table 1
built by ``client.stats.site_table1`` exactly as the ClientApp does, then passed through the reply
builder and its allow-list. The attacker is the coordinator: it keeps both replies and subtracts
them cell by cell. Without the site's release ledger (a fresh state folder) the attack recovers
the added case's class and bins; with it, the difference is zero.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from client.privacy import build_reply
from client.site_config import SiteConfig
from client.stats import site_table1
from client.stats_ledger import LEDGER
from shared.federation import protocol as P
from shared.federation import stats_protocol as S
from simulations.cohort import write_cohort

K = 5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diff_cohort")
    write_cohort("community-hospital", 40, 7, root / "site", scale="ci")
    return root / "site"


def _site(cohort: Path, tmp_path: Path) -> SiteConfig:
    data = Path(shutil.copytree(cohort, tmp_path / "site"))
    return SiteConfig(name="site-a", data_dir=data, state_dir=tmp_path / "state", min_cases_for_metrics=K)


def _cases(cfg: SiteConfig) -> list[dict]:
    with open(cfg.data_dir / "cases.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _write_cases(cfg: SiteConfig, rows: list[dict]) -> None:
    with open(cfg.data_dir / "cases.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _add_copies(cfg: SiteConfig, source: dict, n: int) -> None:
    """Add ``n`` cases that are copies of case ``source`` (same class, same volumes and densities)."""
    rows = _cases(cfg)
    for i in range(n):
        new = f"added{i:02d}"
        for folder in ("images", "masks"):
            shutil.copy(cfg.data_dir / folder / f"{source['case_id']}.nii.gz", cfg.data_dir / folder / f"{new}.nii.gz")
        rows.append({**source, "case_id": new})
    _write_cases(cfg, rows)


def _wire(cfg: SiteConfig) -> dict[str, float | list]:
    """What the coordinator receives: every metric and scanner count of the checked reply, as flat cells."""
    t1 = site_table1(cfg)
    content = build_reply(cfg.name, metrics=t1.metrics, reasons=t1.reasons, scanner=t1.scanner)
    cells: dict[str, float] = {}
    for key, value in dict(content[P.METRICS]).items():
        if isinstance(value, list):
            cells.update({f"{key}[{i}]": v for i, v in enumerate(value)})
        else:
            cells[key] = value
    record = content[S.SCANNER] if S.SCANNER in content else {}
    for key in record.keys():
        if not key.endswith(".n"):
            cells.update({f"scanner.{key}.{label}": n for label, n in zip(record[key], record[f"{key}.n"])})
    return cells


def _attack(before: dict, after: dict) -> dict[str, float]:
    """The differencing attack: every cell that moved between two replies."""
    return {c: after.get(c, 0) - before.get(c, 0) for c in set(before) | set(after) if after.get(c, 0) != before.get(c, 0)}


def _learned_class(diff: dict[str, float]) -> str | None:
    moved = [cls for cls in S.CLASSES if diff.get(S.class_key(cls, S.N))
             or any(c.startswith(f"{S.PREFIX}.{cls}.hist-") for c in diff)]
    return moved[0] if len(moved) == 1 else None


def _big_class_case(cfg: SiteConfig) -> dict:
    """A case of the larger class, so that its class count is shown (above the floor) in both tables."""
    rows = _cases(cfg)
    counts = {label: sum(r["label"] == label for r in rows) for label in {r["label"] for r in rows}}
    label = max(counts, key=counts.get)
    return next(r for r in rows if r["label"] == label and float(r.get("ich_ml") or 1) > 0)


def test_the_attack_works_on_a_site_without_a_ledger(cohort, tmp_path):
    """The attack is real: two independent releases around one added case reveal its class and bins."""
    cfg = _site(cohort, tmp_path)
    before = _wire(cfg)
    victim = _big_class_case(cfg)
    _add_copies(cfg, victim, 1)
    (cfg.state_dir / LEDGER).unlink(missing_ok=True)  # a site that forgot what it released
    diff = _attack(before, _wire(cfg))
    assert diff[S.site_key(S.N)] == 1
    assert _learned_class(diff) == {"1": "neoplastic", "0": "non-neoplastic"}.get(victim["label"], victim["label"])
    assert any("hist-ich-ml" in c for c in diff), diff  # the case's ICH volume bin


@pytest.mark.parametrize("change", ["added", "removed"])
def test_differencing_one_case_learns_nothing(cohort, tmp_path, change):
    cfg = _site(cohort, tmp_path)
    before = _wire(cfg)
    if change == "added":
        _add_copies(cfg, _big_class_case(cfg), 1)
    else:
        rows = _cases(cfg)
        victim = _big_class_case(cfg)
        _write_cases(cfg, [r for r in rows if r["case_id"] != victim["case_id"]])
    after = _wire(cfg)
    assert _attack(before, after) == {}  # the coordinator's difference is empty: nothing about the case
    assert _learned_class(_attack(before, after)) is None


def test_a_chain_of_allowed_changes_cannot_isolate_one_case(cohort, tmp_path):
    """+k, +k, then -(2k-1): each step moves every cell by at least k, but the first and the last table
    differ by one case. Every new table is compared with every earlier release, not only the last."""
    cfg = _site(cohort, tmp_path)
    first = _wire(cfg)
    victim = _big_class_case(cfg)
    _add_copies(cfg, victim, 2 * K)
    rows = _cases(cfg)
    _write_cases(cfg, rows[:-2 * K] + rows[-2 * K:-K])  # +k: released
    assert _attack(first, _wire(cfg))[S.site_key(S.N)] == K
    _write_cases(cfg, rows)  # +2k: released
    assert _attack(first, _wire(cfg))[S.site_key(S.N)] == 2 * K
    _write_cases(cfg, rows[:-(2 * K - 1)])  # -(2k-1) from the last release: one case more than the first
    last = _wire(cfg)
    assert _attack(first, last) != {} and _attack(first, last)[S.site_key(S.N)] == 2 * K  # the +2k table again
    assert not any(abs(v) == 1 for v in _attack(first, last).values())


def test_a_change_of_at_least_k_cases_in_every_cell_is_released(cohort, tmp_path):
    """The ledger does not freeze a site for good: k identical new cases move every cell they touch by k."""
    cfg = _site(cohort, tmp_path)
    before = _wire(cfg)
    _add_copies(cfg, _big_class_case(cfg), K)
    diff = _attack(before, _wire(cfg))
    assert diff[S.site_key(S.N)] == K and all(abs(v) >= K for v in diff.values()), diff
    assert (cfg.state_dir / LEDGER).stat().st_mode & 0o777 == 0o600
