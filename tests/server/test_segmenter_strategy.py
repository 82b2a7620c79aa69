"""Issue 24: the server admits segmenter updates with the head strategy's machinery.

Real Flower messages against the real ``SegmenterStrategy``: honest updates built by the site's own
``build_reply``, hostile ones built around it (what a modified site could send). Non-finite, wrong-shape,
wrong-key, oversized and replayed updates are refused with the site named; the rest are aggregated by
Flower's FedAvg (share-capped weights) or FedMedian.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from client.privacy import build_reply
from server.admission import SiteLedger
from server.robust import AggregationRule
from server.segmenter_strategy import SegmenterStrategy
from shared.federation import protocol as P
from shared.models.segment_weights import SegmenterWeights

NAMES = {1: "site-a", 2: "site-b", 3: "site-c", 4: "site-d"}


def _sent() -> SegmenterWeights:
    rng = np.random.default_rng(0)
    return SegmenterWeights({"decoder.seg_layers.0.weight": rng.normal(size=(3, 8, 1, 1, 1)).astype(np.float32),
                             "decoder.seg_layers.0.bias": np.zeros(3, np.float32),
                             "decoder.stages.0.convs.0.conv.weight": rng.normal(size=(8, 8, 3, 3, 3)).astype(np.float32)})


def _moved(w: SegmenterWeights, seed: int, scale: float = 0.01) -> SegmenterWeights:
    rng = np.random.default_rng(seed)
    return SegmenterWeights({k: (a + rng.normal(0, scale, a.shape)).astype(np.float32) for k, a in w.arrays.items()})


def _strategy(rule=None, max_site_share=1.0, nodes=NAMES, min_sites=2):
    return SegmenterStrategy(rule=rule or AggregationRule(), nodes=nodes, config={P.CFG_SEG_TRAINABLE: "decoder"},
                             min_sites=min_sites, max_update_norm=5.0, max_site_share=max_site_share,
                             ledger=SiteLedger())


def _reply(instruction, name, weights: SegmenterWeights, n=12, raw=None):
    metrics = {P.NUM_EXAMPLES: n, P.N_MASKED_FINE_TUNE: n, P.TRAIN_LOSS: -0.3, P.TRAIN_DICE: 0.6}
    content = build_reply(name, segmenter=weights, metrics=metrics)
    if raw is not None:  # a site that builds its reply around the allow-list
        content[P.SEGMENTER] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in raw.items()})
    return Message(content, reply_to=instruction)


def _round(strategy, r, sent, answers):
    ins = {m.metadata.dst_node_id: m for m in strategy.configure_train(r, sent.to_record(), ConfigRecord(), None)}
    replies = [answer(ins[node], strategy.nodes[node]) for node, answer in answers.items()]
    arrays, metrics = strategy.aggregate_train(r, replies)
    return SegmenterWeights.from_record(arrays), {row.node_id: row for row in strategy.rounds[-1].train}


def test_instructions_are_segmenter_rounds(flwr_task):
    msgs = _strategy().configure_train(1, _sent().to_record(), ConfigRecord({P.CFG_BUNDLE_HASH: "a" * 64}), None)
    assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(NAMES)
    assert {m.metadata.message_type for m in msgs} == {P.TRAIN_SEGMENTER}
    cfg = msgs[0].content[P.CONFIG]
    assert cfg[P.CFG_ROUND] == 1 and cfg[P.CFG_SEG_TRAINABLE] == "decoder" and cfg[P.CFG_BUNDLE_HASH] == "a" * 64


def test_non_finite_wrong_shape_and_oversized_updates_are_refused(flwr_task, caplog):
    sent = _sent()
    a, b = _moved(sent, 1), _moved(sent, 2, scale=0.02)
    key = "decoder.seg_layers.0.weight"
    nan = {**a.arrays, key: np.full_like(a.arrays[key], np.nan)}
    wide = {**a.arrays, key: np.zeros((3, 9, 1, 1, 1), np.float32)}
    extra = {**a.arrays, "decoder.extra.weight": np.zeros(2, np.float32)}
    far = {k: v + np.float32(1.0) for k, v in a.arrays.items()}  # finite, right shapes, norm far above 5
    strategy = _strategy(max_site_share=1.0, nodes={**NAMES, 5: "site-e", 6: "site-f"})
    agg, rows = _round(strategy, 1, sent, {
        1: lambda m, n: _reply(m, n, a, n=10), 2: lambda m, n: _reply(m, n, b, n=30),
        3: lambda m, n: _reply(m, n, a, raw=nan), 4: lambda m, n: _reply(m, n, a, raw=wide),
        5: lambda m, n: _reply(m, n, a, raw=extra), 6: lambda m, n: _reply(m, n, a, raw=far)})
    assert rows[1].status == rows[2].status == "accepted"
    assert "NaN or infinite" in rows[3].reason and "has shape" in rows[4].reason
    assert "differ from those sent" in rows[5].reason and "update norm" in rows[6].reason
    assert all(f"site-{c}" in caplog.text for c in "cdef")
    # the aggregate is the case-weighted mean of the two accepted updates, every tensor
    for k in sent.arrays:
        expected = (10 * a.arrays[k].astype(np.float64) + 30 * b.arrays[k]) / 40
        np.testing.assert_allclose(agg.arrays[k], expected, rtol=1e-5, atol=1e-6)
    assert rows[1].train_dice == pytest.approx(0.6) and rows[1].update_norm == pytest.approx(a.distance(sent))


def test_replays_are_refused_and_counts_cannot_change(flwr_task):
    sent = _sent()
    strategy = _strategy(nodes={1: "site-a", 2: "site-b", 3: "site-c"}, min_sites=1)
    a1, b1 = _moved(sent, 1), _moved(sent, 2)
    agg1, rows1 = _round(strategy, 1, sent, {1: lambda m, n: _reply(m, n, a1), 2: lambda m, n: _reply(m, n, b1),
                                             3: lambda m, n: _reply(m, n, sent)})
    assert rows1[3].status == "accepted" and any("zero-change" in f for f in rows1[3].flags)
    agg2, rows2 = _round(strategy, 2, agg1, {1: lambda m, n: _reply(m, n, a1),  # its own round-1 update again
                                             2: lambda m, n: _reply(m, n, _moved(agg1, 5), n=20),  # 12 before
                                             3: lambda m, n: _reply(m, n, _moved(agg1, 6))})
    assert rows2[1].status == "rejected" and "replays" in rows2[1].reason
    assert rows2[2].status == "rejected" and "changed from 12 to 20" in rows2[2].reason
    assert rows2[3].status == "accepted"


def test_median_holds_against_one_liar_within_the_norm_limit(flwr_task):
    sent = _sent()
    honest = [_moved(sent, s) for s in (1, 2, 3)]
    liar = SegmenterWeights({k: v + np.float32(0.1) for k, v in sent.arrays.items()})  # within the norm limit
    assert liar.distance(sent) < 5.0
    strategy = _strategy(rule=AggregationRule("median", num_malicious=1))
    agg, rows = _round(strategy, 1, sent, {1: lambda m, n: _reply(m, n, honest[0]), 2: lambda m, n: _reply(m, n, honest[1]),
                                           3: lambda m, n: _reply(m, n, honest[2]), 4: lambda m, n: _reply(m, n, liar, n=500)})
    assert all(r.status == "accepted" for r in rows.values())
    for k in sent.arrays:
        lo = np.min([h.arrays[k] for h in honest], axis=0)
        hi = np.max([h.arrays[k] for h in honest], axis=0)
        assert np.all(agg.arrays[k] >= lo - 1e-6) and np.all(agg.arrays[k] <= hi + 1e-6)


def test_too_few_usable_updates_stop_the_round(flwr_task):
    from shared.plumbing.errors import IchfedError

    sent = _sent()
    bad = {k: np.full_like(v, np.inf) for k, v in sent.arrays.items()}
    strategy = _strategy(nodes={1: "site-a", 2: "site-b"})
    with pytest.raises(IchfedError, match="only 1 of 2 site updates were usable"):
        _round(strategy, 1, sent, {1: lambda m, n: _reply(m, n, _moved(sent, 1)),
                                   2: lambda m, n: _reply(m, n, sent, raw=bad)})


def test_settings_and_the_phase_record(flwr_task, tmp_path):
    """Run config keys of segmenter rounds, checked one line each; the phase record reads back as written
    (a resumed run) and renders the segmentation table."""
    from server.records import MetricsRow, SegmenterPhase
    from server.report_segmenter import segmenter_lines
    from server.settings import ServerSettings, settings_from_run_config
    from shared.plumbing.errors import IchfedError

    base = {"bundle-path": "b", "public-key": "k", "state-dir": str(tmp_path)}
    with pytest.raises(IchfedError, match="'segmenter-rounds' needs 'signing-key'"):
        settings_from_run_config({**base, "segmenter-rounds": 2})
    with pytest.raises(IchfedError, match="segmenter-trainable"):
        settings_from_run_config({**base, "signing-key": "s", "segmenter-rounds": 1, "segmenter-trainable": "head"})
    with pytest.raises(IchfedError, match="segmenter-learning-rate"):
        settings_from_run_config({**base, "signing-key": "s", "segmenter-rounds": 1, "segmenter-learning-rate": 3})
    s = settings_from_run_config({**base, "signing-key": "s", "segmenter-rounds": 2, "segmenter-trainable": "decoder"})
    assert isinstance(s, ServerSettings) and s.segmenter_spec(seed=3).trainable == "decoder"

    strategy = _strategy(nodes={1: "site-a", 2: "site-b"})
    sent = _sent()
    _round(strategy, 1, sent, {1: lambda m, n: _reply(m, n, _moved(sent, 1)), 2: lambda m, n: _reply(m, n, _moved(sent, 2))})
    arms = {}
    for arm, dice in ((P.SEG_REFERENCE, 0.31), (P.SEG_FEDERATED, 0.74), (P.SEG_LOCAL, 0.66)):
        arms[arm] = {"n": 20, "n-no-lesion": 0, P.N_FLAGGED: 5, "n-masked": 20, "dice-ich": dice, "dice-phe": 0.4,
                     "ich-components": 3.0, "largest-on-lesion": 0.9, "auc": 0.7}
    row = MetricsRow(site="site-a", node_id=1, status="ok", arms=arms)
    phase = SegmenterPhase(settings={"rounds": 1, "trainable": "decoder"}, opted_in={"site-a": 12, "site-b": 12},
                           rounds=strategy.rounds, sites=[row], decisions={"site-a (node 1)": P.ADOPTION_ACTIVATED},
                           bytes={"segmenter_round_sent": 4_000_000, "segmenter_reply_tensors": 4_000_000,
                                  "head_round_sent": 6000, "head_reply_tensors": 5800})
    d = phase.to_dict()
    assert SegmenterPhase.from_dict(d).to_dict() == d
    md = "\n".join(segmenter_lines({"segmenter": d}))
    assert "| site-a (node 1) | federated | 20 | 0.740 |" in md and "**in use**" in md
    assert "federated − reference, ICH Dice: mean +0.430" in md and "flagged" not in md.split("|")[0]
    assert "segmenter 4.00 MB sent, 4.00 MB returned; head record 6.0 kB sent, 5.8 kB returned" in md
