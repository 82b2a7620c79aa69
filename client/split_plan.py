"""The split a run will use at a site, computed before any run, and what to change when it is too small.

``ichfed site check`` and ``ichfed simulate`` call :func:`plan_split` on the site's labelled
cases with the site config's ``fine_tune_fraction``, ``min_cases_for_metrics`` and ``seed``: the
same :func:`client.split.stratified_split` and :func:`client.split.assign_folds` the site runs
in a federation, so the counts are the ones the run will see (less the cases in which the
bundle later finds no lesion, which only a run can know).

A site needs at least ``min_cases`` fine-tune cases of both classes to send a head update
(``client.session.SiteSession.train_round`` refuses otherwise), and at least ``min_cases``
held-out cases to report metrics (below that they are withheld, the run goes on). When the
fine-tune part is too small, :func:`plan_split` names the smallest ``fine_tune_fraction`` that
reaches the minimum and how many more labelled cases would reach it at the current fraction.

Both fixes aim ``SPARE`` case above the minimum: a fine-tune case in which the bundle finds no
lesion is not trained on, so a site planned at exactly the minimum fails its first round when
one is missed (issue 22's quick start saw it with the tiny test bundle). A ready site at exactly
the minimum gets a warning saying so.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection, Mapping

from .seeds import cross_fit_seed, split_seed
from .split import assign_folds, stratified_split

# The run config's default ``cross-fit-folds`` (pyproject.toml [tool.flwr.app.config]; a test
# holds the two equal). A site does not know a run's value before the run: ``site check``
# takes it as an option.
DEFAULT_CROSS_FIT_FOLDS = 5
_FRACTION_STEP = 0.05  # a fix is quoted on this grid: easier to type than 0.4166
SPARE = 1  # fine-tune cases a fix plans above the minimum (see the module doc)
_MAX_FRACTION = 0.95


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """A site's fine-tune / held-out split and cross-fit folds as the run will draw them."""

    fraction: float
    min_cases: int
    n_folds: int
    fine_tune: dict[str, int]  # {"neoplastic": n, "non_neoplastic": n}
    held_out: dict[str, int]
    fold_sizes: tuple[int, ...]  # fine-tune cases per cross-fit fold (empty when n_folds = 0)
    problems: tuple[str, ...]  # the site cannot send a head update
    warnings: tuple[str, ...]  # the run goes on, with less from this site
    fix: str | None  # what to change, when there are problems
    # cases with a reference mask in each part (segmenter rounds, issue 24: fine-tune on the first, judged on the second)
    masked_fine_tune: int = 0
    masked_held_out: int = 0

    @property
    def n_fine_tune(self) -> int:
        return sum(self.fine_tune.values())

    @property
    def n_held_out(self) -> int:
        return sum(self.held_out.values())

    @property
    def ready(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``site check --json``."""
        return {"fine_tune_fraction": self.fraction, "min_cases": self.min_cases, "cross_fit_folds": self.n_folds,
                "fine_tune": dict(self.fine_tune), "held_out": dict(self.held_out),
                "n_fine_tune": self.n_fine_tune, "n_held_out": self.n_held_out,
                "fold_sizes": list(self.fold_sizes), "problems": list(self.problems),
                "warnings": list(self.warnings), "fix": self.fix,
                "masked_fine_tune": self.masked_fine_tune, "masked_held_out": self.masked_held_out}


def plan_split(labels: Mapping[str, int], fraction: float, min_cases: int, seed: int,
               n_folds: int = DEFAULT_CROSS_FIT_FOLDS, masked: Collection[str] = ()) -> SplitPlan:
    """The split of ``labels`` (case ID -> 0/1) a run will use, and whether it is big enough.

    Parameters
    ----------
    labels : the site's labelled, usable cases
    fraction : the site config's ``fine_tune_fraction``
    min_cases : the site config's ``min_cases`` (``min_cases_for_metrics``, at least the protocol floor)
    seed : the site config's ``seed`` (the split and fold seeds are derived as in a run)
    n_folds : the run's ``cross-fit-folds`` (0: off)
    masked : the IDs of the cases with a reference mask (counted per part)
    """
    split = stratified_split(labels, fraction, split_seed(seed))
    fine = _by_class(split.fine_tune, labels)
    held = _by_class(split.held_out, labels)
    folds: tuple[int, ...] = ()
    if n_folds >= 2 and split.fine_tune:
        ids = list(split.fine_tune)
        assigned = assign_folds(ids, [labels[c] for c in ids], n_folds, cross_fit_seed(seed))
        folds = tuple(int((assigned == k).sum()) for k in range(n_folds))
    problems, warnings = _judge(fine, held, folds, min_cases)
    fix = _fix(labels, fraction, min_cases) if problems else None
    masked = set(masked)
    return SplitPlan(fraction=fraction, min_cases=min_cases, n_folds=n_folds, fine_tune=fine, held_out=held,
                     fold_sizes=folds, problems=tuple(problems), warnings=tuple(warnings), fix=fix,
                     masked_fine_tune=len(masked & set(split.fine_tune)), masked_held_out=len(masked & set(split.held_out)))


def _by_class(ids, labels: Mapping[str, int]) -> dict[str, int]:
    return {"neoplastic": sum(1 for c in ids if labels[c] == 1),
            "non_neoplastic": sum(1 for c in ids if labels[c] == 0)}


def _judge(fine: dict[str, int], held: dict[str, int], folds: tuple[int, ...],
           min_cases: int) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    n_fine, n_held = sum(fine.values()), sum(held.values())
    if n_fine < min_cases:
        problems.append(f"{n_fine} fine-tune case(s), fewer than the minimum of {min_cases}: the site would "
                        "refuse to train in every round")
    if n_fine and not all(fine.values()):
        problems.append("the fine-tune part lacks a class (a head update needs both)")
    if min_cases <= n_fine < min_cases + SPARE:
        warnings.append(f"{n_fine} fine-tune cases, exactly the minimum: a case in which the bundle finds no lesion "
                        "is not trained on and would leave the site below it")
    if n_held < min_cases:
        warnings.append(f"{n_held} held-out case(s), fewer than {min_cases}: this site's evaluation metrics "
                        "will be withheld")
    if folds and n_fine >= min_cases and min(folds) == 0:
        warnings.append(f"{sum(1 for f in folds if f == 0)} of {len(folds)} cross-fit folds hold no fine-tune "
                        "case: the site's threshold rests on few out-of-fold scores")
    return problems, warnings


def smallest_fraction(labels: Mapping[str, int], min_cases: int, above: float = 0.0) -> float | None:
    """The smallest ``fine_tune_fraction`` above ``above`` (on a 0.05 grid, at most 0.95) giving
    ``min_cases`` fine-tune cases; None when no fraction does."""
    n_pos = sum(1 for y in labels.values() if y == 1)
    n_neg = len(labels) - n_pos
    return next((f for f in _grid(above) if _trains(n_pos, n_neg, f, min_cases)), None)


def more_cases_needed(labels: Mapping[str, int], fraction: float, min_cases: int) -> int | None:
    """How many labelled cases to add (in the site's class proportions) for ``min_cases`` fine-tune cases."""
    n_pos = sum(1 for y in labels.values() if y == 1)
    return _more_cases(n_pos, len(labels) - n_pos, fraction, min_cases)


def _fix(labels: Mapping[str, int], fraction: float, min_cases: int) -> str:
    """The smallest fraction (on a 0.05 grid) and the fewest added cases that reach ``min_cases``."""
    n_pos = sum(1 for y in labels.values() if y == 1)
    n_neg = len(labels) - n_pos
    options = []
    target = min_cases + SPARE
    better = smallest_fraction(labels, target, above=fraction)
    if better is not None:
        held = n_pos + n_neg - _fine_count(n_pos, n_neg, better)
        note = "" if held >= min_cases else f"; then only {held} held out, so this site's metrics are withheld"
        options.append(f"raise fine_tune_fraction to {better:.2f} in the site config "
                       f"({_fine_count(n_pos, n_neg, better)} fine-tune cases: the minimum of {min_cases} and a spare"
                       f"{note})")
    more = more_cases_needed(labels, fraction, target)
    if more is not None:
        options.append(f"add {more} more labelled case(s) (keeping fine_tune_fraction {fraction:g})")
    return " or ".join(options) if options else "add labelled cases of both classes"


def _grid(current: float):
    start = math.floor(current / _FRACTION_STEP + 1e-9) + 1
    return [round(k * _FRACTION_STEP, 2) for k in range(start, int(_MAX_FRACTION / _FRACTION_STEP) + 1)]


def _fine_count(n_pos: int, n_neg: int, fraction: float) -> int:
    """Fine-tune cases ``stratified_split`` draws from classes of these sizes."""
    def one(n: int) -> int:
        return min(max(int(round(fraction * n)), 1), n - 1) if n >= 2 else 0

    return one(n_pos) + one(n_neg)


def _more_cases(n_pos: int, n_neg: int, fraction: float, min_cases: int) -> int | None:
    """Fewest added cases (in the site's class proportions, at least one per class) reaching ``min_cases``."""
    n = n_pos + n_neg
    share = n_pos / n if n else 0.5
    for m in range(1, 10_000):
        add_pos = min(max(int(round(m * share)), 1 if m >= 2 else 0), m)
        if _trains(n_pos + add_pos, n_neg + m - add_pos, fraction, min_cases):
            return m
    return None


def _trains(n_pos: int, n_neg: int, fraction: float, min_cases: int) -> bool:
    """Enough fine-tune cases, of both classes (a class needs two cases to put one in fine-tuning)."""
    return n_pos >= 2 and n_neg >= 2 and _fine_count(n_pos, n_neg, fraction) >= min_cases
