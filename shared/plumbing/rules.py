"""The rules for decision thresholds, probabilities and calibrations, each stated once.

Every reader of such a value goes through these functions: the bundle manifest's threshold
(``shared.bundle.manifest``, through ``shared.plumbing.config`` field metadata ``{"rule": ...}``),
the site overlay (``client.overlay``), the calibration (``shared.evaluation.calibration``), the
metrics (``shared.evaluation.metrics``) and the privacy allow-list's grid check (``client.privacy``).
Before, five validators disagreed (a bundle threshold could be 0 or 1, an overlay's could not).

Each rule takes the raw value and ``where`` (the file and field, for the message) and returns the
value as a float, or raises ``IchfedError("<where>: <what is wrong>")`` in one line.

The rules:
- a **probability** is a finite real number in [0, 1];
- a **decision threshold** lies strictly between 0 and 1: 0 would call every case neoplastic and
  1 none, and a NaN compares false with every score, so it would silently call every case
  non-neoplastic. A **site threshold** (the overlay) also lies on ``THRESHOLD_GRID``, where the
  site rule (``client.calibrate.on_grid``) puts it: 0.01, 0.02, ..., 0.99. Bootstrap's threshold
  (a midpoint between two validation scores) and the federated one (a weighted mean of site
  thresholds) are not on the grid, so the grid is asked for by the caller.
- a **calibration** (Platt: ``expit(slope * logit(p) + intercept)``) has a slope in
  (0, ``MAX_CALIBRATION_SLOPE``] and an intercept within ``MAX_CALIBRATION_INTERCEPT`` of 0.
  A slope of 0 or below reverses or flattens the ranking of the scores, so ``p_calibrated``
  would contradict the label; a slope above 100 turns the calibration into a step (a 1 %
  change in the odds of ``p`` moves the calibrated log-odds by 1 or more) and 1e308 overflows.
  The intercept bound is the slope bound times the largest logit the calibration sees
  (``logit(1 - 1e-6)`` = 13.8), rounded up: a step anywhere in the score range stays expressible.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from shared.plumbing.errors import IchfedError

THRESHOLD_GRID = 0.01
MAX_CALIBRATION_SLOPE = 100.0
MAX_CALIBRATION_INTERCEPT = 1500.0
# How far (in grid steps) a float may sit from a grid point and still be on it: JSON and
# arithmetic give 0.37 as 36.99999999999999 steps; 0.9999999999 is 1e-8 steps off and is refused.
_GRID_TOLERANCE = 1e-9


def finite_number(value: Any, where: str, what: str = "a number") -> float:
    """``value`` as a finite float; ``what`` names the expected value in the message."""
    if value is None:
        raise IchfedError(f"{where}: missing or null ({what} is required)")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise IchfedError(f"{where}: must be a number, got {type(value).__name__} {value!r}"[:200])
    v = float(value)
    if not math.isfinite(v):
        raise IchfedError(f"{where}: must be a finite number, got {value!r}")
    return v


def probability(value: Any, where: str) -> float:
    """A finite number in [0, 1] (a score, a rate, a threshold metrics are computed at)."""
    v = finite_number(value, where, "a probability in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise IchfedError(f"{where}: must be a probability in [0, 1], got {value!r}")
    return v


def grid_steps(value: float, grid: float = THRESHOLD_GRID) -> int | None:
    """``k`` when ``value`` is ``k * grid`` (within float rounding), else None."""
    if not (isinstance(value, numbers.Real) and math.isfinite(value)) or not 0.0 < grid < 1.0:
        return None
    steps = float(value) / grid
    k = round(steps)
    return int(k) if abs(steps - k) <= _GRID_TOLERANCE else None


def threshold(value: Any, where: str, *, grid: float | None = None) -> float:
    """A decision threshold strictly between 0 and 1; with ``grid``, also one of its inner points.

    Returns the value, snapped exactly onto the grid point when ``grid`` is given.
    """
    v = finite_number(value, where, "a probability strictly between 0 and 1")
    if not 0.0 < v < 1.0:
        raise IchfedError(f"{where}: must lie strictly between 0 and 1, got {value!r}")
    if grid is None:
        return v
    k = grid_steps(v, grid)
    if k is None or not 1 <= k < round(1.0 / grid):
        raise IchfedError(f"{where}: must lie on the {grid:g} grid the site rule uses "
                          f"({grid:g}, {2 * grid:g}, ..., {1 - grid:g}), got {value!r}")
    return round(k * grid, 10)


def calibration_slope(value: Any, where: str) -> float:
    """A Platt slope: positive (the calibration keeps the scores' order) and at most ``MAX_CALIBRATION_SLOPE``."""
    v = finite_number(value, where)
    if not 0.0 < v <= MAX_CALIBRATION_SLOPE:
        raise IchfedError(f"{where}: must be positive and at most {MAX_CALIBRATION_SLOPE:g} "
                          f"(a calibration keeps the order of the scores), got {value!r}")
    return v


def calibration_intercept(value: Any, where: str) -> float:
    """A Platt intercept within ``MAX_CALIBRATION_INTERCEPT`` of 0."""
    v = finite_number(value, where)
    if abs(v) > MAX_CALIBRATION_INTERCEPT:
        raise IchfedError(f"{where}: must lie within ±{MAX_CALIBRATION_INTERCEPT:g}, got {value!r}")
    return v
