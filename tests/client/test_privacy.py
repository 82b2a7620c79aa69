"""The privacy allow-list: what may leave a site, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.audit import AuditMod, describe_content
from client.privacy import (
    PrivacyViolation,
    build_reply,
    check_content,
    privacy_mod,
)
from shared.federation import protocol as P
from shared.models.head import HeadSet


def _head(rng=np.random.default_rng(0)):
    return {"weight": rng.normal(size=(2, 512)).astype(np.float32), "bias": np.zeros(2, np.float32)}


def _head_content(arrays):
    """A reply whose head record holds ``arrays`` as they are (not through ``HeadSet``): what a reply
    built some other way would carry."""
    content = build_reply("site-a")
    content[P.HEAD] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return content


def test_allowed_train_reply_is_built_and_carries_only_allowed_records():
    content = build_reply("site-a", head=HeadSet.from_arrays(_head()), metrics={P.NUM_EXAMPLES: 12, P.TRAIN_LOSS: 0.6, P.N_FINE_TUNE: 12,
                                                           P.N_HELD_OUT: 40, P.N_UNUSABLE: 0})
    assert set(content.keys()) == {P.HEAD, P.METRICS, P.INFO}
    assert content[P.HEAD]["weight"].numpy().shape == (2, 512)
    assert content[P.METRICS][P.NUM_EXAMPLES] == 12
    assert content[P.INFO][P.INFO_SITE] == "site-a"


def test_allowed_evaluation_reply_with_reasons_and_roc():
    metrics = {"global.n": 30, "global.auc": 0.8, "global.accuracy": 0.7, "global.threshold": 0.4,
               "global.tp": 10, "global.fp": 3, "global.tn": 12, "global.fn": 5, "global.withheld": 0,
               "global.roc-tpr": list(np.linspace(0, 1, len(P.ROC_FPR_GRID))), "global.dice-ich": None}
    content = build_reply("site-a", metrics=metrics, reasons={"global.dice-ich": P.REASON_NO_MASKS})
    assert "global.dice-ich" not in content[P.METRICS]  # None is left out ...
    assert content[P.INFO]["global.dice-ich.reason"] == P.REASON_NO_MASKS  # ... and its reason says why


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        # a case ID as a metric name
        ({"metrics": {"case-0007.p": 0.9}}, "not on the allow-list"),
        # per-case probabilities smuggled as a list under an allowed scalar name
        ({"metrics": {"global.auc": [0.1, 0.9, 0.3]}}, "single number"),
        # a list-valued metric of the wrong length (per-case scores instead of the fixed ROC grid)
        ({"metrics": {"global.roc-tpr": [0.5] * 7}}, "list of 21"),
        # a count that is not a count
        ({"metrics": {"global.n": 3.5}}, "count"),
        # a file path as the site name
        ({"site": "/data/site-a/images/case-0007.nii.gz"}, "vocabulary"),
        # free text (could name a case) as a reason
        ({"reason": "case-0007 failed to load"}, "vocabulary"),
        ({"reasons": {"global.auc": "case 7 is the only positive"}}, "vocabulary"),
        # image data in place of the head
        ({"head": {"weight": np.zeros((20, 200, 200), np.float32), "bias": np.zeros(2, np.float32)}}, "head"),
        ({"head": {**_head(), "crop": np.zeros((2, 512), np.float32)}}, "exactly"),
        ({"head": {"weight": np.full((2, 512), np.nan, np.float32), "bias": np.zeros(2, np.float32)}}, "NaN"),
        ({"head": {"weight": np.zeros((2, 512), np.float64), "bias": np.zeros(2, np.float64)}}, "float32"),
        ({"metrics": {"global.auc": float("inf")}}, "outside"),
    ],
)
def test_forbidden_content_is_refused(kwargs, fragment):
    site = kwargs.pop("site", "site-a")
    with pytest.raises(PrivacyViolation, match=fragment):
        if "head" in kwargs:  # a HeadSet cannot hold these: check a record built without it
            check_content(_head_content(kwargs["head"]))
        else:
            build_reply(site, **kwargs)


def test_unknown_records_and_info_keys_are_refused():
    bad = RecordDict({P.INFO: ConfigRecord({P.INFO_SITE: "a", "case_ids": "c1,c2"})})
    with pytest.raises(PrivacyViolation, match="case_ids"):
        check_content(bad)
    bad = RecordDict({"images": ArrayRecord({"x": Array(np.zeros((4, 4), np.float32))})})
    with pytest.raises(PrivacyViolation, match="images"):
        check_content(bad)
    bad = RecordDict({P.METRICS: MetricRecord({"per-case-p": [0.1, 0.2]})})
    with pytest.raises(PrivacyViolation, match="per-case-p"):
        check_content(bad)


def test_privacy_mod_replaces_a_leaking_reply_with_an_error(tmp_path, flwr_task):
    incoming = Message(RecordDict(), dst_node_id=7, message_type="train")

    def leaky_handler(message, context):
        return Message(RecordDict({P.INFO: ConfigRecord({"path": "/data/a/case-1.nii.gz"})}), reply_to=message)

    def honest_handler(message, context):
        return Message(build_reply("site-a", metrics={P.NUM_EXAMPLES: 3}), reply_to=message)

    out = privacy_mod(incoming, None, leaky_handler)
    assert out.has_error() and not out.has_content()
    assert "case-1" not in out.error.reason and "/data" not in out.error.reason

    audit = AuditMod(lambda context: tmp_path)
    sent = audit(incoming, None, lambda m, c: privacy_mod(m, c, honest_handler))
    assert sent.has_content()
    files = list(tmp_path.glob("*-train.json"))
    assert len(files) == 1
    assert '"num-examples": 3' in files[0].read_text(encoding="utf-8")
    assert describe_content(sent.content)[P.INFO]["items"][P.INFO_SITE] == "site-a"


def test_stats_reply_is_allowed_and_a_small_count_in_it_is_stopped_on_the_way_out(flwr_task):
    """query.stats (ichfed stats): counts and fixed-bin histograms pass; a count of 2 never leaves."""
    from shared.federation import stats_protocol as S

    hist = [0] * S.n_bins(S.VOLUME_EDGES_ML)
    hist[2] = 7
    content = build_reply("site-a", metrics={"table1.n": 12, "table1.neoplastic.n": 7,
                                             "table1.neoplastic.hist-ich-ml": hist},
                          reasons={"table1.non-neoplastic.n": P.REASON_TOO_FEW},
                          scanner={"manufacturer": {"GE MEDICAL SYSTEMS": 12}})
    assert set(content.keys()) == {P.METRICS, P.INFO, S.SCANNER}
    assert describe_content(content)[S.SCANNER]["items"] == {"manufacturer": ["GE MEDICAL SYSTEMS"],
                                                             "manufacturer.n": [12]}

    incoming = Message(RecordDict(), dst_node_id=7, message_type=S.QUERY_STATS)

    def leaky(message, context):
        return Message(RecordDict({P.METRICS: MetricRecord({"table1.neoplastic.n": 2}),
                                   P.INFO: ConfigRecord({P.INFO_SITE: "site-a", P.INFO_STATUS: P.STATUS_OK})}),
                       reply_to=message)

    assert privacy_mod(incoming, None, leaky).has_error()


# -- segmenter rounds (issue 24) -----------------------------------------------------------------------

def _segmenter(rng=np.random.default_rng(1)):
    from shared.models.segment_weights import SegmenterWeights

    return SegmenterWeights({"decoder.seg_layers.4.weight": rng.normal(size=(3, 8, 1, 1, 1)).astype(np.float32),
                             "decoder.seg_layers.4.bias": np.zeros(3, np.float32),
                             "encoder.stages.0.0.convs.0.conv.weight": rng.normal(size=(8, 1, 3, 3, 3)).astype(np.float32)})


def _segmenter_content(arrays):
    """A reply whose segmenter record holds ``arrays`` as they are (built some other way than ``build_reply``)."""
    content = build_reply("site-a")
    content[P.SEGMENTER] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return content


def test_segmenter_messages_are_allowed():
    """A segmenter round's update: network tensors, the masked case count, loss and pseudo Dice; the
    segmenter evaluation: the three arms' aggregates and the site's decision."""
    content = build_reply("site-a", segmenter=_segmenter(), metrics={
        P.NUM_EXAMPLES: 12, P.N_MASKED_FINE_TUNE: 12, P.TRAIN_LOSS: -0.4, P.TRAIN_DICE: 0.71})
    assert set(content.keys()) == {P.SEGMENTER, P.METRICS, P.INFO}
    metrics = {}
    for arm in P.SEGMENTER_ARMS:
        k = lambda m: P.metric_key(arm, m)  # noqa: E731
        metrics.update({k("n"): 30, k("n-no-lesion"): 0, k("withheld"): 0, k("dice-ich"): 0.8, k("dice-phe"): 0.5,
                        k("n-masked"): 30, k("ich-components"): 2.5, k("largest-on-lesion"): 0.9, k("auc"): 0.7,
                        k(P.N_FLAGGED): 6})
    content = build_reply("site-a", metrics=metrics, bundle_hash="b" * 64, segmenter_adoption=P.ADOPTION_CLEARLY_WORSE,
                          reasons={P.metric_key(P.SEG_LOCAL, "auc-var"): P.REASON_TOO_FEW})
    assert content[P.INFO][P.INFO_SEG_ADOPTION] == P.ADOPTION_CLEARLY_WORSE
    check_content(content)


@pytest.mark.parametrize("damage, fragment", [
    ("nan", "NaN or infinite"),
    ("float64", "float32"),
    ("huge", "beyond"),
    ("case-name", "not a network parameter name"),
    ("empty", "holds no tensors"),
])
def test_segmenter_tensors_off_the_allow_list_are_refused(damage, fragment):
    arrays = dict(_segmenter().arrays)
    key = "decoder.seg_layers.4.weight"
    if damage == "nan":
        arrays[key] = arrays[key].copy()
        arrays[key].flat[3] = np.nan
    elif damage == "float64":
        arrays[key] = arrays[key].astype(np.float64)
    elif damage == "huge":
        arrays[key] = arrays[key] * np.float32(1e6)
    elif damage == "case-name":  # a case's crop smuggled under its own name
        arrays["charite-like-00007"] = np.zeros((20, 24, 24), np.float32)
    else:
        arrays = {}
    with pytest.raises(PrivacyViolation, match=fragment):
        check_content(_segmenter_content(arrays))


@pytest.mark.parametrize("metrics, fragment", [
    ({P.N_MASKED_FINE_TUNE: 3}, "below the floor"),  # a fine-tune on three cases
    ({P.TRAIN_DICE: 1.7}, "outside"),
    ({P.TRAIN_DICE: [0.8, 0.1, 0.9]}, "must be a number"),  # per-case Dice as a list
    ({P.metric_key(P.SEG_FEDERATED, "n-masked"): 2}, "below the floor"),
    ({P.metric_key(P.SEG_FEDERATED, "largest-on-lesion"): 1.5}, "outside"),
    ({P.metric_key(P.SEG_FEDERATED, "dice-ich"): [0.9, 0.2]}, "single number"),
    ({"segmenter-federated.case-0007-dice": 0.9}, "not on the allow-list"),
])
def test_segmenter_metrics_off_the_allow_list_are_refused(metrics, fragment):
    with pytest.raises(PrivacyViolation, match=fragment):
        build_reply("site-a", metrics=metrics)


def test_segmenter_decision_is_a_code():
    with pytest.raises(PrivacyViolation, match="fixed vocabulary"):
        build_reply("site-a", segmenter_adoption="kept: Dice 0.31 on case charite-like-00007")


def test_the_audit_keeps_a_segmenter_update_with_its_values_beside_it(tmp_path, flwr_task):
    """A million-value segmenter update is kept exactly, as an .npz named in the JSON with each tensor's
    sha256, instead of tens of MB of JSON; small arrays stay inline."""
    import hashlib
    import json

    from shared.models.segment_weights import SegmenterWeights

    big = SegmenterWeights({**_segmenter().arrays,
                            "decoder.stages.0.convs.0.conv.weight": np.ones((64, 64, 3, 3, 3), np.float32)})
    incoming = Message(RecordDict(), dst_node_id=7, message_type=P.TRAIN_SEGMENTER)

    def handler(message, context):
        return Message(build_reply("site-a", segmenter=big, metrics={P.NUM_EXAMPLES: 12, P.N_MASKED_FINE_TUNE: 12,
                                                                     P.TRAIN_LOSS: -0.2}), reply_to=message)

    AuditMod(lambda context: tmp_path)(incoming, None, lambda m, c: privacy_mod(m, c, handler))
    [entry_path] = tmp_path.glob("*-train.segmenter.json")
    entry = json.loads(entry_path.read_text(encoding="utf-8"))
    items = entry["content"][P.SEGMENTER]["items"]
    key = "decoder.stages.0.convs.0.conv.weight"
    assert "values" not in items[key] and items[key]["shape"] == [64, 64, 3, 3, 3]
    assert items["decoder.seg_layers.4.bias"]["values"] == [0.0, 0.0, 0.0]
    with np.load(tmp_path / entry["values_file"]) as z:
        kept = z[f"{P.SEGMENTER}/{key}"]
    np.testing.assert_array_equal(kept, big.arrays[key])
    assert hashlib.sha256(kept.tobytes()).hexdigest() == items[key]["sha256"]
    assert entry_path.stat().st_size < 20_000
