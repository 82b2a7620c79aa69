"""Fixtures: tiny cohorts written once per test session."""

from __future__ import annotations

import pytest

from simulations.cohort import write_cohort


@pytest.fixture(scope="session")
def ci_cohort(tmp_path_factory):
    """Four charite-like cases at ci scale (seed 11) and their summary."""
    out = tmp_path_factory.mktemp("ci_cohort")
    summary = write_cohort("charite-like", 4, 11, out, scale="ci")
    return out, summary
