"""The server side of cross-fitted federation: K+1 copies of the reference head to start, FedAvg of
every key with the update check and a norm bound on every head, and the run-config switch."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client.privacy import PrivacyViolation, build_reply, check_content
from server.settings import settings_from_run_config
from server.strategy import HeadStrategy
from server.updates import check_update
from shared.federation import protocol as P
from shared.models.head import Head, HeadSet
from shared.plumbing.errors import IchfedError


class _Nodes:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return self.ids


def _heads(seed, n_folds, scale=0.05):
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=(2, 512) if k.endswith("weight") else 2) * scale).astype(np.float32)
            for k in P.head_keys(n_folds)}


def _record(head):
    return ArrayRecord({k: Array(v) for k, v in head.items()})


def _train_round(strategy, g, updates):
    sent = strategy.configure_train(1, _record(g), ConfigRecord({P.CFG_BUNDLE_HASH: "a" * 64}), _Nodes(list(updates)))
    replies = [Message(RecordDict({P.HEAD: _record(h), **{k: v for k, v in build_reply(
        f"site-{n}", metrics={P.NUM_EXAMPLES: c, P.TRAIN_LOSS: 0.3, P.N_FINE_TUNE: c}).items()}}), reply_to=m)
        for m in sent for n, (h, c) in updates.items() if m.metadata.dst_node_id == n]
    return strategy.aggregate_train(1, replies)


def test_every_key_is_averaged_and_every_head_has_its_norm(flwr_task):
    g = _heads(0, 3)
    strategy = HeadStrategy(min_sites=2, max_site_share=1.0)
    updates = {1: (_heads(1, 3), 6), 2: (_heads(2, 3), 2)}
    arrays, _ = _train_round(strategy, g, updates)
    assert set(arrays.keys()) == set(P.head_keys(3))
    for key in P.head_keys(3):
        expected = (updates[1][0][key].astype(np.float64) * 6 + updates[2][0][key] * 2) / 8
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    rows = strategy.book.current.train
    assert [r.status for r in rows] == ["accepted", "accepted"] and all(r.update_norm < 10 for r in rows)
    assert all(r.update_norm_max >= r.update_norm for r in rows)


def test_a_huge_fold_head_is_rejected_not_averaged(flwr_task):
    """Issue 21 item 10. Reproduction: a liar's fold heads of 3e38 were averaged in (only the main
    head's norm was bounded), and every honest site's out-of-fold p became NaN."""
    g = _heads(0, 3)
    strategy = HeadStrategy(min_sites=2, max_site_share=1.0)
    liar = _heads(3, 3)
    liar["fold1.weight"] = np.full((2, 512), 3e38, np.float32)
    arrays, _ = _train_round(strategy, g, {1: (_heads(1, 3), 6), 2: (_heads(2, 3), 6), 3: (liar, 6)})
    rows = {r.node_id: r for r in strategy.book.current.train}
    assert rows[3].status == "rejected" and "'fold1.' head update norm" in rows[3].reason
    assert all(np.isfinite(arrays[k].numpy()).all() for k in arrays.keys())
    fold1 = Head.from_arrays({k: arrays[k].numpy() for k in arrays.keys()}, "fold1.")
    assert np.isfinite(fold1.p_neoplastic(np.ones((3, 512), np.float32))).all()


def test_update_check_wants_exactly_the_sent_heads():
    g = HeadSet.from_arrays(_heads(0, 2))
    assert check_update(_record(_heads(1, 2)), g, 100.0).reason is None
    assert "fold heads" in check_update(_record(_heads(1, 0)), g, 100.0).reason  # fold heads dropped
    assert "fold heads" in check_update(_record(_heads(1, 3)), g, 100.0).reason  # one too many
    bad = _heads(1, 2)
    bad["fold0.bias"] = np.full(2, np.nan, np.float32)
    assert "'fold0.bias' holds NaN" in check_update(_record(bad), g, 100.0).reason
    far = {k: v + (10.0 if k in P.HEAD_SHAPES else 0.0) for k, v in _heads(1, 2).items()}
    assert "main head update norm" in check_update(_record(far), g, 1.0).reason
    far_fold = {k: v + (10.0 if k.startswith("fold1.") else 0.0) for k, v in _heads(0, 2).items()}
    assert "'fold1.' head update norm" in check_update(_record(far_fold), g, 1.0).reason


def test_privacy_allow_list_takes_fold_heads_and_nothing_else():
    build_reply("a", head=HeadSet.from_arrays(_heads(0, 5)))
    for bad in ({**_heads(0, 1), "fold1.weight": np.zeros((2, 512), np.float32)},
                {**_heads(0, 1), "fold0.weight": np.zeros((3, 512), np.float32)},
                {**_heads(0, 0), "extra": np.zeros(2, np.float32)}):
        content = build_reply("a")
        content[P.HEAD] = _record(bad)
        with pytest.raises(PrivacyViolation):
            check_content(content)


def test_initial_record_and_run_config(tiny_bundle):
    from shared.bundle import load_bundle

    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    heads = HeadSet.replicate(Head.from_bundle(bundle), 4)
    assert tuple(heads.to_arrays()) == P.head_keys(4)
    for fold in heads.folds:
        assert fold.allclose(heads.main) and fold is not heads.main
    assert tuple(HeadSet.replicate(heads.main, 0).to_arrays()) == P.head_keys(0)

    base = {"bundle-path": "b", "public-key": "k", "state-dir": "s"}
    assert settings_from_run_config(base).cross_fit_folds == 5
    assert settings_from_run_config({**base, "cross-fit-folds": 0}).cross_fit_folds == 0
    for bad in (1, -1, P.MAX_CROSS_FIT_FOLDS + 1):
        with pytest.raises(IchfedError, match="cross-fit-folds"):
            settings_from_run_config({**base, "cross-fit-folds": bad})
