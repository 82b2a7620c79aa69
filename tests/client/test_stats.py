"""The site's Table 1 (client/stats.py) and its pooling (server/table1.py) on real synthetic sites.

The exact statistics come straight from the cohorts' files (cases.csv volumes, numpy over the
image and mask voxels); the federated ones pass through the reply builder and its privacy check.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from client.privacy import PrivacyViolation, build_reply, check_content
from client.site_config import SiteConfig
from client.stats import CaseStats, histogram, site_table1, table1
from server.table1 import (
    build_table1,
    markdown,
    parse_reply,
    quantile,
    to_html,
    write_table1,
)
from shared.federation import protocol as P
from shared.federation import stats_protocol as S
from simulations.cohort import write_cohort

PROFILES = ("community-hospital", "hamburg-like", "lowdose-mobile")


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_sites")
    out = []
    for i, profile in enumerate(PROFILES):
        data = root / f"site-{i}"
        write_cohort(profile, 60, 100 + i, data, scale="ci")
        out.append(SiteConfig(name=f"site-{i}", data_dir=data, state_dir=root / f"state-{i}"))
    return out


def _exact(cfg: SiteConfig) -> list[dict]:
    """Per case: class, ICH ml (cases.csv, measured from the mask) and ICH mean HU (numpy over the files)."""
    rows = []
    with open(cfg.data_dir / "cases.csv", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            img = sitk.GetArrayFromImage(sitk.ReadImage(str(cfg.data_dir / "images" / f"{r['case_id']}.nii.gz")))
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(cfg.data_dir / "masks" / f"{r['case_id']}.nii.gz")))
            rows.append({"cls": r["label"], "ich_ml": float(r["ich_ml"]),
                         "ich_hu": float(img[mask == 1].astype(np.float64).mean())})
    return rows


def _through_the_wire(cfg: SiteConfig) -> dict:
    """The site's Table 1 as the server receives it: built by build_reply, checked, parsed."""
    t1 = site_table1(cfg)
    content = build_reply(cfg.name, metrics=t1.metrics, reasons=t1.reasons, scanner=t1.scanner)
    metrics = dict(content[P.METRICS])
    reasons = {k[:-len(P.REASON_SUFFIX)]: v for k, v in content[P.INFO].items() if k.endswith(P.REASON_SUFFIX)}
    scanner = {k: list(v) for k, v in content[S.SCANNER].items()} if S.SCANNER in content else {}
    return parse_reply(cfg.name, metrics, reasons, scanner)


def _bin_width(value: float, edges: tuple[float, ...]) -> float:
    i = S.bin_index(value, edges)
    return edges[i] - edges[i - 1]


def test_pooled_medians_are_within_one_bin_of_the_exact_statistics(sites, tmp_path):
    parsed = [_through_the_wire(cfg) for cfg in sites]
    table = build_table1(parsed, {"bundle_hash": "0" * 64})
    exact = [r for cfg in sites for r in _exact(cfg)]

    pooled = table["pooled"]
    assert pooled["counts"][S.N] == len(exact) == 180
    n_neo = sum(r["cls"] == "neoplastic" for r in exact)
    if n_neo >= 5:  # the class count itself is only sent when it is above the floor at every site
        assert pooled["prevalence"] == pytest.approx(n_neo / 180) or any(
            "table1.neoplastic.n" in s["withheld"] for s in parsed)
    for cls in S.CLASSES:
        mine = [r for r in exact if r["cls"] == cls]
        for name, field in (("hist-ich-ml", "ich_ml"), ("hist-ich-hu", "ich_hu")):
            summary = pooled["summary"][cls][name]
            truth = float(np.median([r[field] for r in mine]))
            med = summary["median"]
            assert "value" in med, (cls, name, med)
            assert abs(med["value"] - truth) <= _bin_width(truth, S.HISTOGRAMS[name]), (cls, name, med, truth)
            # The precision the table states is the width of the bin the median fell in.
            assert med["precision"] == _bin_width(med["value"], S.HISTOGRAMS[name])

    paths = write_table1(table, tmp_path)
    assert "all sites" in paths["markdown"].read_text(encoding="utf-8")
    assert paths["volumes"].stat().st_size > 1000
    assert "<table>" in to_html(table) and "site-2" in markdown(table)


def test_scanner_metadata_of_nifti_sites_is_counted_as_unknown(sites):
    t1 = site_table1(sites[0])
    assert t1.scanner["manufacturer"] == {"unknown": 60}
    assert t1.scanner["tilt"] == {"unknown": 60}


