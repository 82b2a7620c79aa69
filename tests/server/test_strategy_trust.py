"""Issue #11 part 3: the server trusts a site no further than it must.

Every test plays a hostile site with real Flower messages against the real strategy: replies
are built here directly (not through the client's privacy layer), as an attacker would.
"""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.admission import MAX_CASES, SiteLedger, check_reply_metrics, share_capped
from server.distribution import distribute_bundle
from server.report import rounds_table_markdown
from server.robust import AggregationRule
from server.settings import settings_from_run_config
from server.strategy import HeadStrategy
from shared.federation import protocol as P
from shared.plumbing.errors import IchfedError
from tests.server.test_strategy import (  # one fake Grid and head maker for both files
    _head,
    _Nodes,
)

HASH = "a" * 64


def _arrays(head):
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in head.items()})


def _reply(instruction, name, *, head=None, metrics=None, status=P.STATUS_OK):
    content = RecordDict({P.INFO: ConfigRecord({P.INFO_SITE: name, P.INFO_STATUS: status})})
    if head is not None:
        content[P.HEAD] = _arrays(head)
    if metrics is not None:
        content[P.METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=instruction)


def _train(instruction, name, head, n, loss=0.5, n_fine_tune=None):
    metrics = {P.NUM_EXAMPLES: n, P.TRAIN_LOSS: loss}
    if n_fine_tune is not None:
        metrics[P.N_FINE_TUNE] = n_fine_tune
    return _reply(instruction, name, head=head, metrics=metrics)


def _instructions(strategy, nodes, round_=1, evaluate=False):
    cfg = ConfigRecord({P.CFG_BUNDLE_HASH: HASH})
    fn = strategy.configure_evaluate if evaluate else strategy.configure_train
    return {m.metadata.dst_node_id: m for m in fn(round_, _arrays(_head(0)), cfg, _Nodes(nodes))}


def _rows(strategy, part="train"):
    return {r.node_id: r.to_dict() for r in getattr(strategy.book.current, part)}


# -- claimed weights ---------------------------------------------------------------------------


def test_a_huge_claimed_count_no_longer_replaces_the_global_head(flwr_task):
    """Reproduction: num-examples 1e12 with a small update made the aggregate equal the attacker's head."""
    strategy = HeadStrategy(min_sites=2, max_site_share=0.75)
    ins = _instructions(strategy, [1, 2, 3])
    attacker = _head(7, scale=0.01)
    replies = [_train(ins[1], "site-a", _head(1), 10), _train(ins[2], "site-b", _head(2), 30),
               _train(ins[3], "evil", attacker, 1e12)]
    arrays, _ = strategy.aggregate_train(1, replies)
    agg = arrays["weight"].numpy()
    assert not np.allclose(agg, attacker["weight"], atol=1e-4)
    np.testing.assert_allclose(agg, (_head(1)["weight"] * 10 + _head(2)["weight"] * 30) / 40, rtol=1e-5, atol=1e-7)
    assert _rows(strategy)[3]["status"] == "rejected" and "integer case count" in _rows(strategy)[3]["reason"]


def test_overflowing_claims_are_rejected_not_a_crash(flwr_task, caplog):
    """Reproduction: two sites claiming 1.7e308 crashed aggregate_train with an OverflowError."""
    strategy = HeadStrategy(min_sites=2)
    ins = _instructions(strategy, [1, 2, 3, 4])
    replies = [_train(ins[1], "site-a", _head(1), 10), _train(ins[2], "site-b", _head(2), 10),
               _train(ins[3], "big-1", _head(3), 1.7e308), _train(ins[4], "big-2", _head(4), 1.7e308)]
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["bias"].numpy(), (_head(1)["bias"] + _head(2)["bias"]) / 2, rtol=1e-5)
    assert metrics["n-fine-tune-total"] == 20
    assert any("big-1 (node 3) rejected" in r.message for r in caplog.records)


def test_weight_is_capped_at_the_reported_fine_tune_count_and_counts_must_not_change(flwr_task):
    strategy = HeadStrategy(min_sites=1, max_site_share=1.0)
    ins = _instructions(strategy, [1, 2, 3])
    replies = [_train(ins[1], "site-a", _head(1), 50, n_fine_tune=10),  # claims more than it has
               _train(ins[2], "site-b", _head(2), 10, n_fine_tune=10),
               _train(ins[3], "frac", _head(3), 10.5)]  # not a whole number of cases
    arrays, _ = strategy.aggregate_train(1, replies)
    rows = _rows(strategy)
    assert rows[1]["weight"] == 10 and rows[1]["n_claimed"] == 50
    assert rows[3]["status"] == "rejected" and "10.5" in rows[3]["reason"]
    np.testing.assert_allclose(arrays["weight"].numpy(), (_head(1)["weight"] + _head(2)["weight"]) / 2, rtol=1e-5)

    # Round 2, same run: site-a now says 40 fine-tune cases; its earlier replies said 10.
    ins = _instructions(strategy, [1, 2], round_=2)
    strategy.aggregate_train(2, [_train(ins[1], "site-a", _head(5), 40, n_fine_tune=40),
                                 _train(ins[2], "site-b", _head(6), 10, n_fine_tune=10)])
    rows = _rows(strategy)
    assert rows[1]["status"] == "rejected" and "changed from 10 to 40" in rows[1]["reason"]
    assert rows[2]["status"] == "accepted"


