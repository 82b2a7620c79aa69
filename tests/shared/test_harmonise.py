"""Noise harmonisation before nnU-Net (shared/imaging/harmonise.py, issue 19): measured noise, when it acts,
how it is stored with a model and verified like the weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from shared.imaging.harmonise import (
    FILE_NAME,
    Harmonisation,
    noise_hu,
    read_harmonisation,
    smooth_inplane,
)
from shared.plumbing.errors import IchfedError


def _flat(sd: float, seed: int = 0, shape=(6, 96, 96)) -> sitk.Image:
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(np.round(32 + rng.normal(0, sd, shape)).astype(np.int16))
    img.SetSpacing((0.9, 0.9, 5.0))
    return img


def test_noise_is_the_sd_of_white_noise_and_a_smooth_kernels_blobs_read_quiet():
    for sd in (3.0, 6.0):
        assert noise_hu(sitk.GetArrayFromImage(_flat(sd))) == pytest.approx(sd, rel=0.1)
    # A smooth kernel's noise is blobby: its pixel SD is large, its high-frequency part small, so such a scan
    # is not smoothed further (that erased lesions at the smooth-kernel profiles).
    a = sitk.GetArrayFromImage(smooth_inplane(_flat(12.0), 1.0))
    assert noise_hu(a) < 0.5 * float(np.std(a))
    assert np.isnan(noise_hu(np.full((4, 32, 32), -1000.0)))  # air only: nothing to measure


def test_a_development_like_scan_is_left_alone_and_a_noisy_one_is_smoothed_to_the_goal():
    h = Harmonisation.fit([sitk.GetArrayFromImage(_flat(5.0, seed=s)) for s in range(3)])
    assert h.development_noise_hu == pytest.approx(5.0, rel=0.1)
    same = _flat(5.5, seed=9)
    out, sigma = h(same)
    assert sigma == 0.0 and out is same
    noisy = _flat(14.0, seed=9)
    out, sigma = h(noisy)
    assert sigma in h.sigmas_mm and sigma > 0
    assert noise_hu(sitk.GetArrayFromImage(out)) <= h.reach * h.development_noise_hu
    # the smallest sigma that reaches the goal: the one before it does not
    i = list(h.sigmas_mm).index(sigma)
    if i:
        before = smooth_inplane(noisy, h.sigmas_mm[i - 1])
        assert noise_hu(sitk.GetArrayFromImage(before)) > h.reach * h.development_noise_hu
    assert out.GetSpacing() == noisy.GetSpacing() and out.GetOrigin() == noisy.GetOrigin()
    # off: a model without harmonisation.json segments the scan as it came
    assert Harmonisation()(noisy) == (noisy, 0.0)


def test_the_file_round_trips_and_a_bad_one_is_named():
    h = Harmonisation(development_noise_hu=4.5)
    assert read_harmonisation(json.dumps(h.to_dict()).encode()) == Harmonisation(4.5, sigmas_mm=tuple(h.sigmas_mm))
    assert read_harmonisation(None).active is False
    for bad in (b"{", b"[]", json.dumps({**h.to_dict(), "development_noise_hu": -1}).encode(),
                json.dumps({"trigger": 1.3}).encode()):
        with pytest.raises(IchfedError, match=FILE_NAME):
            read_harmonisation(bad)


@pytest.mark.slow
def test_the_segmenter_harmonises_with_its_verified_file(tiny_bundle, tmp_path):
    """bootstrap's fit on the segmenter's training scans, stored beside the model: the segmenter smooths a
    scan far noisier than those and leaves a development scan alone; a file the verified hashes do not
    list, or that changed after verification, is refused like a changed weight."""
    import hashlib

    from server.bootstrap_crops import fit_harmonisation
    from shared.bundle import load_bundle
    from shared.imaging.sitedata import read_site
    from shared.models.segment import Segmenter
    from shared.models.segment_model import copy_model_folder
    from shared.plumbing.errors import BundleVerificationError
    from simulations.cohort import make_case

    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    model = copy_model_folder(bundle.nnunet_dir, tmp_path / "model")
    cases = [c for c in read_site(tiny_bundle.cohort_dir).cases if c.mask_path is not None][:8]
    stored = fit_harmonisation(cases, model)
    assert stored["measured_on"] == 8 and stored["development_noise_hu"] > 0

    seg = Segmenter(model, device="cpu")
    assert seg.harmonisation.development_noise_hu == pytest.approx(stored["development_noise_hu"])
    dev = make_case("charite-like", 0, 77, scale="ci").images()[0]
    assert seg.segment_case(dev).smoothing_mm == 0.0
    rng = np.random.default_rng(1)
    noisy = sitk.GetImageFromArray((sitk.GetArrayFromImage(dev) + rng.normal(0, 15, dev.GetSize()[::-1]))
                                   .astype(np.float32))
    noisy.CopyInformation(dev)
    assert seg.segment_case(noisy).smoothing_mm > 0

    def hashes() -> dict[str, str]:
        return {str(p.relative_to(model)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in model.rglob("*") if p.is_file()}

    unlisted = {rel: digest for rel, digest in hashes().items() if rel != FILE_NAME}
    with pytest.raises(BundleVerificationError, match=FILE_NAME):
        Segmenter(model, device="cpu", file_hashes=unlisted)
    verified = hashes()
    assert Segmenter(model, device="cpu", file_hashes=verified).harmonisation.active
    path = model / FILE_NAME
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), "development_noise_hu": 50.0}),
                    encoding="utf-8")
    with pytest.raises(BundleVerificationError, match=FILE_NAME):
        Segmenter(model, device="cpu", file_hashes=verified)
