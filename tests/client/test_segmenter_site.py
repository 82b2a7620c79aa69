"""Issue 24 at one site, with the real session, the real tiny bundle and real nnU-Net: a federated segmenter
that makes the site's own held-out Dice worse is kept out (the site goes on with the reference segmenter
for the run: its head rounds see the reference crops); one that is no worse is adopted, and every case is
segmented and embedded again under it (nothing read from entries of the reference bundle). The reply to
the coordinator holds aggregates and a code, and passes the privacy allow-list."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from client.audit import describe_content
from client.privacy import check_content
from shared.federation import protocol as P


@pytest.fixture(scope="module")
def site(tiny_bundle, tmp_path_factory):
    """A 12-case hamburg-like site with masks (half fine-tune), the reference bundle in its cache."""
    from client.site_config import SiteConfig
    from shared.bundle import load_bundle
    from shared.bundle.transport import bundle_cache_dir, seed_bundle
    from simulations.cohort import write_cohort

    root = tmp_path_factory.mktemp("segsite")
    write_cohort("hamburg-like", 12, 5, root / "data", scale="ci")
    ref = load_bundle(tiny_bundle.path, tiny_bundle.public_key)

    def config(name: str, opted_in: bool) -> SiteConfig:
        cfg = SiteConfig(name=name, data_dir=root / "data", state_dir=root / name, public_key=tiny_bundle.public_key,
                         device="cpu", fine_tune_fraction=0.5, local_norm_stats=False, segmenter_fine_tune=opted_in)
        seed_bundle(ref, bundle_cache_dir(cfg.state_dir))
        return cfg

    return {"config": config, "ref": ref, "root": root, "keys": tiny_bundle}


def _segmenter_bundle(site, name, weights):
    from shared.bundle import derive_bundle, load_bundle
    from shared.models.head import Head

    ref = site["ref"]
    out = site["root"] / name
    if not out.exists():
        derive_bundle(ref, out, Head.from_bundle(ref), ref.threshold, name, private_key=site["keys"].private_key,
                      segmenter=weights)
    return load_bundle(out, site["keys"].public_key)


def _query(site, seg_bundle):
    from shared.bundle.transport import bundle_to_records

    arrays, config = bundle_to_records(seg_bundle.path, parent=site["ref"])
    cfg = {P.CFG_BUNDLE_HASH: site["ref"].hash, P.CFG_SEG_BUNDLE_HASH: seg_bundle.hash, P.CFG_DELIVER: True,
           P.CFG_NUM_ROUNDS: 1, P.CFG_SEG_TRAINABLE: "decoder", P.CFG_SEG_EPOCHS: 1, P.CFG_SEG_ITERATIONS: 2,
           P.CFG_SEG_LEARNING_RATE: 1e-4}
    return RecordDict({P.CONFIG: ConfigRecord(cfg), P.BUNDLE_ARRAYS: arrays, P.BUNDLE_CONFIG: config})


def test_a_segmenter_that_lowers_the_sites_dice_is_kept_out(site):
    """The 'federated' segmenter here predicts background everywhere (its output layer biased so), so the
    site's held-out ICH Dice drops to 0: the site keeps the reference segmenter and says so by a code."""
    from client.segmenter_site import read_decision
    from client.session import SiteSession
    from shared.models.segment_weights import SegmenterNetwork, SegmenterWeights

    ref = site["ref"]
    w = SegmenterNetwork(ref.nnunet_dir, ref.nnunet_file_hashes).weights("decoder")
    blind = {k: np.zeros_like(a) for k, a in w.arrays.items() if ".seg_layers." in k}
    for k in blind:
        if k.endswith(".bias"):
            blind[k][0] = 10.0
    bad = _segmenter_bundle(site, "blind", SegmenterWeights(blind))
    cfg = site["config"]("site-blind", opted_in=False)
    session = SiteSession(cfg)
    reply = session.segmenter_arms(_query(site, bad))
    check_content(reply)  # aggregates and a code only
    info, metrics = reply[P.INFO], reply[P.METRICS]
    assert info[P.INFO_SEG_ADOPTION] == P.ADOPTION_CLEARLY_WORSE and info[P.INFO_BUNDLE_HASH] == bad.hash
    assert metrics["segmenter-reference.dice-ich"] > 0.2
    assert metrics["segmenter-federated.dice-ich"] == 0.0 and metrics["segmenter-federated.n-masked"] >= 5
    assert not any(k.startswith(P.SEG_LOCAL) for k in metrics)  # it did not opt in: no local-only arm
    decision = read_decision(cfg.state_dir, bad.hash)
    assert decision["parent_hash"] == ref.hash and decision["evidence"]["dice_difference_upper_95"] < 0
    # the run goes on with the reference segmenter: the head rounds name the segmenter bundle, the site runs
    # its parent
    run_cfg = ConfigRecord({P.CFG_BUNDLE_HASH: ref.hash, P.CFG_SEG_BUNDLE_HASH: bad.hash})
    assert session._run_bundle(run_cfg).hash == ref.hash
    text = str(describe_content(reply))
    assert not any(c.case_id in text for c in session.store.read_site().cases)  # no case ID anywhere


def test_a_segmenter_no_worse_is_adopted_and_every_case_is_segmented_again(site):
    """The reference weights in a new bundle (no worse by construction) are adopted; the features the
    run then uses are computed under the new bundle, under keys that name it, not read from the
    reference's entries. The site opted in, so the local-only segmenter is trained and scored too."""
    from client.cache import cache_key, content_hash
    from client.session import SiteSession
    from shared.models.segment_weights import SegmenterNetwork

    ref = site["ref"]
    same = _segmenter_bundle(site, "same", SegmenterNetwork(ref.nnunet_dir, ref.nnunet_file_hashes).weights("decoder"))
    assert same.hash != ref.hash and same.nnunet_file_hashes != ref.nnunet_file_hashes
    cfg = site["config"]("site-same", opted_in=True)
    session = SiteSession(cfg)
    ref_feats = session.store.features(ref)
    reply = session.segmenter_arms(_query(site, same))
    check_content(reply)
    metrics = reply[P.METRICS]
    assert reply[P.INFO][P.INFO_SEG_ADOPTION] == P.ADOPTION_ACTIVATED
    assert metrics["segmenter-federated.dice-ich"] == pytest.approx(metrics["segmenter-reference.dice-ich"], abs=1e-6)
    assert metrics["segmenter-local.n-masked"] >= cfg.min_cases and "segmenter-local.dice-ich" in metrics
    run_cfg = ConfigRecord({P.CFG_BUNDLE_HASH: ref.hash, P.CFG_SEG_BUNDLE_HASH: same.hash})
    assert session._run_bundle(run_cfg).hash == same.hash
    # keyed by the segmenter's bundle: every labelled case has an entry under the new hash, apart from the
    # reference's
    site_data = session.store.read_site()
    for case in site_data.labelled:
        keys = [cache_key(content_hash(case.image_path), b.hash, b.crop_spec.key(), content_hash(case.mask_path))
                for b in (ref, same)]
        assert keys[0] != keys[1]
        assert all(session.store.cache.get(k, with_mask=True) is not None for k in keys)
    feats = session._features(run_cfg)
    assert feats.held_out.n == ref_feats.held_out.n
    # a bundle is scored under its own segmenter: the local-only one differs from the reference
    local = metrics["segmenter-local.dice-ich"]
    assert 0.0 <= local <= 1.0