def test_nan_training_loss_rejects_the_update(flwr_task):
    strategy = HeadStrategy(min_sites=1)
    ins = _instructions(strategy, [1, 2])
    arrays, _ = strategy.aggregate_train(1, [_train(ins[1], "site-a", _head(1), 10),
                                             _train(ins[2], "diverged", _head(2), 10, loss=float("nan"))])
    assert _rows(strategy)[2]["status"] == "rejected" and "train-loss" in _rows(strategy)[2]["reason"]
    np.testing.assert_allclose(arrays["weight"].numpy(), _head(1)["weight"], rtol=1e-6)


def test_share_cap_bounds_one_liar():
    capped = share_capped({1: 10, 2: 30, 3: MAX_CASES}, 0.5)
    assert capped[1] == 10 and capped[2] == 30 and capped[3] == 40  # at most half of the round
    assert share_capped({1: 10, 2: 30}, 0.75) == {1: 10, 2: 30}  # honest 3:1 sites keep their weights
    assert share_capped({1: 5}, 0.5) == {1: 5}


# -- one malicious site among five -------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean", "fedavg"])
def test_one_malicious_site_among_five_cannot_move_the_aggregate_beyond_the_bound(flwr_task, aggregation):
    """A huge head (norm 90, under a generous update limit) with the largest plausible case count.

    Stated bound: for median and trimmed mean (trim 0.2) the aggregate stays, coordinate-wise,
    within the honest sites' min/max; for FedAvg with max-site-share 0.5 it moves at most half
    the attacker's deviation from the honest weighted mean.
    """
    strategy = HeadStrategy(rule=AggregationRule(aggregation, trim_fraction=0.2, num_malicious=1), min_sites=3,
                            max_update_norm=100.0, max_site_share=0.5)
    ins = _instructions(strategy, [1, 2, 3, 4, 5])
    honest = {n: (_head(n), 10 + 5 * n) for n in (1, 2, 3, 4)}
    evil = {k: np.full_like(v, 90.0 / np.sqrt(1026)) for k, v in _head(0).items()}  # every coordinate pushed up
    replies = [_train(ins[n], f"site-{n}", h, k) for n, (h, k) in honest.items()]
    replies.append(_train(ins[5], "evil", evil, MAX_CASES))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert _rows(strategy)[5]["status"] == "accepted"  # it passes every check: only the rule can bound it
    for key in ("weight", "bias"):
        agg = arrays[key].numpy().astype(np.float64)
        stack = np.stack([h[key] for h, _ in honest.values()]).astype(np.float64)
        if aggregation == "fedavg":
            w = np.array([k for _, k in honest.values()], dtype=np.float64)
            mean = (stack * w[:, None] if stack.ndim == 2 else stack * w[:, None, None]).sum(0) / w.sum()
            assert np.all(np.abs(agg - mean) <= 0.5 * np.abs(evil[key] - mean) + 1e-6)
            assert not np.all(agg <= stack.max(0))  # FedAvg alone is not robust: it did move
        else:
            assert np.all(agg >= stack.min(0) - 1e-6) and np.all(agg <= stack.max(0) + 1e-6)


def test_unknown_aggregation_is_a_config_error():
    base = {"bundle-path": "/b", "public-key": "/k", "state-dir": "/s"}
    assert settings_from_run_config({**base, "aggregation": "median"}).aggregation == "median"
    with pytest.raises(IchfedError, match="'aggregation' must be one of fedavg, median, trimmed-mean"):
        settings_from_run_config({**base, "aggregation": "krum"})
    with pytest.raises(IchfedError, match="'max-site-share' must be in"):
        settings_from_run_config({**base, "max-site-share": 0})
    with pytest.raises(IchfedError, match="'trim-fraction' must be in"):
        settings_from_run_config({**base, "trim-fraction": 0.5})


# -- evaluate and final replies ----------------------------------------------------------------


def _good_eval(model=P.MODEL_GLOBAL):
    k = lambda m: P.metric_key(model, m)  # noqa: E731
    return {P.NUM_EXAMPLES: 10, P.N_FINE_TUNE: 12, P.N_HELD_OUT: 10, P.N_UNUSABLE: 0,
            k("n"): 10, k("n-pos"): 4, k("n-neg"): 6, k("n-no-lesion"): 0, k("withheld"): 0,
            k("auc"): 0.8, k("accuracy"): 0.7, k("sensitivity"): 0.75, k("specificity"): 0.6667, k("threshold"): 0.4,
            k("tp"): 3, k("fn"): 1, k("tn"): 4, k("fp"): 2, k("auc-var"): 0.01, k("auc-minus-reference"): -0.1,
            k(P.ROC_TPR): [0.5] * len(P.ROC_FPR_GRID), k(P.HIST_POS): [0] * 49 + [4], k(P.HIST_NEG): [6] + [0] * 49}