def test_small_bins_and_counts_are_suppressed_at_the_site():
    assert histogram([1.0, 1.0, 1.0, 7.0, 7.0, 7.0, 7.0, 7.0, 200.0], S.VOLUME_EDGES_ML, 5) == \
        [0, 0, 5, 0, 0, 0, 0]  # 3 cases in [0, 5) and 1 in the open top bin do not show

    def case(cls, ml, kernel="B30"):
        return CaseStats(cls=cls, ich_ml=ml, phe_ml=ml, ich_mean_hu=60.0, phe_mean_hu=25.0, n_components=1,
                         from_mask=True, scanner={"manufacturer": "ACME", "model": "M", "kernel": kernel,
                                                  "slice-thickness": "5 mm", "tilt": "0"})

    rows = [case("non-neoplastic", 12.0) for _ in range(8)] + [case("neoplastic", 3.0) for _ in range(3)]
    rows += [case("non-neoplastic", 12.0, kernel="H70") for _ in range(2)]
    t1 = table1(rows, unusable=1, min_cases=5)
    assert t1.metrics["table1.n"] == 13
    assert "table1.n-unusable" not in t1.metrics and t1.reasons["table1.n-unusable"] == P.REASON_TOO_FEW
    # three neoplastic cases: their count and everything about them stays at the site
    assert not any(k.startswith("table1.neoplastic.") for k in t1.metrics)
    assert t1.reasons["table1.neoplastic.n"] == P.REASON_TOO_FEW
    assert t1.metrics["table1.non-neoplastic.n"] == 10
    # two H70 cases are too few for their own category, and too few for "other" as well
    assert t1.scanner["kernel"] == {"B30": 11}
    assert t1.scanner["manufacturer"] == {"ACME": 13}
    content = build_reply("site-a", metrics=t1.metrics, reasons=t1.reasons, scanner=t1.scanner)
    check_content(content)  # what the site builds passes its own allow-list


@pytest.mark.parametrize("kwargs, fragment", [
    ({"metrics": {"table1.n": 3}}, "below the floor"),
    ({"metrics": {"table1.neoplastic.hist-ich-ml": [0, 2] + [0] * 5}}, "below the floor"),
    ({"metrics": {"table1.neoplastic.hist-ich-ml": [0, 7, 5]}}, "list of 7"),
    ({"metrics": {"table1.neoplastic.ich-ml-max": 80.0}}, "not on the allow-list"),
    ({"metrics": {"table1.neoplastic.hist-ich-hu": [0.5] + [0] * 21}}, "whole counts"),
    ({"scanner": {"kernel": {"B30": 4}}}, "below the floor"),
    ({"scanner": {"patient-name": {"DOE^JOHN": 9}}}, "not on the allow-list"),
    ({"scanner": {"model": {"\u00e9chographe; DROP": 9}}}, "category form"),
])
def test_allow_list_refuses_what_a_stats_reply_must_not_carry(kwargs, fragment):
    with pytest.raises(PrivacyViolation, match=fragment):
        build_reply("site-a", **kwargs)


def test_quantiles_interpolate_in_the_bin_and_bound_open_bins():
    edges = (0.0, 10.0, 20.0)
    assert quantile([0, 10, 10, 0], edges, 0.5) == {"value": 10.0, "precision": 10.0}
    assert quantile([0, 0, 4, 0], edges, 0.25)["value"] == pytest.approx(12.5)
    assert quantile([0, 0, 0, 6], edges, 0.5) == {"bound": "≥ 20"}
    assert quantile([0, 0, 0, 0], edges, 0.5) is None


def test_server_drops_what_cannot_be_a_count():
    bins = S.n_bins(S.VOLUME_EDGES_ML)
    parsed = parse_reply("site-x", {"table1.n": 20, "table1.neoplastic.n": -5,
                                    "table1.neoplastic.hist-ich-ml": [0.5] + [0] * (bins - 1),
                                    "table1.non-neoplastic.hist-ich-ml": [0, 9],
                                    "table1.non-neoplastic.hist-phe-ml": [0, 9] + [0] * (bins - 2)},
                         {}, {"kernel": ["B30"], "kernel.n": [-3]})
    assert parsed["counts"] == {"n": 20}
    assert parsed["classes"]["neoplastic"] == {"counts": {}, "hist": {}}
    assert list(parsed["classes"]["non-neoplastic"]["hist"]) == ["hist-phe-ml"]
    assert parsed["scanner"] == {}
