"""A site's own BatchNorm statistics (AdaBN/FedBN): estimated on its crops, changing its embeddings,
stored as safetensors, validated before use, and applied by the Predictor."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from shared.models import batchnorm_stats as B
from shared.plumbing.errors import IchfedError


@pytest.fixture(scope="module")
def backbone():
    import torch

    from shared.models.classifier import backbone_and_head, build_model

    torch.manual_seed(0)
    bb, _ = backbone_and_head(build_model().eval())
    return bb


def _crops(n, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 20, 24, 24)).astype(np.float32)
    x[:, :, :6] = 0.0  # crops are zero outside the lesion
    return x * (1.0 + shift) + shift


def test_site_statistics_change_the_embeddings_and_only_through_batchnorm(backbone):
    from shared.models.classifier import embed

    site = _crops(10, shift=0.5, seed=1)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    stats = B.estimate(backbone, site, "cpu", batch_size=4)
    # estimating leaves the bundle's backbone untouched
    assert all(np.array_equal(before[k].numpy(), v.numpy()) for k, v in backbone.state_dict().items())
    assert stats.n_cases == 10 and len(stats.tensors) == 2 * len(B.batchnorm_layers(backbone))
    adapted = copy.deepcopy(backbone)
    B.apply(adapted, stats)
    f_ref, f_site = embed(backbone, site, "cpu"), embed(adapted, site, "cpu")
    assert np.abs(f_site - f_ref).mean() > 0.05 * np.abs(f_ref).mean()
    # only running statistics differ: every weight is the bundle's
    for k, v in adapted.state_dict().items():
        if "running_" not in k and "num_batches" not in k:
            assert np.array_equal(v.numpy(), before[k].numpy()), k
    # the first layer's statistics are those of the site's inputs to it
    import torch

    with torch.no_grad():
        z = backbone.conv1(torch.from_numpy(site).unsqueeze(1))
    np.testing.assert_allclose(stats.tensors["bn1.running_mean"], z.mean(dim=(0, 2, 3, 4)).numpy(), rtol=1e-3, atol=5e-4)


def test_a_lone_last_crop_is_folded_into_the_previous_batch_and_one_crop_changes_nothing(backbone):
    a = B.estimate(backbone, _crops(5, seed=2), "cpu", batch_size=4)
    assert a.n_cases == 5
    one = B.estimate(backbone, _crops(1, seed=2), "cpu")
    assert all(np.array_equal(v, B.extract(backbone)[k]) for k, v in one.tensors.items())


def test_stats_roundtrip_and_validation(backbone, tmp_path):
    stats = B.estimate(backbone, _crops(6, seed=3), "cpu")
    path = tmp_path / "s.safetensors"
    digest = B.save(stats, path)
    assert (path.stat().st_mode & 0o077) == 0  # derived from patients' images: owner-only
    back = B.load(path, digest)
    assert back.n_cases == 6 and back.sha256() == stats.sha256()
    with pytest.raises(IchfedError, match="sha256"):
        B.load(path, "0" * 64)
    path.write_bytes(b"\x80\x04pickle")
    import hashlib

    with pytest.raises(IchfedError, match="not a valid safetensors"):
        B.load(path, hashlib.sha256(path.read_bytes()).hexdigest())
    bad = dict(stats.tensors)
    key = next(k for k in bad if k.endswith("running_var"))
    for value, match in ((-np.abs(bad[key]), "variance <= 0"), (bad[key] * np.nan, "non-finite"),
                         (bad[key][:3], "shape")):
        with pytest.raises(IchfedError, match=match):
            B.apply(copy.deepcopy(backbone), B.NormStats({**bad, key: value}, 6))
    with pytest.raises(IchfedError, match="do not fit"):
        B.apply(copy.deepcopy(backbone), B.NormStats({k: v for k, v in bad.items() if k != key}, 6))


def test_predictor_applies_site_statistics_and_calibration(tiny_bundle, tmp_path):
    """``Predictor(norm_stats=..., calibration=...)`` embeds with the site's statistics and reports
    the calibrated probability; without them it is the bundle's model."""
    from shared.bundle import load_bundle
    from shared.evaluation.calibration import Calibration
    from shared.pipeline import Predictor
    from simulations.cohort import make_case, write_nifti

    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    plain = Predictor(bundle, device="cpu")
    spec = bundle.crop_spec
    crops = _crops(6, shift=0.3, seed=4)[:, : spec.size_xyz[2], : spec.size_xyz[1], : spec.size_xyz[0]]
    crops = np.pad(crops, [(0, 0)] + [(0, s - c) for s, c in zip(spec.size_xyz[::-1], crops.shape[1:])])
    stats = B.estimate(plain.backbone, crops, "cpu")
    cal = Calibration(kind="platt", slope=0.5, intercept=0.2, n_pos=5, n_neg=5).to_dict()
    site = Predictor(bundle, device="cpu", norm_stats=stats, calibration=cal)
    assert not np.allclose(plain.embed(crops), site.embed(crops))
    case = make_case("charite-like", 103, 0, scale="ci")
    write_nifti(case.images()[0], tmp_path / "case.nii.gz")
    a, b = plain.predict(tmp_path / "case.nii.gz").to_dict(), site.predict(tmp_path / "case.nii.gz").to_dict()
    assert (a["norm_stats_source"], b["norm_stats_source"]) == ("bundle", "site")
    assert b["calibration_source"] == "site"
    assert b["lesion_found"]  # a large unseen bleed (tests/shared/test_pipeline.py)
    assert b["p_calibrated"] == pytest.approx(float(Calibration.from_dict(cal)(b["p_neoplastic"])), abs=1e-5)
    assert a["p_neoplastic"] != b["p_neoplastic"]
    with pytest.raises(IchfedError, match="site overlay norm_stats"):
        Predictor(bundle, device="cpu", norm_stats=B.NormStats({"bn1.running_mean": np.zeros(3, np.float32)}, 1))
