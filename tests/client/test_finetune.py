"""Last-layer fine-tuning on (synthetic) cached embeddings."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from client.finetune import train_head
from shared.models.head import Head


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
    auc_before = roc_auc_score(y, head.p_neoplastic(x))
    a = train_head(head, x, y, epochs=30, learning_rate=1e-2, batch_size=16, seed=3)
    b = train_head(head, x, y, epochs=30, learning_rate=1e-2, batch_size=16, seed=3)
    auc_after = roc_auc_score(y, a.head.p_neoplastic(x))
    assert auc_after > 0.95 > auc_before
    assert np.array_equal(a.head.weight, b.head.weight) and np.array_equal(a.head.bias, b.head.bias)
    assert a.head.weight.dtype == np.float32 and a.head.weight.shape == (2, 512)
    # the input head is not modified in place
    assert not np.array_equal(a.head.weight, head.weight)


def test_probabilities_match_a_log_softmax_linear_layer():
    import torch

    x, _ = _data(8)
    head = _random_head()
    layer = torch.nn.Linear(512, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(head.weight))
        layer.bias.copy_(torch.from_numpy(head.bias))
        expected = torch.log_softmax(layer(torch.from_numpy(x)), dim=1)[:, 1].exp().numpy()
    np.testing.assert_allclose(head.p_neoplastic(x), expected, rtol=1e-5)


def test_no_cases_leaves_the_head_unchanged():
    head = _random_head()
    out = train_head(head, np.zeros((0, 512), np.float32), np.zeros(0, np.int64), epochs=5,
                     learning_rate=1e-2, batch_size=4, seed=0)
    assert out.epochs == 0
    assert np.array_equal(out.head.weight, head.weight)


def _distance(a: Head, b: Head) -> float:
    return float(np.sqrt(((a.weight - b.weight) ** 2).sum() + ((a.bias - b.bias) ** 2).sum()))


def test_the_proximal_term_keeps_the_head_nearer_the_global_head():
    from client.finetune import HeadTrainResult

    x, y = _data(16, seed=4)
    start = _random_head(5)
    kw = dict(epochs=60, learning_rate=1e-2, batch_size=8, seed=1)
    plain = train_head(start, x, y, **kw)
    prox = train_head(start, x, y, proximal_mu=1.0, **kw)
    assert isinstance(prox, HeadTrainResult)
    assert _distance(prox.head, start) < 0.7 * _distance(plain.head, start)
    # it still learns: the regularised head separates its training cases better than the start
    assert roc_auc_score(y, prox.head.p_neoplastic(x)) > roc_auc_score(y, start.p_neoplastic(x))
    # mu = 0 is exactly the paper's plain fine-tuning
    zero = train_head(start, x, y, proximal_mu=0.0, **kw)
    assert np.array_equal(zero.head.weight, plain.head.weight)


def test_early_stopping_by_inner_folds_stops_before_overfitting_noise():
    from client.finetune import choose_epochs, local_update

    rng = np.random.default_rng(0)
    y = (np.arange(20) % 2).astype(np.int64)
    noise = rng.normal(size=(20, 512)).astype(np.float32)  # labels carry no signal: more epochs only overfit
    start = _random_head(2)
    kw = dict(learning_rate=5e-2, batch_size=8, seed=0)
    chosen = choose_epochs(start, noise, y, max_epochs=40, **kw)
    assert 1 <= chosen < 40
    out = local_update(start, noise, y, max_epochs=40, early_stopping=True, **kw)
    assert out.epochs == chosen
    # on a real signal the inner folds let it train longer than on noise
    x, ys = _data(20, seed=3)
    assert choose_epochs(start, x * 3, ys, max_epochs=40, **kw) > chosen
    # a class with one case cannot be validated: all epochs are run
    assert choose_epochs(start, noise[:6], np.array([1, 0, 0, 0, 0, 0]), max_epochs=40, **kw) == 40