BAD_EVAL = {
    "auc above one": {"global.auc": 1.5},
    "negative count": {"global.tp": -1},
    "fractional count": {"global.fp": 2.5},
    "classes do not add up": {"global.n-pos": 5},
    "confusion does not add up": {"global.tp": 4},
    "n is not the held-out count": {P.N_HELD_OUT: 11, P.NUM_EXAMPLES: 11},
    "NaN in an unknown key": {"global.future-metric": float("nan")},
    "negative variance": {"global.auc-var": -0.1},
    "difference beyond one": {"global.auc-minus-reference": 1.5},
    "histogram with a negative bin": {"global.hist-pos": [-1] + [0] * 48 + [5]},
    "histogram larger than its class": {"global.hist-neg": [60] + [0] * 49},
    "roc above one": {"global.roc-tpr": [2.0] * len(P.ROC_FPR_GRID)},
    "a list where one value belongs": {"global.auc": [0.5, 5.0]},
    "NaN inside an unknown list": {"global.future-list": [0.1, float("nan")]},
}


def test_range_check_rules():
    assert check_reply_metrics(_good_eval()) is None
    for what, change in BAD_EVAL.items():
        assert check_reply_metrics({**_good_eval(), **change}) is not None, what


def test_impossible_evaluate_replies_are_dropped_and_logged_with_the_node(flwr_task, caplog):
    strategy = HeadStrategy(min_sites=1)
    ins = _instructions(strategy, [1, 2, 3], evaluate=True)
    replies = [_reply(ins[1], "site-a", metrics=_good_eval()),
               _reply(ins[2], "liar", metrics={**_good_eval(), "global.auc": 1.5}),
               _reply(ins[3], "site-a", metrics=_good_eval())]  # a second node claiming site-a's name
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        strategy.aggregate_evaluate(1, replies)
    rows = _rows(strategy, "evaluate")
    assert rows[1]["status"] == "ok" and rows[1][P.MODEL_GLOBAL]["auc"] == 0.8
    assert rows[2]["status"] == "rejected" and "outside [0, 1]" in rows[2]["reason"]
    assert rows[3]["status"] == "rejected" and "already held by node 1" in rows[3]["reason"]
    assert strategy.book.current.pooled.n_sites == 1
    assert any("liar (node 2)" in r.message and "dropped" in r.message for r in caplog.records)


# -- names: one per authenticated node ----------------------------------------------------------


class _BundleGrid(_Nodes):
    """A Grid whose sites answer query.bundle "have" under the given names."""

    def __init__(self, names):
        super().__init__(names)
        self.names = names

    def send_and_receive(self, messages, timeout=None):
        return [_reply(m, self.names[m.metadata.dst_node_id], status=P.STATUS_HAVE) for m in messages]


def test_a_second_node_claiming_a_taken_name_is_refused_for_the_run(flwr_task, caplog):
    grid = _BundleGrid({11: "site-a", 12: "site-b", 13: "site-a"})
    settings = types.SimpleNamespace(min_sites=2, wait_for_sites_s=1.0, round_timeout_s=5.0)
    ledger = SiteLedger()
    with caplog.at_level(logging.WARNING, logger="server.app"):
        ready, summary = distribute_bundle(grid, types.SimpleNamespace(hash=HASH), settings, ledger)
    assert ready == {11: "site-a", 12: "site-b"}
    assert summary.to_dict()["refused"] == ["site-a (node 13)"]
    assert any("site-a (node 13) refused" in r.message and "already held by node 11" in r.message
               for r in caplog.records)
    # The same ledger in the rounds: node 13 is still refused, and node 11 cannot rename itself.
    assert ledger.claim_name(13, "site-a") and ledger.claim_name(11, "site-c")


def test_report_names_sites_by_node_and_lists_the_missing_one(flwr_task):
    strategy = HeadStrategy(min_sites=1, ready_nodes=[1, 2])
    strategy.ledger.claim_name(1, "site-a"), strategy.ledger.claim_name(2, "site-b")
    ins = _instructions(strategy, [1, 2])
    strategy.aggregate_train(1, [_train(ins[1], "site-a", _head(1), 10)])  # node 2 died mid-round
    ins = _instructions(strategy, [1], evaluate=True)
    strategy.aggregate_evaluate(1, [_reply(ins[1], "site-a", metrics=_good_eval())])
    assert _rows(strategy)[2]["status"] == "missing" and _rows(strategy, "evaluate")[2]["status"] == "missing"
    table = rounds_table_markdown({"rounds": [r.to_dict() for r in strategy.book.rounds]})
    assert "| 1 | site-a (node 1) | accepted |" in table
    assert "| 1 | site-b (node 2) | missing (no reply) |" in table
