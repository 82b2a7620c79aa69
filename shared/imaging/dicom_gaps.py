"""Missing slices in a DICOM series, found from headers before any pixel is read.

A deleted slice (or one replaced by a 0-byte file, which is skipped as "not DICOM") used to be
interpolated silently: one missing 4 mm slice of the real GE series made an 8 mm gap, which moved the
median gap and resampled the whole volume to 7 mm (22 planes instead of 37). A slice counts as
missing when

* the stack's InstanceNumbers are usable (all set, distinct, and monotonic along the slice normal)
  and two neighbours' numbers jump by more than the series' usual step, or
* two neighbouring slices are more than ``GAP_FACTOR`` times as far apart as the larger of the gaps
  beside them (a series' own spacing may change, e.g. 4 mm then 7 mm on the GE series; one missing
  slice doubles the gap where it was). The first and last gaps have one neighbour only, so the
  series' median gap is their second witness: they must exceed both.

``shared.imaging.dicom_series`` refuses such a series with one line naming where the slice is missing,
unless the user passes ``--allow-missing-slices``; the gap is then interpolated and noted, and the
output spacing is chosen as if the missing slices were there.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np

#: a gap this many times the larger neighbouring gap is a missing slice (one missing slice makes 2x;
#: the margin below 2 absorbs position jitter, the margin above 1.5 a series' own spacing changes)
GAP_FACTOR = 1.75


@dataclasses.dataclass(frozen=True)
class Gap:
    """Slices missing between sorted slices ``after`` and ``after + 1``."""

    after: int
    n_missing: int
    position: tuple[float, float, float]  # expected ImagePositionPatient of the first missing slice
    instance: int | None  # its InstanceNumber, when the numbers tell
    gap_mm: float  # distance between the two slices along the normal
    usual_mm: float  # the spacing beside the gap


def find_gaps(instances: Sequence[int], positions: np.ndarray, depth: np.ndarray) -> list[Gap]:
    """The gaps of a stack sorted along its normal (``depth``), from InstanceNumbers and positions."""
    gaps = np.diff(np.asarray(depth, dtype=np.float64))
    found: dict[int, Gap] = {}
    for i, n, inst, frac in _instance_gaps(instances):
        found[i] = _gap(i, n, inst, frac, positions, gaps)
    for i, n in _position_gaps(gaps):
        if i not in found:
            found[i] = _gap(i, n, None, 1.0 / (n + 1), positions, gaps)
    return [found[i] for i in sorted(found)]


def _instance_gaps(instances: Sequence[int]) -> list[tuple[int, int, int, float]]:
    """(index, missing count, first missing number, its fraction of the way) where the numbers jump."""
    nums = [int(v) for v in instances]
    if len(nums) < 3 or min(nums) <= 0 or len(set(nums)) != len(nums):
        return []
    diffs = np.diff(nums)
    if not (np.all(diffs > 0) or np.all(diffs < 0)):
        return []  # numbered in another order than position: they say nothing about gaps
    step = Counter(abs(int(d)) for d in diffs).most_common(1)[0][0]
    out = []
    for i, d in enumerate(diffs):
        missing = int(round(abs(int(d)) / step)) - 1
        if missing >= 1:
            sign = 1 if d > 0 else -1
            out.append((i, missing, nums[i] + sign * step, step / abs(int(d))))
    return out


def _position_gaps(gaps: np.ndarray) -> list[tuple[int, int]]:
    """(index, missing count) where a gap is ``GAP_FACTOR`` times its neighbours (the median too at an end)."""
    out = []
    median = float(np.median(gaps)) if len(gaps) else 0.0
    for i, g in enumerate(gaps):
        beside = [gaps[j] for j in (i - 1, i + 1) if 0 <= j < len(gaps)]
        if not beside:
            continue
        usual = float(max(beside)) if len(beside) == 2 else max(float(beside[0]), median)
        if g > GAP_FACTOR * usual:
            out.append((i, max(1, int(round(g / usual)) - 1)))
    return out


def _gap(i: int, n: int, inst: int | None, frac: float, positions: np.ndarray, gaps: np.ndarray) -> Gap:
    a, b = np.asarray(positions[i], dtype=np.float64), np.asarray(positions[i + 1], dtype=np.float64)
    beside = [float(gaps[j]) for j in (i - 1, i + 1) if 0 <= j < len(gaps)]
    usual = max(beside) if beside else float(gaps[i]) / (n + 1)
    where = a + (b - a) * frac
    return Gap(after=i, n_missing=n, position=tuple(float(v) for v in where), instance=inst,
               gap_mm=float(gaps[i]), usual_mm=usual)


def describe(gap: Gap) -> str:
    """``InstanceNumber 8 near ImagePositionPatient (-125.0, -123.5, 35.4)`` (and how many more)."""
    what = f"InstanceNumber {gap.instance} " if gap.instance is not None else ""
    x, y, z = gap.position
    more = f" and {gap.n_missing - 1} more after it" if gap.n_missing > 1 else ""
    return f"{what}near ImagePositionPatient ({x:.1f}, {y:.1f}, {z:.1f}){more}"


def filled_gaps(depth: np.ndarray, gaps_found: list[Gap]) -> np.ndarray:
    """The stack's gaps with each missing stretch split as if its slices were there (for the median step)."""
    gaps = list(np.diff(np.asarray(depth, dtype=np.float64)))
    out: list[float] = []
    split = {g.after: g.n_missing for g in gaps_found}
    for i, g in enumerate(gaps):
        k = split.get(i, 0) + 1
        out.extend([g / k] * k)
    return np.asarray(out)
