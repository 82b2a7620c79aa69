"""Issue 24 end to end in Flower's simulation engine (Ray) with the real tiny bundle and real nnU-Net.

One run (module fixture): three ci-scale sites; two opted in to segmenter rounds with masks on every
case, the third without a single mask. One segmenter round (decoder only, a few nnU-Net iterations),
then one head round:
- the two opted-in sites fine-tune the bundle's nnU-Net with nnU-Net's own trainer and send its decoder
  tensors; the server admits both and signs a bundle whose only new file is the averaged checkpoint;
- every site receives that bundle against the reference and answers with the segmenter arms and its
  decision: the opted-in sites adopt it (a few small steps cannot make their held-out Dice clearly worse),
  the site without masks has no evidence and keeps the reference segmenter;
- the head rounds run each site on the segmenter it chose (the adopters' cases are segmented and embedded
  again under the new bundle), and each site gets the federated bundle derived from its segmenter;
- every message that left a site passes the privacy inspection; the report has the segmentation table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared.federation import protocol as P

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    from simulations.cohort import write_cohort

    root = tmp_path_factory.mktemp("seg_sites")
    dirs = []
    for i, profile in enumerate(("hamburg-like", "lowdose-mobile", "community-hospital")):
        write_cohort(profile, 12, 31 + i, root / f"cohort-{i}", scale="ci")
        dirs.append(root / f"cohort-{i}")
    shutil.rmtree(dirs[2] / "masks")  # the third site has no masks at all
    (dirs[2] / "masks").mkdir()
    return dirs


@pytest.fixture(scope="module")
def federation(tiny_bundle, sites, tmp_path_factory):
    from simulations.flower_sim import run

    out = tmp_path_factory.mktemp("seg_run")
    report = run(out, tiny_bundle.path, tiny_bundle.public_key, 1, site_dirs=sites, local_epochs=2,
                 learning_rate=1e-2, fine_tune_fraction=0.5, min_cases_for_metrics=5, min_sites=2,
                 signing_key=tiny_bundle.private_key, seed=0, segmenter_fine_tune=True,
                 site_overrides={"2": {"segmenter_fine_tune": False}},
                 server_overrides={"segmenter_rounds": 1, "segmenter_trainable": "decoder", "segmenter_epochs": 1,
                                   "segmenter_iterations": 2, "segmenter_learning_rate": 1e-4})
    return out, report


def _outgoing(out: Path, i: int) -> list[dict]:
    files = sorted((out / "sites" / f"site-{i}" / "state" / "outgoing").glob("*.json"),
                   key=lambda f: int(f.name.split("-")[0]))
    return [json.loads(f.read_text(encoding="utf-8")) | {"_path": f} for f in files]


def test_segmenter_round_aggregates_the_sites_decoders_into_a_signed_bundle(federation, tiny_bundle):
    from shared.bundle import load_bundle
    from shared.models.segment_weights import SegmenterNetwork

    out, report = federation
    assert report["run"]["status"] == "finished"
    seg = report["segmenter"]
    assert seg["stopped"] is None and len(seg["opted_in"]) == 2 and min(seg["opted_in"].values()) >= 5
    rows = seg["rounds"][0]["train"]["sites"]
    assert sorted(r["status"] for r in rows) == ["accepted", "accepted"]
    assert all(r["n_fine_tune"] == seg["opted_in"][r["site"]] and r["update_norm"] > 0 for r in rows)
    parent = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    bundle = load_bundle(seg["bundle"]["path"], tiny_bundle.public_key)  # signed with the coordinator's key
    changed = sorted(rel for rel, h in bundle.manifest.files.items() if parent.manifest.files.get(rel) != h)
    assert changed == ["nnunet/fold_all/checkpoint_final.pth"]
    # the checkpoint holds the case-weighted mean of the two updates the sites sent (their own audit copies)
    updates = []
    for i in (1, 2):
        [m] = [m for m in _outgoing(out, i) if m["message_type"] == P.TRAIN_SEGMENTER]
        with np.load(m["_path"].parent / m["values_file"]) as z:
            updates.append({k.split("/", 1)[1]: z[k] for k in z.files})
    got = SegmenterNetwork(bundle.nnunet_dir, bundle.nnunet_file_hashes).weights("decoder")
    assert set(updates[0]) <= set(got.arrays)
    small = [k for k in got.arrays if k not in updates[0]]  # tensors small enough to sit in the JSON
    for k in updates[0]:
        by_site = sorted(seg["rounds"][0]["train"]["sites"], key=lambda r: r["site"])
        w = [r["weight"] for r in by_site]  # site-1 and site-2, as the updates are ordered
        np.testing.assert_allclose(got.arrays[k], (w[0] * updates[0][k].astype(np.float64) + w[1] * updates[1][k])
                                   / sum(w), rtol=1e-5, atol=1e-6)
    assert all(k.startswith("decoder.") for k in [*updates[0], *small])
    b = seg["bytes"]
    assert b["segmenter_round_sent"] > 100 * b["head_round_sent"] > 0 and b["segmenter_bundle_delivery"] > 0


def test_each_site_decides_and_runs_the_segmenter_it_chose(federation, tiny_bundle):
    from client.cache import cache_key, content_hash
    from shared.bundle import load_bundle
    from shared.imaging.sitedata import read_site

    out, report = federation
    seg = report["segmenter"]
    decisions = {label.split(" ")[0]: code for label, code in seg["decisions"].items()}
    names = sorted(decisions)
    assert [decisions[n] for n in names] == [P.ADOPTION_ACTIVATED, P.ADOPTION_ACTIVATED, P.ADOPTION_INSUFFICIENT]
    rows = {r["site"]: r for r in seg["sites"]}
    assert set(rows[names[0]]) >= set(P.SEGMENTER_ARMS)  # opted in: reference, federated and local-only
    assert not rows[names[2]].get(P.SEG_LOCAL) and rows[names[2]][P.SEG_REFERENCE]["n-masked"] == 0
    held = 12 - seg["opted_in"][names[0]]
    assert rows[names[0]][P.SEG_FEDERATED]["n-masked"] == held and 0 <= rows[names[0]][P.SEG_FEDERATED]["dice-ich"] <= 1
    seg_hash, ref_hash = seg["bundle"]["hash"], report["run"]["bundle_hash"]
    finals = seg["final_bundles"]
    assert finals["federated segmenter"]["parent_hash"] == seg_hash
    assert finals["reference segmenter"]["parent_hash"] == ref_hash
    for i, parent in ((1, seg_hash), (2, seg_hash), (3, ref_hash)):
        state = out / "sites" / f"site-{i}" / "state"
        kept = json.loads((state / "final.json").read_text(encoding="utf-8"))
        final = load_bundle(kept["bundle_path"], tiny_bundle.public_key)
        assert final.manifest.lineage["parent_hash"] == parent and kept["parent_bundle_hash"] == parent
    # the adopters' cases were segmented and embedded again under the segmenter bundle's hash
    seg_bundle = load_bundle(seg["bundle"]["path"], tiny_bundle.public_key)
    from client.cache import CaseCache

    for i, d in ((1, sites_dir(out, 1)), (2, sites_dir(out, 2))):
        cache = CaseCache(out / "sites" / f"site-{i}" / "state" / "cache")
        for case in read_site(d).labelled:
            key = cache_key(content_hash(case.image_path), seg_bundle.hash, seg_bundle.crop_spec.key(),
                            content_hash(case.mask_path))
            assert cache.get(key, with_mask=True) is not None, case.case_id


def sites_dir(out: Path, i: int) -> Path:
    from client.site_config import load_site_config

    [cfg] = (out / "site_configs").glob(f"site-{i}-*.toml")
    return load_site_config(cfg).data_dir


def test_every_message_a_site_sent_passes_the_privacy_inspection(federation, sites):
    import csv

    from client.privacy import check_content

    out, _ = federation
    case_ids = set()
    for d in sites:
        case_ids |= {r["case_id"] for r in csv.DictReader((d / "cases.csv").open(encoding="utf-8"))}
    kinds = []
    for i in (1, 2, 3):
        for m in _outgoing(out, i):
            kinds.append(m["message_type"])
            assert m["error"] is None, m
            content = m["content"]
            assert set(content) <= {P.HEAD, P.SEGMENTER, P.METRICS, P.INFO}
            if P.SEGMENTER in content:
                assert m["message_type"] == P.TRAIN_SEGMENTER
                assert all(k.startswith("decoder.") for k in content[P.SEGMENTER]["items"])
            text = json.dumps({k: v for k, v in content.items() if k != P.SEGMENTER})
            assert not any(c in text for c in case_ids)
    assert kinds.count(P.TRAIN_SEGMENTER) == 2 and kinds.count(P.QUERY_SEGMENTER) == 3
    # and the replies as Flower sent them pass the allow-list again (re-built from the audit copies)
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    for i in (1, 2):
        [m] = [m for m in _outgoing(out, i) if m["message_type"] == P.TRAIN_SEGMENTER]
        with np.load(m["_path"].parent / m["values_file"]) as z:
            arrays = {k.split("/", 1)[1]: z[k] for k in z.files}
        for k, item in m["content"][P.SEGMENTER]["items"].items():
            if k not in arrays:  # inline (small) values; large ones came from the .npz beside the JSON
                arrays[k] = np.asarray(item["values"], np.float32).reshape(item["shape"])
        check_content(RecordDict({P.SEGMENTER: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                  P.METRICS: MetricRecord(m["content"][P.METRICS]["items"]),
                                  P.INFO: ConfigRecord(m["content"][P.INFO]["items"])}))


def test_the_report_has_the_segmentation_table(federation):
    out, report = federation
    md = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Segmenter rounds" in md and "Segmentation on the held-out cases, per site" in md
    assert "| federated |" in md and "| local-only |" in md and "**in use**" in md
    assert "bytes per site and round: segmenter" in md
    assert "Segmenter rounds" in (out / "report" / "report.html").read_text(encoding="utf-8")
