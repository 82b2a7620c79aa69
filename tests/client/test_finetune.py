"""Last-layer fine-tuning on (synthetic) cached embeddings."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from client.finetune import Head, p_neoplastic, train_head


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    direction = rng.normal(size=512).astype(np.float32)
    x = rng.normal(size=(n, 512)).astype(np.float32) + np.outer(y * 2 - 1, direction) * 0.3
    return x.astype(np.float32), y


def _random_head(seed=1):
    rng = np.random.default_rng(seed)
    return Head(weight=(rng.normal(size=(2, 512)) * 0.01).astype(np.float32), bias=np.zeros(2, np.float32))


def test_training_the_head_learns_the_signal_and_is_deterministic():
    x, y = _data()
    head = _random_head()
    auc_before = roc_auc_score(y, p_neoplastic(head, x))
    a = train_head(head, x, y, epochs=30, learning_rate=1e-2, batch_size=16, seed=3)
    b = train_head(head, x, y, epochs=30, learning_rate=1e-2, batch_size=16, seed=3)
    auc_after = roc_auc_score(y, p_neoplastic(a.head, x))
    assert auc_after > 0.95 > auc_before
    assert np.array_equal(a.head.weight, b.head.weight) and np.array_equal(a.head.bias, b.head.bias)
    assert a.head.weight.dtype == np.float32 and a.head.weight.shape == (2, 512)
    # the input head is not modified in place
    assert not np.array_equal(a.head.weight, head.weight)


def test_probabilities_match_a_log_softmax_linear_layer():
    import torch

    from shared.classifier import log_probs

    x, _ = _data(8)
    head = _random_head()
    layer = torch.nn.Linear(512, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(head.weight))
        layer.bias.copy_(torch.from_numpy(head.bias))
        expected = log_probs(layer, x)[:, 1].exp().numpy()
    np.testing.assert_allclose(p_neoplastic(head, x), expected, rtol=1e-5)


def test_no_cases_leaves_the_head_unchanged():
    head = _random_head()
    out = train_head(head, np.zeros((0, 512), np.float32), np.zeros(0, np.int64), epochs=5,
                     learning_rate=1e-2, batch_size=4, seed=0)
    assert out.epochs == 0
    assert np.array_equal(out.head.weight, head.weight)
