"""The split a run will use, computed before the run (``client.split_plan``, issue 22 item 1)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from client.seeds import split_seed
from client.split import stratified_split
from client.split_plan import (
    DEFAULT_CROSS_FIT_FOLDS,
    SPARE,
    more_cases_needed,
    plan_split,
    smallest_fraction,
)

REPO = Path(__file__).resolve().parents[2]


def _labels(n_pos: int, n_neg: int) -> dict[str, int]:
    return {**{f"p{i:03d}": 1 for i in range(n_pos)}, **{f"n{i:03d}": 0 for i in range(n_neg)}}


def test_plan_is_the_split_the_site_draws():
    labels = _labels(9, 21)
    plan = plan_split(labels, 0.2, 5, seed=3)
    split = stratified_split(labels, 0.2, split_seed(3))  # what client.features draws in a run
    assert plan.n_fine_tune == len(split.fine_tune) and plan.n_held_out == len(split.held_out)
    assert plan.fine_tune == {"neoplastic": 2, "non_neoplastic": 4}
    assert sum(plan.fold_sizes) == plan.n_fine_tune and len(plan.fold_sizes) == DEFAULT_CROSS_FIT_FOLDS
    assert plan.ready and plan.fix is None


def test_twelve_cases_at_the_default_fraction_are_not_ready_and_the_fix_works():
    """The 12-case site of issue 22: 0.2 x 6 per class gives 2 fine-tune cases, below 5."""
    labels = _labels(6, 6)
    plan = plan_split(labels, 0.2, 5, seed=0)
    assert not plan.ready and plan.n_fine_tune == 2
    assert "fewer than the minimum of 5" in plan.problems[0]
    assert "raise fine_tune_fraction to 0.45" in plan.fix and "add 14 more labelled case(s)" in plan.fix
    # Both fixes reach the minimum and a spare (a case without a segmented lesion is not trained on).
    assert plan_split(labels, 0.45, 5, seed=0).n_fine_tune == 5 + SPARE
    assert plan_split(labels, 0.40, 5, seed=0).n_fine_tune < 5 + SPARE
    bigger = _labels(6 + 7, 6 + 7)  # 14 more, in the site's proportions
    assert plan_split(bigger, 0.2, 5, seed=0).n_fine_tune >= 5 + SPARE


@pytest.mark.parametrize("n_pos, n_neg, fraction, min_cases", [
    (3, 9, 0.2, 5), (10, 2, 0.2, 5), (5, 5, 0.1, 7), (20, 4, 0.05, 5), (2, 2, 0.2, 5), (1, 30, 0.2, 5)])
def test_every_named_fix_reaches_the_minimum(n_pos, n_neg, fraction, min_cases):
    labels = _labels(n_pos, n_neg)
    f = smallest_fraction(labels, min_cases, above=fraction)
    if f is not None:
        assert plan_split(labels, f, min_cases, seed=0).n_fine_tune >= min_cases
        assert f == pytest.approx(round(f / 0.05) * 0.05) and f > fraction
    more = more_cases_needed(labels, fraction, min_cases)
    assert more is not None
    share = n_pos / (n_pos + n_neg)
    add_pos = min(max(round(more * share), 1 if more >= 2 else 0), more)
    assert plan_split(_labels(n_pos + add_pos, n_neg + more - add_pos), fraction, min_cases, seed=0).ready
    if more > 1:  # the fewest: one case less does not do it
        m = more - 1
        add_pos = min(max(round(m * share), 1 if m >= 2 else 0), m)
        assert not plan_split(_labels(n_pos + add_pos, n_neg + m - add_pos), fraction, min_cases, seed=0).ready


def test_exactly_the_minimum_is_ready_with_a_warning():
    plan = plan_split(_labels(4, 6), 0.5, 5, seed=0)  # 2 + 3 fine-tune cases
    assert plan.n_fine_tune == 5 and plan.ready
    assert any("exactly the minimum" in w for w in plan.warnings)


def test_small_held_out_part_and_empty_folds_are_warnings_not_problems():
    plan = plan_split(_labels(4, 4), 0.7, 5, seed=0)  # 6 fine-tune, 2 held out
    assert plan.ready
    assert any("held-out" in w and "withheld" in w for w in plan.warnings)
    plan = plan_split(_labels(4, 4), 0.7, 5, seed=0, n_folds=10)
    assert any("cross-fit folds hold no fine-tune case" in w for w in plan.warnings)
    assert plan_split(_labels(9, 21), 0.2, 5, seed=0, n_folds=0).fold_sizes == ()


def test_default_cross_fit_folds_is_the_run_configs():
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    assert DEFAULT_CROSS_FIT_FOLDS == config["cross-fit-folds"]
