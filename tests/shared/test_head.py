"""The one head type: conversions round-trip exactly, and its scorer is the model's own."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.federation import protocol as P
from shared.models.head import Head
from shared.plumbing.errors import IchfedError


def _head(seed=0) -> Head:
    rng = np.random.default_rng(seed)
    return Head(weight=rng.normal(size=(2, 512)).astype(np.float32), bias=rng.normal(size=2).astype(np.float32))


def _same(a: Head, b: Head) -> None:
    assert a.weight.dtype == b.weight.dtype == np.float32
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)


def test_every_conversion_round_trips_bit_exactly():
    h = _head()
    _same(Head.from_linear(h.to_linear("cpu")), h)
    _same(Head.from_state_dict(h.to_state_dict()), h)
    _same(Head.from_arrays(h.to_arrays()), h)
    _same(Head.from_record(h.to_record()), h)
    assert set(h.to_arrays()) == set(P.HEAD_SHAPES)
    assert set(h.to_state_dict()) == {"fc.weight", "fc.bias"}


def test_prefixed_heads_share_one_record_and_are_read_apart():
    from flwr.app import ArrayRecord

    heads = {f"fold{k}.": _head(k) for k in range(3)}
    plain = _head(9)
    record = ArrayRecord({**{k: v for p, h in heads.items() for k, v in h.to_record(p).items()},
                          **dict(plain.to_record().items())})
    assert len(record) == 8
    for p, h in heads.items():
        _same(Head.from_record(record, prefix=p), h)
    _same(Head.from_record(record), plain)  # prefix "" ignores the fold heads
    with pytest.raises(IchfedError, match="fold7"):
        Head.from_record(record, prefix="fold7.")


def test_from_arrays_accepts_flower_arrays_and_copies():
    from flwr.app import Array

    h = _head()
    arrays = {P.HEAD_WEIGHT: Array(h.weight), P.HEAD_BIAS: Array(h.bias)}
    _same(Head.from_arrays(arrays), h)
    source = h.to_arrays()
    got = Head.from_arrays(source)
    source[P.HEAD_WEIGHT][0, 0] += 1.0
    assert got.weight[0, 0] == h.weight[0, 0]


def test_bad_shapes_and_missing_keys_are_named():
    with pytest.raises(IchfedError, match="weight"):
        Head(weight=np.zeros((3, 512)), bias=np.zeros(2))
    with pytest.raises(IchfedError, match="bias"):
        Head(weight=np.zeros((2, 512)), bias=np.zeros(3))
    with pytest.raises(IchfedError, match="bias"):
        Head.from_arrays({P.HEAD_WEIGHT: np.zeros((2, 512))})
    with pytest.raises(IchfedError, match="fc.bias"):
        Head.from_state_dict({"fc.weight": np.zeros((2, 512))})
    with pytest.raises(IchfedError, match="features"):
        _head().log_probs(np.zeros((4, 10)))


def test_scorer_is_the_linear_layer_plus_log_softmax():
    import torch

    h = _head()
    x = np.random.default_rng(1).normal(size=(7, 512)).astype(np.float32)
    with torch.no_grad():
        expected = torch.log_softmax(h.to_linear()(torch.from_numpy(x)), dim=1).double().numpy()
    lp = h.log_probs(x)
    assert lp.shape == (7, 2) and lp.dtype == np.float64
    np.testing.assert_array_equal(lp, expected)
    np.testing.assert_array_equal(h.log_probs(torch.from_numpy(x)), expected)
    p = h.p_neoplastic(x)
    assert p.dtype == np.float64 and p.shape == (7,)
    np.testing.assert_allclose(p, np.exp(expected[:, 1]), rtol=0, atol=0)
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0, atol=1e-6)
    assert h.p_neoplastic(np.zeros((0, 512))).shape == (0,)


def test_scores_match_the_full_model_forward():
    import torch

    from shared.models.classifier import backbone_and_head, build_model

    torch.manual_seed(0)
    model = build_model().eval()
    backbone, fc = backbone_and_head(model)
    x = torch.randn(2, 1, 16, 24, 24)
    with torch.no_grad():
        full = torch.log_softmax(model(x), dim=1).double().numpy()
        feats = backbone(x)
    np.testing.assert_allclose(Head.from_linear(fc).log_probs(feats), full, atol=1e-6)


def test_norm_and_distance():
    w = np.zeros((2, 512), np.float32)
    w[0, 0], w[1, 3] = 3.0, 4.0
    a = Head(weight=w, bias=np.array([0.0, 12.0], np.float32))
    zero = Head(weight=np.zeros((2, 512)), bias=np.zeros(2))
    assert a.norm() == pytest.approx(13.0)
    assert a.distance(zero) == pytest.approx(13.0) and zero.distance(a) == pytest.approx(13.0)
    assert a.distance(a) == 0.0
    b = Head(weight=w, bias=np.array([1.0, 12.0], np.float32))
    assert a.distance(b) == pytest.approx(1.0)
    assert a.allclose(a.copy()) and not a.allclose(b)
    assert math.isnan(Head(weight=w * np.nan, bias=np.zeros(2)).norm())


def test_bundle_head_scores_as_the_bundle_model(tiny_bundle):
    """The reference head read from a bundle file scores features exactly as the bundle's model."""
    import torch

    from shared.bundle import load_bundle
    from shared.models.classifier import (
        as_batch_tensor,
        backbone_and_head,
        embed,
        model_log_probs,
    )

    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    head = Head.from_bundle(bundle)
    model = bundle.build_classifier("cpu")
    backbone, fc = backbone_and_head(model)
    _same(head, Head.from_linear(fc))
    crops = np.zeros((3, 20, 24, 24), np.float32)
    crops[:, 5:15, 6:18, 6:18] = np.random.default_rng(2).uniform(0.2, 0.9, size=(3, 10, 12, 12))
    feats = bundle.head_inputs.features(embed(backbone, crops, "cpu"), [4.0, 8.0, 16.0], [2.0, 20.0, 30.0])
    with torch.no_grad():
        if bundle.head_inputs.kind == "embedding":  # the whole network end to end
            full = model_log_probs(model, as_batch_tensor(crops, "cpu")).double().numpy()
        else:  # a hybrid head reads the volumes beside the embedding: the network's own fc on those rows
            full = torch.log_softmax(fc(torch.from_numpy(feats)), dim=1).double().numpy()
    np.testing.assert_allclose(head.log_probs(feats), full, atol=1e-6)
