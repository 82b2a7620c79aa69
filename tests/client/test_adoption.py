"""No harm at adoption (client/adoption.py): a delivered federated bundle that is worse on the
site's own out-of-fold evidence is kept but not activated there; a better one becomes the site's
model (what ``predict --site-config`` loads); a hospital can require manual approval and approve
by hand. The reply carries only the aggregate code."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client import adoption
from shared.federation import protocol as P


def _scores(rng, y, signal):
    return 1 / (1 + np.exp(-(rng.normal(size=y.size) + signal * (2 * y - 1))))


def test_the_rule_clearly_worse_zero_operating_point_insufficient_and_manual():
    rng = np.random.default_rng(0)
    y = np.array([1] * 10 + [0] * 10)
    good = _scores(rng, y, 2.0)
    worse = 1 - good  # ranks every case the other way round
    c = adoption.compare(y, worse, good, 0.5, 0.5, margin=0.05, evidence="out-of-fold")
    assert c.code == P.ADOPTION_CLEARLY_WORSE
    assert c.evidence["auc_difference"] < -0.05 and c.evidence["auc_difference_upper_95"] < 0
    # A slightly worse candidate (within the noise of 20 cases) is not "clearly" worse.
    near = np.clip(good + rng.normal(scale=0.05, size=y.size), 0, 1)
    assert adoption.compare(y, near, good, 0.5, 0.5, margin=0.05, evidence="out-of-fold").code == \
        P.ADOPTION_ACTIVATED
    # Same ranking, but a threshold above every score: it calls every case non-neoplastic.
    zero = adoption.compare(y, good, good, 0.999, 0.5, margin=0.05, evidence="out-of-fold")
    assert zero.code == P.ADOPTION_ZERO_OPERATING_POINT and zero.evidence["candidate_sensitivity"] == 0.0
    one = np.array([1, 0, 0, 0, 0])
    assert adoption.compare(one, good[:5], good[:5], 0.5, 0.5, margin=0.05, evidence="out-of-fold").code == \
        P.ADOPTION_INSUFFICIENT
    assert adoption.decide(adoption.Comparison(P.ADOPTION_ACTIVATED, {}), "manual") == P.ADOPTION_AWAITING_APPROVAL
    assert adoption.decide(c, "manual") == P.ADOPTION_CLEARLY_WORSE


# -- the real site session, real tiny bundle, real delivered federated bundles ------------------------


@pytest.fixture(scope="module")
def site(tiny_bundle, tmp_path_factory):
    """A 24-case site (half fine-tune), its cached features and a head that ranks its cases well."""
    from client.head_fit import converged_update
    from client.session import SiteSession
    from client.site_config import SiteConfig
    from shared.bundle import load_bundle
    from shared.bundle.transport import bundle_cache_dir, seed_bundle
    from shared.models.head import Head
    from simulations.cohort import write_cohort

    root = tmp_path_factory.mktemp("adoption")
    write_cohort("hamburg-like", 24, 3, root / "data", scale="ci")
    ref = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    cfg = SiteConfig(name="site-a", data_dir=root / "data", state_dir=root / "state",
                     public_key=tiny_bundle.public_key, device="cpu", fine_tune_fraction=0.5, local_epochs=2,
                     local_norm_stats=False)
    seed_bundle(ref, bundle_cache_dir(cfg.state_dir))
    feats = SiteSession(cfg).store.features(ref)
    x = np.concatenate([feats.fine_tune.features, feats.held_out.features])
    y = np.concatenate([feats.fine_tune.labels, feats.held_out.labels])
    good = converged_update(Head.from_bundle(ref), x, y, seed=0).head  # fitted on every case: ranks them well
    return {"cfg": cfg, "ref": ref, "good": good, "root": root, "keys": tiny_bundle}


def _derive(site, head, name):
    from shared.bundle import derive_bundle, load_bundle

    out = site["root"] / name
    if not out.exists():
        derive_bundle(site["ref"], out, head, 0.5, version=f"{name}", private_key=site["keys"].private_key)
    return load_bundle(out, site["keys"].public_key)


def _final(cfg, ref, candidate, head):
    """The final comparison as the coordinator sends it: 5 cross-fit fold heads (all the candidate's
    head here), the federated bundle delivered against the parent the site holds."""
    from flwr.app import ConfigRecord, RecordDict

    from client.session import SiteSession
    from shared.bundle.transport import bundle_to_records
    from shared.models.head import HeadSet

    content = RecordDict({P.HEAD: HeadSet.replicate(head, 5).to_record(),
                          P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: ref.hash, P.CFG_NUM_ROUNDS: 1,
                                                  P.CFG_DELIVER: True})})
    content[P.BUNDLE_ARRAYS], content[P.BUNDLE_CONFIG] = bundle_to_records(candidate.path, parent=ref)
    return SiteSession(cfg).final_comparison(content)


@pytest.mark.slow
def test_a_bundle_worse_on_the_sites_own_evidence_is_kept_but_not_activated(site, caplog):
    import dataclasses

    from shared.models.head import Head

    cfg = dataclasses.replace(site["cfg"], state_dir=site["root"] / "state")
    better = _derive(site, site["good"], "good")
    reply = _final(cfg, site["ref"], better, site["good"])
    assert reply[P.INFO][P.INFO_ADOPTION] == P.ADOPTION_ACTIVATED
    assert adoption.active_model(cfg.state_dir).bundle_hash == better.hash
    # Now a federated bundle whose head ranks the site's cases the other way round arrives.
    bad_head = Head(-site["good"].weight, -site["good"].bias)
    worse = _derive(site, bad_head, "worse")
    with caplog.at_level("WARNING"):
        reply = _final(cfg, site["ref"], worse, bad_head)
    info = reply[P.INFO]
    assert info[P.INFO_ADOPTION] == P.ADOPTION_CLEARLY_WORSE and info[P.INFO_BUNDLE_HASH] == worse.hash
    assert adoption.active_model(cfg.state_dir).bundle_hash == better.hash  # the site keeps its model
    rec = adoption.read_record(cfg.state_dir, worse.hash)
    assert rec["decision"] == P.ADOPTION_CLEARLY_WORSE and rec["compared_with"] == better.hash
    assert rec["evidence"]["candidate_scores"] == "out-of-fold" and rec["evidence"]["auc_difference"] < -0.05
    assert (cfg.state_dir / "bundles" / worse.hash / "manifest.json").is_file()  # kept
    final = json.loads((cfg.state_dir / "final.json").read_text(encoding="utf-8"))
    assert final["bundle_hash"] == worse.hash and final["adoption"] == P.ADOPTION_CLEARLY_WORSE
    assert "kept but not activated: kept-clearly-worse" in caplog.text
    # Nothing per case in the reply: the code is a fixed-vocabulary info field.
    from client.privacy import check_content

    check_content(reply)
    # predict --site-config without --bundle loads the site's model, not the kept one.
    from client.site_config import write_site_config
    from client.site_predictor import open_predictor

    toml = write_site_config(cfg, site["root"] / "site-a.toml")
    assert open_predictor(None, site_config=toml, device="cpu").bundle.hash == better.hash
    with caplog.at_level("WARNING"):
        open_predictor(worse.path, site_config=toml, device="cpu")
    assert "was kept but not activated at this site (kept-clearly-worse)" in caplog.text


@pytest.mark.slow
def test_manual_approval_keeps_a_good_bundle_waiting_until_the_hospital_approves_it(site, capsys):
    import dataclasses
    import shutil

    from client.site_config import write_site_config
    from ichfed.cli import main

    cfg = dataclasses.replace(site["cfg"], state_dir=site["root"] / "manual-state", adoption="manual")
    from shared.bundle.transport import bundle_cache_dir, seed_bundle

    seed_bundle(site["ref"], bundle_cache_dir(cfg.state_dir))
    # the same cases' preprocessing (keyed by content): a fresh state without minutes of nnU-Net
    shutil.copytree(site["cfg"].state_dir / "cache", cfg.state_dir / "cache")
    better = _derive(site, site["good"], "good")
    reply = _final(cfg, site["ref"], better, site["good"])
    assert reply[P.INFO][P.INFO_ADOPTION] == P.ADOPTION_AWAITING_APPROVAL
    # The site goes on with the model it was given until someone approves.
    assert adoption.active_model(cfg.state_dir).bundle_hash == site["ref"].hash
    toml = write_site_config(cfg, site["root"] / "manual.toml")
    assert main(["site", "approve", str(toml)]) == 0
    out = capsys.readouterr().out
    assert f"active model  {better.hash}" in out and "was kept as   kept-awaiting-approval" in out
    assert adoption.active_model(cfg.state_dir).bundle_hash == better.hash
    assert adoption.active_model(cfg.state_dir).source == "approved by hand"
    # Nothing left to approve: a one-line error.
    assert main(["site", "approve", str(toml)]) == 2
    assert "no adoption record for any bundle awaiting a decision" in capsys.readouterr().err


@pytest.mark.slow
def test_a_clearly_worse_bundle_needs_force_to_approve(site, capsys):
    import dataclasses

    from client.site_config import write_site_config
    from ichfed.cli import main
    from shared.bundle import bundle_hash

    cfg = dataclasses.replace(site["cfg"], state_dir=site["root"] / "state")
    worse = bundle_hash(site["root"] / "worse")
    toml = write_site_config(cfg, site["root"] / "force.toml")
    assert main(["site", "approve", str(toml), "--bundle", worse]) == 2
    assert "approve it anyway with --force" in capsys.readouterr().err
    assert main(["site", "approve", str(toml), "--bundle", worse, "--force"]) == 0
    assert adoption.active_model(cfg.state_dir).bundle_hash == worse
