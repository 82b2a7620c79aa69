"""What a bundle's head reads (shared.models.head_inputs): the embedding, or the embedding + lesion volumes."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from shared.models import head_inputs as module
from shared.models.head_inputs import EMBEDDING, HeadInputs
from shared.plumbing.errors import IchfedError


def test_docstring_example_holds():
    assert doctest.testmod(module).failed == 0


def test_the_papers_head_reads_the_embedding_unchanged():
    emb = np.random.default_rng(0).normal(size=(3, EMBEDDING)).astype(np.float32)
    inputs = HeadInputs()
    assert inputs.kind == "embedding" and inputs.to_dict() == {} and HeadInputs.from_dict({}) == inputs
    assert np.array_equal(inputs.features(emb), emb)


def test_hybrid_features_are_standardised_log_volumes_after_the_embedding():
    ich, phe = np.array([2.0, 6.0, 20.0, 40.0]), np.array([3.0, 12.0, 10.0, 90.0])
    inputs = HeadInputs.fit(ich, phe)
    x = inputs.features(np.zeros((4, EMBEDDING), np.float32), ich, phe)
    assert x.shape == (4, EMBEDDING + 3) and x.dtype == np.float32
    assert np.allclose(x[:, EMBEDDING:].mean(axis=0), 0, atol=1e-6) and np.allclose(x[:, EMBEDDING:].std(axis=0), 1, atol=1e-5)
    back = HeadInputs.from_dict(inputs.to_dict())
    assert back == inputs and np.array_equal(back.features(np.zeros((4, EMBEDDING)), ich, phe), x)


def test_a_hybrid_head_without_volumes_or_a_malformed_layout_is_refused():
    inputs = HeadInputs.fit([1.0, 2.0], [3.0, 5.0])
    with pytest.raises(IchfedError, match="reads the lesion volumes"):
        inputs.features(np.zeros((1, EMBEDDING)))
    with pytest.raises(IchfedError, match="embedding"):
        inputs.features(np.zeros((1, 100)), [1.0], [1.0])
    bad = {**inputs.to_dict(), "volume_scale": [1.0, -1.0, 1.0]}
    with pytest.raises(IchfedError, match="positive"):
        HeadInputs.from_dict(bad)
    with pytest.raises(IchfedError, match="hybrid"):
        HeadInputs.from_dict({**inputs.to_dict(), "volumes": ["age"]})
