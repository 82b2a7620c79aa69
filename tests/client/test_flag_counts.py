"""Quality-flag counts in the site's evaluation reply: counted over the held-out split, gated by
``min_cases_for_metrics`` like the other counts, allowed by the privacy allow-list, kept in the
case cache, and shown in the server report (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from client.cache import CachedCase, CaseCache
from client.evaluate import arm_metrics
from client.features import _part
from client.privacy import PrivacyViolation, build_reply
from server.pooling import pool_model
from server.report_arms import no_lesion_lines
from shared.federation import protocol as P
from shared.imaging.quality import FLAGS
from shared.models.head_inputs import HeadInputs


class _Case:
    def __init__(self, label: int, case_id: str = "case") -> None:
        self.label, self.mask_path, self.case_id = label, None, case_id


def _rows(flags_per_case):
    rng = np.random.default_rng(0)
    return [CachedCase(lesion_found=True, features=rng.normal(size=P.HEAD_FEATURES).astype(np.float32),
                       quality_flags=tuple(flags)) for flags in flags_per_case]


FLAGGED = [("many_components", "ich_hu_not_blood"), ("many_components",), (), (), (), ("touches_skull",), ()]


def test_held_out_part_counts_cases_per_flag_and_with_any_flag():
    part = _part(_rows(FLAGGED), [_Case(i % 2, f"c{i}") for i in range(len(FLAGGED))], HeadInputs())
    assert part.n_flagged == 3
    assert part.flag_counts["many_components"] == 2 and part.flag_counts["touches_skull"] == 1
    assert set(part.flag_counts) == set(FLAGS) and part.flag_counts["small_lesion"] == 0


def test_flag_counts_leave_the_site_only_above_the_count_floor():
    part = _part(_rows(FLAGGED * 3), [_Case(i % 2, f"c{i}") for i in range(3 * len(FLAGGED))], HeadInputs())
    p = np.linspace(0.1, 0.9, part.n)
    k = lambda m: P.metric_key(P.MODEL_REFERENCE, m)  # noqa: E731
    metrics, reasons = arm_metrics(P.MODEL_REFERENCE, part, p, 0.5, min_cases=5)
    assert metrics[k(P.N_FLAGGED)] == 9 and metrics[k("flag-many_components")] == 6
    # issue 21: a flag on 3 (or 1) held-out cases is a count below the floor: it stays at the site
    assert k("flag-touches_skull") not in metrics and reasons[k("flag-touches_skull")] == P.REASON_TOO_FEW
    assert metrics[k("flag-small_lesion")] == 0  # 0 says nothing about anyone
    build_reply("site-a", metrics=metrics, reasons=reasons)  # on the allow-list
    metrics, reasons = arm_metrics(P.MODEL_REFERENCE, part, p, 0.5, min_cases=10)
    assert k(P.N_FLAGGED) not in metrics and reasons[k(P.N_FLAGGED)] == P.REASON_TOO_FEW
    assert reasons[k("flag-touches_skull")] == P.REASON_TOO_FEW
    build_reply("site-a", metrics=metrics, reasons=reasons)


@pytest.mark.parametrize("metrics, fragment", [
    ({"reference.flag-made_up": 3}, "allow-list"),
    ({"reference.flag-many_components": 2.5}, "count"),
    ({"reference.n-flagged": -1}, "count"),
])
def test_allow_list_refuses_unknown_flags_and_non_counts(metrics, fragment):
    with pytest.raises(PrivacyViolation, match=fragment):
        build_reply("site-a", metrics=metrics)


def test_cache_keeps_flags_and_recomputes_an_entry_without_them(tmp_path):
    cache = CaseCache(tmp_path)
    cache.put("ab" * 32, _rows([("touches_skull",)])[0])
    assert cache.get("ab" * 32).quality_flags == ("touches_skull",)
    meta = tmp_path / "ab" / ("ab" * 32) / "case.json"
    meta.write_text(meta.read_text(encoding="utf-8").replace('"quality_flags"', '"other"'), encoding="utf-8")
    assert cache.get("ab" * 32) is None  # an entry from before quality flags is not trusted


def test_report_shows_pooled_flag_counts():
    rows = []
    for n_flagged, many in ((3, 2), (6, 5)):
        rows.append({P.MODEL_REFERENCE: {"n": 20, "withheld": 0, P.N_FLAGGED: n_flagged,
                                         "flag-many_components": many, "flag-touches_skull": 1}})
    pooled = pool_model(rows, P.MODEL_REFERENCE)
    assert pooled["quality_flags"]["any"] == 9 and pooled["quality_flags"]["many_components"] == 7
    lines = no_lesion_lines({"final": {"pooled": {P.MODEL_REFERENCE: pooled}}})
    assert "quality flags (segmentation to review): 9 (many_components 7, touches_skull 2)" in lines[-1]
    old = pool_model([{P.MODEL_REFERENCE: {"n": 20, "withheld": 0}}], P.MODEL_REFERENCE)
    assert old["quality_flags"] is None
    assert "n/a" in no_lesion_lines({"final": {"pooled": {P.MODEL_REFERENCE: old}}})[-1]
