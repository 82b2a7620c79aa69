"""Site config, split, cache, evaluation and the session's threshold (on synthetic embeddings)."""

from __future__ import annotations

import numpy as np
import pytest

from client.cache import CachedCase, CaseCache, cache_key, content_hash
from client.evaluate import arm_metrics
from client.features import Part
from client.session import SiteSession
from client.site_config import SiteConfig, load_site_config
from client.split import SiteSplit, stratified_split
from shared.federation import protocol as P
from shared.models.head import Head, HeadSet
from shared.plumbing.errors import IchfedError


def test_site_config_resolves_paths_and_validates(tmp_path):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "a.toml").write_text('name = "site-a"\ndata_dir = "../data"\nstate_dir = "../state"\n'
                                    'public_key = "../keys/signing.pub"\nlocal_epochs = 3\n', encoding="utf-8")
    cfg = load_site_config(cfg_dir / "a.toml")
    assert cfg.data_dir == (tmp_path / "data").resolve() and cfg.state_dir == (tmp_path / "state").resolve()
    assert cfg.public_key == (tmp_path / "keys" / "signing.pub").resolve()
    assert (cfg.fine_tune_fraction, cfg.local_epochs, cfg.device) == (0.2, 3, "auto")

    (cfg_dir / "b.toml").write_text('name = "b"\ndata_dir = "d"\nstate_dir = "s"\nfine_tune_fraction = 1.5\n', encoding="utf-8")
    with pytest.raises(IchfedError, match="b.toml.*fine_tune_fraction"):
        load_site_config(cfg_dir / "b.toml")
    (cfg_dir / "c.toml").write_text('name = "c"\ndata_dir = "d"\nstate_dir = "s"\nlocal_epoch = 3\n', encoding="utf-8")
    with pytest.raises(IchfedError, match="unknown key 'local_epoch'"):
        load_site_config(cfg_dir / "c.toml")
    (cfg_dir / "d.toml").write_text('name = "../etc"\ndata_dir = "d"\nstate_dir = "s"\n', encoding="utf-8")
    with pytest.raises(IchfedError, match="'name'"):
        load_site_config(cfg_dir / "d.toml")


def test_split_is_stratified_seeded_and_disjoint():
    labels = {f"case-{i:03d}": int(i % 3 == 0) for i in range(60)}  # 20 positives, 40 negatives
    s = stratified_split(labels, 0.2, seed=5)
    assert isinstance(s, SiteSplit)
    assert set(s.fine_tune).isdisjoint(s.held_out) and set(s.fine_tune) | set(s.held_out) == set(labels)
    assert sum(labels[c] for c in s.fine_tune) == 4 and len(s.fine_tune) == 12  # the paper's 20 % = 12
    assert stratified_split(labels, 0.2, seed=5) == s
    assert stratified_split(labels, 0.2, seed=6) != s
    # a class with a single case stays out of the fine-tune split; tiny classes keep one case held out
    tiny = stratified_split({"a": 1, "b": 0, "c": 0}, 0.9, seed=0)
    assert tiny.fine_tune == ("b",) and set(tiny.held_out) == {"a", "c"}


def test_cache_roundtrip_and_keys(tmp_path):
    img = tmp_path / "img.nii.gz"
    img.write_bytes(b"abc")
    h = content_hash(img)
    k = cache_key(h, "b" * 64, "spec")
    assert k != cache_key(h, "c" * 64, "spec") != cache_key(h, "b" * 64, "spec2")
    img.write_bytes(b"abd")
    assert content_hash(img) != h
    cache = CaseCache(tmp_path / "cache")
    assert cache.get(k) is None
    feats = np.arange(512, dtype=np.float32)
    cache.put(k, CachedCase(lesion_found=True, features=feats, crop=np.ones((2, 3, 4), np.float32), dice_ich=0.8))
    got = cache.get(k, with_crop=True)
    assert got.lesion_found and np.array_equal(got.features, feats) and got.crop.shape == (2, 3, 4)
    assert got.dice_ich == 0.8 and got.dice_phe is None
    cache.put("0" * 64, CachedCase(lesion_found=False, features=None))
    assert cache.get("0" * 64).features is None
    assert not list((tmp_path / "cache").rglob("*.tmp*"))  # atomic writes leave no temporaries


def _part(n_pos, n_neg, seed=0, no_lesion=0):
    rng = np.random.default_rng(seed)
    y = np.array([1] * n_pos + [0] * n_neg, dtype=np.int64)
    x = rng.normal(size=(len(y), 512)).astype(np.float32) + y[:, None] * 0.5
    return Part(features=x, labels=y, n_no_lesion=no_lesion, dice_ich=[], dice_phe=[], has_masks=False)


def _evaluate(model, head, threshold, part, min_cases=5):
    return arm_metrics(model, part, head.p_neoplastic(part.features), threshold, min_cases=min_cases)


def test_evaluation_metrics_reasons_and_withholding(tmp_path):
    head = Head(weight=np.stack([np.zeros(512), np.ones(512) * 0.05]).astype(np.float32), bias=np.zeros(2, np.float32))
    m, r = _evaluate("global", head, 0.5, _part(6, 8, no_lesion=5))
    assert m["global.n"] == 14 and m["global.n-no-lesion"] == 5 and m["global.withheld"] == 0
    assert 0.0 <= m["global.auc"] <= 1.0 and m["global.tp"] + m["global.fn"] == 6
    assert len(m["global.roc-tpr"]) == len(P.ROC_FPR_GRID) and m["global.roc-tpr"][-1] == 1.0
    assert r["global.dice-ich"] == P.REASON_NO_MASKS

    # one class only: AUC undefined with a reason, the other numbers still reported
    m, r = _evaluate("global", head, 0.5, _part(0, 9))
    assert m["global.auc"] is None and r["global.auc"] == P.REASON_ONE_CLASS
    assert m["global.specificity"] is not None and m["global.sensitivity"] is None

    # fewer cases than the site's minimum: every metric and count withheld and marked
    m, r = _evaluate("global", head, 0.5, _part(2, 2))
    assert m["global.withheld"] == 1 and "global.auc" not in m and "global.accuracy" not in m
    assert r["global.auc"] == P.REASON_TOO_FEW


def test_session_threshold_without_cross_fit_uses_the_heads_own_scores(tmp_path):
    session = SiteSession(SiteConfig(name="a", data_dir=tmp_path, state_dir=tmp_path / "state"))
    head = Head(weight=np.stack([np.zeros(512), np.ones(512) * 0.05]).astype(np.float32), bias=np.zeros(2, np.float32))
    t = session.threshold(HeadSet(main=head), _part(5, 5), fallback=0.5)
    assert t.reason is None and 0.0 < t.p < 1.0
    t = session.threshold(HeadSet(main=head), _part(0, 5), fallback=0.37)
    assert (t.p, t.reason) == (0.37, P.REASON_THRESHOLD_FROM_BUNDLE)
