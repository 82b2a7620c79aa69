"""Issue 23 item 2 and issue 21 item 8: one rule per value (``shared.plumbing.rules``), and every
validator of a threshold or a calibration agrees with it."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from shared.bundle.manifest import ThresholdSpec, threshold_spec
from shared.evaluation.calibration import Calibration
from shared.evaluation.metrics import classification_metrics, snap_threshold
from shared.plumbing import rules
from shared.plumbing.config import from_dict
from shared.plumbing.errors import IchfedError

# (value, what the one-line message says) for thresholds no reader may accept
NOT_THRESHOLDS = [
    (0.0, "strictly between 0 and 1"),
    (1.0, "strictly between 0 and 1"),
    (-0.2, "strictly between 0 and 1"),
    (1.5, "strictly between 0 and 1"),
    (float("nan"), "finite"),
    (float("inf"), "finite"),
    (None, "missing or null"),
    ("0.3", "must be a number"),
    (True, "must be a number"),
]
# On (0, 1) but not where the site rule puts a site threshold.
OFF_GRID = [1e-300, 0.9999999999, 0.375, 0.005, 0.995]


@pytest.mark.parametrize("value, message", NOT_THRESHOLDS)
def test_every_threshold_reader_refuses_the_same_values(value, message):
    """The bundle (threshold_spec, and the manifest's ThresholdSpec through config) and the overlay's
    rule refuse the same values; before, a bundle threshold could be 0 or 1."""
    from client.overlay import parse_overlay

    readers = [
        lambda: threshold_spec(value),
        lambda: from_dict(ThresholdSpec, {"p": value, "log_p": -1.0}, source="manifest.json", prefix="threshold"),
        lambda: parse_overlay({"threshold": value}, "site/overlay.json", "ab" * 32),
        lambda: rules.threshold(value, "x"),
    ]
    for read in readers:
        with pytest.raises(IchfedError) as e:
            read()
        assert message in str(e.value) and "\n" not in str(e.value)


def test_bundle_and_site_accept_the_same_grid_thresholds_and_only_the_site_needs_the_grid():
    from client.overlay import parse_overlay

    for good in (0.01, 0.37, 0.5, 0.99):
        assert threshold_spec(good).p == good
        assert parse_overlay({"threshold": good}, "o.json", "ab" * 32).threshold == good
    # 0.37 as arithmetic gives it still lands exactly on the grid point
    assert rules.threshold(0.1 + 0.27, "t", grid=0.01) == 0.37
    # bootstrap's midpoint threshold is off the grid and stays a valid bundle threshold
    assert threshold_spec(0.5755500432778724).p == pytest.approx(0.5755500432778724)


@pytest.mark.parametrize("value", OFF_GRID)
def test_site_overlay_threshold_off_the_grid_is_refused_naming_file_and_field(value):
    from client.overlay import parse_overlay

    with pytest.raises(IchfedError, match=r"site/o\.json: threshold: must lie on the 0\.01 grid") as e:
        parse_overlay({"threshold": value}, "site/o.json", "ab" * 32)
    assert repr(value) in str(e.value)


@pytest.mark.parametrize("slope, message", [
    (-50.0, "must be positive"),
    (0.0, "must be positive"),
    (1e308, "at most 100"),
    (100.0001, "at most 100"),
    (float("nan"), "finite"),
    ("0.5", "must be a number"),
    (None, "missing or null"),
])
def test_calibration_slope_must_be_positive_and_bounded(slope, message):
    with pytest.raises(IchfedError, match=f"calibration.slope: .*{message}"):
        Calibration.from_dict({"kind": "platt", "slope": slope, "intercept": 0.0})
    with pytest.raises(IchfedError, match="calibration.slope"):
        Calibration(kind="platt", slope=slope if isinstance(slope, float) else -1.0)


def test_calibration_intercept_is_bounded_and_edge_values_do_not_overflow():
    with pytest.raises(IchfedError, match="calibration.intercept: must lie within"):
        Calibration.from_dict({"kind": "platt", "slope": 1.0, "intercept": -1e308})
    steep = Calibration(kind="platt", slope=rules.MAX_CALIBRATION_SLOPE, intercept=rules.MAX_CALIBRATION_INTERCEPT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow RuntimeWarning from a hand-written exp
        out = steep(np.array([0.0, 1e-9, 0.5, 1.0]))
    assert np.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()


def test_inverted_scores_give_the_identity_with_a_reason_not_a_negative_slope():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.5 - 0.3 * (y - 0.5) + rng.normal(0, 0.1, y.size), 0.01, 0.99)  # positives score lower
    cal = Calibration.fit(y, p)
    assert cal.kind == "identity" and "must be positive" in cal.reason
    assert cal(0.3) == pytest.approx(0.3)


def test_overlay_with_inverted_or_overflowing_calibration_is_one_line_naming_the_file(tmp_path):
    from client.overlay import load_overlay, overlay_path

    h = "ab" * 32
    path = overlay_path(tmp_path, h)
    path.parent.mkdir(parents=True)
    for slope in (-50.0, 1e308):
        cal = {"kind": "platt", "slope": slope, "intercept": 0.0, "n_pos": 9, "n_neg": 9}
        path.write_text(json.dumps({"version": 1, "bundle_hash": h, "threshold": 0.4, "calibration": cal}),
                        encoding="utf-8")
        with pytest.raises(IchfedError) as e:
            load_overlay(tmp_path, h)
        assert str(e.value).startswith(f"{path}: calibration.slope: ") and "\n" not in str(e.value)


def test_probability_rule_is_what_metrics_apply():
    for bad in (-0.01, 1.01, float("nan"), "0.5"):
        with pytest.raises(IchfedError, match="threshold"):
            snap_threshold(bad)
        with pytest.raises(IchfedError, match="threshold"):
            classification_metrics([0, 1], [0.2, 0.8], bad, n_boot=0)
    assert snap_threshold(0.0) == 0.01 and snap_threshold(1.0) == 0.99  # inside (0, 1), on the grid


def test_grid_steps_is_the_privacy_grid_check():
    from client.privacy import PrivacyViolation, _check_on_grid

    assert rules.grid_steps(0.37) == 37 and rules.grid_steps(0.9999999999) is None
    _check_on_grid("reference.threshold", 0.37)
    with pytest.raises(PrivacyViolation, match="grid"):
        _check_on_grid("reference.threshold", 0.3700001)
