"""Issue 21 item 13: small classes and small counts in evaluate and final replies.

The reproduction: a site whose held-out split has 2 positives sent ``n-pos`` 2, ``tp`` 0, ``fn`` 2
and a 21-point ROC over those 2 patients; flag counts of 1 were sent too. Now the minimum-cases
floor applies per class and to every count that leaves the site, at the source
(``client.evaluate.arm_metrics``, ``client.features.SiteFeatures.counts``) and again in the
allow-list (``client.privacy``). The arrays are real scores of a real head on features.
"""

from __future__ import annotations

import numpy as np
import pytest

from client.evaluate import arm_metrics
from client.features import Part, SiteFeatures
from client.privacy import PrivacyViolation, build_reply
from shared.federation import protocol as P
from shared.models.head import Head

G = lambda m: P.metric_key(P.MODEL_GLOBAL, m)  # noqa: E731


def _part(n_pos: int, n_neg: int, *, no_lesion: int = 0, flags: dict | None = None, seed: int = 0) -> tuple[Part, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_pos + n_neg, 512)).astype(np.float32)
    x[:n_pos] += 0.3
    y = np.array([1] * n_pos + [0] * n_neg, np.int64)
    head = Head(rng.normal(scale=0.05, size=(2, 512)).astype(np.float32), np.zeros(2, np.float32))
    part = Part(features=x, labels=y, n_no_lesion=no_lesion, dice_ich=[], dice_phe=[], has_masks=False,
                flag_counts=dict(flags or {}), n_flagged=sum((flags or {}).values()))
    return part, head.p_neoplastic(x)


def test_two_held_out_positives_send_nothing_about_those_two_patients():
    part, p = _part(2, 20)
    metrics, reasons = arm_metrics(P.MODEL_GLOBAL, part, p, 0.5, min_cases=5)
    for m in ("n-pos", "n-neg", "tp", "fn", "fp", "tn", "sensitivity", "specificity", "accuracy", "auc",
              "auc-var", "roc-tpr", "hist-pos", "hist-neg", "itt-fn"):
        assert G(m) not in metrics, m
        assert reasons[G(m)] == P.REASON_TOO_FEW
    assert metrics[G("n")] == 22 and metrics[G("withheld")] == 0 and metrics[G("threshold")] == 0.5
    build_reply("site-a", metrics=metrics, reasons=reasons)


def test_both_classes_at_the_floor_send_the_whole_arm():
    part, p = _part(5, 20)
    metrics, _ = arm_metrics(P.MODEL_GLOBAL, part, p, 0.5, min_cases=5)
    assert metrics[G("n-pos")] == 5 and metrics[G("tp")] + metrics[G("fn")] == 5
    assert len(metrics[G("roc-tpr")]) == len(P.ROC_FPR_GRID) and G("auc") in metrics


def test_counts_of_one_to_k_minus_one_do_not_leave_the_site():
    part, p = _part(6, 20, no_lesion=2, flags={"many_components": 1, "touches_skull": 7, "small_lesion": 0})
    metrics, reasons = arm_metrics(P.MODEL_GLOBAL, part, p, 0.5, min_cases=5)
    assert G("flag-many_components") not in metrics and reasons[G("flag-many_components")] == P.REASON_TOO_FEW
    assert metrics[G("flag-touches_skull")] == 7 and metrics[G("flag-small_lesion")] == 0
    assert metrics[G(P.N_FLAGGED)] == 8
    # 2 cases without a lesion: their count stays, and so do the intention-to-treat counts that give it back
    assert G("n-no-lesion") not in metrics and all(G(m) not in metrics for m in ("itt-tp", "itt-fp", "itt-tn", "itt-fn"))
    assert G("tp") in metrics  # the scored cases' confusion is unaffected
    build_reply("site-a", metrics=metrics, reasons=reasons)


def test_a_held_out_split_under_the_floor_sends_no_counts():
    part, p = _part(1, 2)
    metrics, reasons = arm_metrics(P.MODEL_GLOBAL, part, p, 0.5, min_cases=5)
    assert metrics == {G("withheld"): 1, G("n-no-lesion"): 0}
    assert reasons[G("n")] == reasons[G("n-pos")] == P.REASON_TOO_FEW


def test_site_counts_are_floored_at_the_source():
    fine, _ = _part(5, 5)
    held, _ = _part(1, 2)
    feats = SiteFeatures(fine_tune=fine, held_out=held, n_unusable=1, min_cases=5)
    assert feats.counts(held.n) == {P.N_FINE_TUNE: 10}  # 3 held out, 1 unusable: nothing said about them
    assert SiteFeatures(fine_tune=fine, held_out=fine, n_unusable=0, min_cases=5).counts(10) == {
        P.NUM_EXAMPLES: 10, P.N_FINE_TUNE: 10, P.N_HELD_OUT: 10, P.N_UNUSABLE: 0}


@pytest.mark.parametrize("metrics", [
    {"global.n-pos": 2}, {"global.n-neg": 4}, {"global.n": 3}, {"global.n-no-lesion": 1},
    {"global.flag-many_components": 1}, {"global.n-flagged": 2}, {P.N_UNUSABLE: 1}, {P.N_HELD_OUT: 4},
])
def test_the_allow_list_stops_a_small_count_on_its_way_out(metrics):
    with pytest.raises(PrivacyViolation, match="below the floor of 5"):
        build_reply("site-a", metrics=metrics)
