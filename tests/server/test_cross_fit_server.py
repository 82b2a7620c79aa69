"""The server side of cross-fitted federation: K+1 copies of the reference head to start, FedAvg of
every key with the update check and norm on the main head, and the run-config switch."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client.privacy import PrivacyViolation, build_reply
from server.app import initial_heads
from server.settings import settings_from_run_config
from server.strategy import HeadFedAvg, check_update
from shared.federation import protocol as P
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


def test_every_key_is_averaged_and_only_the_main_head_counts_for_the_norm(flwr_task):
    g = _heads(0, 3)
    strategy = HeadFedAvg(min_sites=2)
    sent = strategy.configure_train(1, _record(g), ConfigRecord({P.CFG_BUNDLE_HASH: "a" * 64}), _Nodes([1, 2]))
    updates = {1: (_heads(1, 3), 6), 2: (_heads(2, 3), 2)}
    # a fold head far from the sent one: the norm limit is about the main head only
    updates[2][0]["fold1.weight"] = updates[2][0]["fold1.weight"] + 50.0
    replies = [Message(RecordDict({P.HEAD: _record(h), **{k: v for k, v in build_reply(
        f"site-{n}", metrics={P.NUM_EXAMPLES: c, P.TRAIN_LOSS: 0.3, P.N_FINE_TUNE: c}).items()}}), reply_to=m)
        for m in sent for n, (h, c) in updates.items() if m.metadata.dst_node_id == n]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert set(arrays.keys()) == set(P.head_keys(3))
    for key in P.head_keys(3):
        expected = (updates[1][0][key].astype(np.float64) * 6 + updates[2][0][key] * 2) / 8
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    rows = strategy._current["train"]["sites"]
    assert [r["status"] for r in rows] == ["accepted", "accepted"] and all(r["update_norm"] < 10 for r in rows)


def test_update_check_wants_exactly_the_sent_heads():
    g = _heads(0, 2)
    assert check_update(_heads(1, 2), g, 100.0) is None
    assert "are not" in check_update(_heads(1, 0), g, 100.0)  # fold heads dropped
    assert "are not" in check_update(_heads(1, 3), g, 100.0)  # one too many
    bad = _heads(1, 2)
    bad["fold0.bias"] = np.full(2, np.nan, np.float32)
    assert "NaN" in check_update(bad, g, 100.0)
    far = {k: v + (10.0 if k in P.HEAD_SHAPES else 0.0) for k, v in _heads(1, 2).items()}
    assert "exceeds" in check_update(far, g, 1.0)


def test_privacy_allow_list_takes_fold_heads_and_nothing_else():
    build_reply("a", head=_heads(0, 5))
    for bad in ({**_heads(0, 1), "fold1.weight": np.zeros((2, 512), np.float32)},
                {**_heads(0, 1), "fold0.weight": np.zeros((3, 512), np.float32)},
                {**_heads(0, 0), "extra": np.zeros(2, np.float32)}):
        with pytest.raises(PrivacyViolation):
            build_reply("a", head=bad)


def test_initial_record_and_run_config(tiny_bundle):
    from shared.bundle import load_bundle

    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    heads = initial_heads(bundle, 4)
    assert tuple(heads) == P.head_keys(4)
    for k in range(4):
        for key in P.HEAD_SHAPES:
            np.testing.assert_array_equal(heads[P.fold_prefix(k) + key], heads[key])
    assert tuple(initial_heads(bundle, 0)) == P.head_keys(0)

    base = {"bundle-path": "b", "public-key": "k", "state-dir": "s"}
    assert settings_from_run_config(base).cross_fit_folds == 5
    assert settings_from_run_config({**base, "cross-fit-folds": 0}).cross_fit_folds == 0
    for bad in (1, -1, P.MAX_CROSS_FIT_FOLDS + 1):
        with pytest.raises(IchfedError, match="cross-fit-folds"):
            settings_from_run_config({**base, "cross-fit-folds": bad})
