"""Bootstrap's hybrid head (issue 19): a stack of the CNN's logit and the lesion volumes, folded into one layer."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from server.bootstrap_head import fit_hybrid_head, stacking_split
from shared.models.head import Head


def _data(n: int, seed: int, cnn_signal: float = 0.0):
    """Embeddings whose first column carries ``cnn_signal`` of the class, and volume features that carry it too."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    emb = rng.normal(size=(n, 512))
    emb[:, 0] += cnn_signal * y
    vol = np.stack([rng.normal(0, 1, n), rng.normal(y * 1.2, 1.0), rng.normal(y * 1.0, 1.0)], axis=1)
    return np.hstack([emb, vol]).astype(np.float32), y


def _cnn(weight_on_first: float = 1.0, seed: int = 9) -> Head:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, size=(2, 512))
    w[1, 0] += weight_on_first
    return Head(weight=w.astype(np.float32), bias=np.zeros(2, np.float32))


def _volume_baseline_auc(x_st, y_st, x_te, y_te) -> float:
    from sklearn.linear_model import LogisticRegression

    return roc_auc_score(y_te, LogisticRegression().fit(x_st[:, 512:], y_st).predict_proba(x_te[:, 512:])[:, 1])


def test_a_useless_cnn_leaves_the_volumes_in_charge():
    """Noise embeddings: the stacked head is as good as a volume regression on the same cases (a single
    515-input regression on these data reached only 0.67, overfitting the 512 noise weights)."""
    x_st, y_st = _data(120, 0)
    x_va, y_va = _data(100, 1)
    x_te, y_te = _data(600, 2)
    head, fit = fit_hybrid_head(_cnn(), x_st, y_st, x_va, y_va)
    assert head.weight.shape == (2, 515) and head.bias.shape == (2,)
    auc = roc_auc_score(y_te, head.p_neoplastic(x_te))
    volume_only = _volume_baseline_auc(x_st, y_st, x_te, y_te)
    assert auc > volume_only - 0.01, (auc, volume_only)
    assert fit["volume_weights"][1] > 0 and fit["volume_weights"][2] > 0
    assert min(fit["validation_log_loss"].values()) == fit["validation_log_loss"][fit["C"]]


def test_a_useful_cnn_adds_to_the_volumes():
    x_st, y_st = _data(150, 3, cnn_signal=1.5)
    x_va, y_va = _data(100, 4, cnn_signal=1.5)
    x_te, y_te = _data(600, 5, cnn_signal=1.5)
    head, fit = fit_hybrid_head(_cnn(), x_st, y_st, x_va, y_va)
    auc = roc_auc_score(y_te, head.p_neoplastic(x_te))
    volume_only = _volume_baseline_auc(x_st, y_st, x_te, y_te)
    assert fit["cnn_logit_weight"] > 0 and auc > volume_only + 0.03, (auc, volume_only)


def test_the_folded_head_gives_the_stacked_regressions_probabilities():
    from sklearn.linear_model import LogisticRegression

    x_st, y_st = _data(150, 6, cnn_signal=1.0)
    x_va, y_va = _data(80, 7, cnn_signal=1.0)
    cnn = _cnn()
    head, fit = fit_hybrid_head(cnn, x_st, y_st, x_va, y_va)
    w, b = cnn.weight[1] - cnn.weight[0], cnn.bias[1] - cnn.bias[0]

    def z(x):
        return np.column_stack([x[:, :512] @ w + b, x[:, 512:]])

    mu, sd = z(x_st).mean(axis=0), z(x_st).std(axis=0)
    lr = LogisticRegression(C=fit["C"], max_iter=5000).fit((z(x_st) - mu) / sd, y_st)
    assert head.p_neoplastic(x_va) == pytest.approx(lr.predict_proba((z(x_va) - mu) / sd)[:, 1], abs=1e-4)


def test_stacking_split_is_stratified_disjoint_and_seeded():
    y = np.array([0] * 60 + [1] * 40)
    cnn, stack = stacking_split(y, 0.2, seed=0)
    assert len(stack) == 20 and set(cnn).isdisjoint(stack) and len(cnn) + len(stack) == 100
    assert y[stack].sum() == 8  # 40 % of the stacking part is neoplastic, as in the whole
    assert np.array_equal(stacking_split(y, 0.2, seed=0)[1], stack)
