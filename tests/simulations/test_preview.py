"""The preview montage is written and shows both outline colours."""

from __future__ import annotations

import numpy as np
import pytest

from shared.plumbing.errors import IchfedError
from simulations.preview import render_preview


def test_preview_png_has_green_and_red_outlines(ci_cohort, tmp_path):
    folder, _ = ci_cohort
    out = render_preview(folder, tmp_path / "sub" / "preview.png", n_cases=3)
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    px = mpimg.imread(out)[..., :3]
    assert px.shape[0] > 200 and px.shape[1] > 200
    green = (px[..., 1] > 0.7) & (px[..., 0] < 0.3) & (px[..., 2] < 0.3)
    red = (px[..., 0] > 0.7) & (px[..., 1] < 0.3) & (px[..., 2] < 0.3)
    assert green.sum() > 20 and red.sum() > 20
    assert not list(out.parent.glob(".*"))


def test_preview_of_a_folder_without_cases_csv_is_a_user_error(tmp_path):
    with pytest.raises(IchfedError, match="cases.csv"):
        render_preview(tmp_path, tmp_path / "p.png")
    np.testing.assert_equal((tmp_path / "p.png").exists(), False)
