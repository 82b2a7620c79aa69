"""The head strategy on real Flower messages: weighting, update validation, per-site bookkeeping."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client.privacy import build_reply
from server.pooling import pool_model
from server.strategy import HeadStrategy
from server.updates import check_update
from shared.federation import protocol as P
from shared.models.head import HeadSet
from shared.plumbing.errors import IchfedError


class _Nodes:
    """Just enough of a Flower Grid for sampling: the connected node IDs."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return self.ids


def _head(seed, scale=0.05):
    rng = np.random.default_rng(seed)
    return {"weight": (rng.normal(size=(2, 512)) * scale).astype(np.float32),
            "bias": (rng.normal(size=2) * scale).astype(np.float32)}


def _record(head):
    return ArrayRecord({k: Array(v) for k, v in head.items()})


def _train_reply(instruction, name, head, n):
    content = RecordDict({P.HEAD: _record(head),
                          P.METRICS: build_reply(name, metrics={P.NUM_EXAMPLES: n, P.TRAIN_LOSS: 0.5})[P.METRICS],
                          P.INFO: build_reply(name)[P.INFO]})
    return Message(content, reply_to=instruction)


def _round(strategy, global_head, node_ids, round_=1):
    return list(strategy.configure_train(round_, _record(global_head), ConfigRecord({P.CFG_BUNDLE_HASH: "a" * 64}),
                                         _Nodes(node_ids)))


def test_fedavg_is_weighted_by_fine_tune_case_count(flwr_task):
    g = _head(0)
    strategy = HeadStrategy(min_sites=2)
    instructions = {m.metadata.dst_node_id: m for m in _round(strategy, g, [11, 12, 13])}
    assert set(instructions) == {11, 12, 13}
    assert all(m.content[P.CONFIG][P.CFG_ROUND] == 1 for m in instructions.values())
    updates = {11: (_head(1), 12), 12: (_head(2), 4), 13: (_head(3), 8)}
    replies = [_train_reply(instructions[n], f"site-{n}", h, k) for n, (h, k) in updates.items()]
    arrays, metrics = strategy.aggregate_train(1, replies)
    total = sum(k for _, k in updates.values())
    for key in ("weight", "bias"):
        expected = sum(h[key].astype(np.float64) * k for h, k in updates.values()) / total
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-7)
        assert arrays[key].numpy().dtype == np.float32
    assert metrics["n-fine-tune-total"] == total
    rows = strategy.book.current.train
    assert [r.status for r in rows] == ["accepted"] * 3 and rows[0].n_fine_tune == 12


def test_nan_update_is_rejected_by_name_and_the_round_goes_on(flwr_task, caplog):
    g = _head(0)
    strategy = HeadStrategy(min_sites=2, max_site_share=1.0)  # the weights here are 1:3, uncapped
    instructions = {m.metadata.dst_node_id: m for m in _round(strategy, g, [1, 2, 3])}
    bad = _head(9)
    bad["weight"][0, 5] = np.nan
    huge = {k: v * 1e6 for k, v in _head(8).items()}
    replies = [_train_reply(instructions[1], "good-a", _head(1), 5),
               _train_reply(instructions[2], "nan-site", bad, 5),
               _train_reply(instructions[3], "good-b", _head(2), 15)]
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert any("nan-site" in r.message and "NaN" in r.message for r in caplog.records)
    expected = (_head(1)["weight"] * 5 + _head(2)["weight"] * 15) / 20
    np.testing.assert_allclose(arrays["weight"].numpy(), expected, rtol=1e-5, atol=1e-7)

    # with two of three updates unusable the round stops, clearly
    strategy = HeadStrategy(min_sites=2)
    instructions = {m.metadata.dst_node_id: m for m in _round(strategy, g, [1, 2, 3], round_=2)}
    replies = [_train_reply(instructions[1], "good-a", _head(1), 5),
               _train_reply(instructions[2], "nan-site", bad, 5),
               _train_reply(instructions[3], "huge-site", huge, 5)]
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        with pytest.raises(IchfedError, match="round 2: only 1 of 3 site updates were usable"):
            strategy.aggregate_train(2, replies)
    assert any("huge-site" in r.message and "norm" in r.message for r in caplog.records)


def test_refusals_wrong_shapes_and_zero_counts_are_rejected(flwr_task):
    g = _head(0)
    strategy = HeadStrategy(min_sites=1)
    instructions = {m.metadata.dst_node_id: m for m in _round(strategy, g, [1, 2, 3, 4])}
    wrong = {"weight": np.zeros((3, 512), np.float32), "bias": np.zeros(3, np.float32)}
    refusal = Message(build_reply("refuser", P.STATUS_REFUSED, reason=P.REASON_BUNDLE_VERIFICATION),
                      reply_to=instructions[3])
    replies = [_train_reply(instructions[1], "ok-site", _head(1), 5),
               _train_reply(instructions[2], "shape-site", wrong, 5),
               refusal,
               _train_reply(instructions[4], "zero-site", _head(4), 0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["weight"].numpy(), _head(1)["weight"], rtol=1e-6)
    reasons = {r.site: r.reason or "" for r in strategy.book.current.train}
    assert "shape" in reasons["shape-site"] and "bundle-verification-failed" in reasons["refuser"]
    assert "num-examples" in reasons["zero-site"] and reasons["ok-site"] == ""


def test_ready_nodes_limit_sampling_and_round_offset(flwr_task):
    from server.rounds import RoundBook

    strategy = HeadStrategy(min_sites=1, ready_nodes=[2, 3], book=RoundBook(offset=4))
    msgs = _round(strategy, _head(0), [1, 2, 3])
    assert sorted(m.metadata.dst_node_id for m in msgs) == [2, 3]
    assert {m.content[P.CONFIG][P.CFG_ROUND] for m in msgs} == {5} and strategy.book.current.round == 5


def test_check_update_and_pooling():
    g = HeadSet.from_arrays(_head(0))
    checked = check_update(_record(_head(1)), g, 100.0)
    assert checked.reason is None and checked.norm == pytest.approx(checked.heads.main.distance(g.main))
    assert "exceeds" in check_update(_record({k: v + 10 for k, v in _head(0).items()}), g, 1.0).reason
    rows = [{"site": "a", "global": {"n": 10, "auc": 0.8, "tp": 3, "fp": 1, "tn": 5, "fn": 1, "withheld": 0}},
            {"site": "b", "global": {"n": 30, "auc": 0.6, "tp": 10, "fp": 5, "tn": 10, "fn": 5, "withheld": 0}},
            {"site": "c", "global": {"n": 3, "withheld": 1}}]
    pooled = pool_model(rows, "global")
    assert pooled["n_sites"] == 2 and pooled["n"] == 40
    assert pooled["mean_site_auc"] == pytest.approx((0.8 * 10 + 0.6 * 30) / 40)
    assert pooled["sensitivity"] == pytest.approx(13 / 19) and pooled["specificity"] == pytest.approx(15 / 21)
