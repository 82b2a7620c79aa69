"""Site adaptation switches: which crops the site's BatchNorm statistics come from, and that they
change the embeddings (held-out cases never feed them; unlabelled ones do only when switched on)."""

from __future__ import annotations

import numpy as np
import pytest

from client.adaptation import Adaptation, adapted_features, settings, stats_crops


def _crops(bundle, n, seed):
    x, y, z = bundle.crop_spec.size_xyz
    rng = np.random.default_rng(seed)
    arr = rng.random((n, z, y, x)).astype(np.float32) * (1 + seed)
    return {f"c{seed}-{i}": arr[i] for i in range(n)}


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    from shared.bundle import load_bundle

    return load_bundle(tiny_bundle.path, tiny_bundle.public_key)


def test_stats_come_from_fine_tune_and_unlabelled_crops_never_held_out(bundle):
    fine, held, unl = _crops(bundle, 4, 1), _crops(bundle, 4, 2), _crops(bundle, 4, 3)
    crops = {**fine, **held, **unl, "no-lesion": None}
    assert len(stats_crops(crops, list(fine) + ["no-lesion"], list(unl), use_unlabelled=False)) == 4
    on = Adaptation()
    feats, stats = adapted_features(bundle, crops, list(fine), list(unl), on)
    assert stats.n_cases == 8 and set(feats) == set(fine) | set(held) | set(unl)
    # a different held-out split leaves the statistics exactly as they were
    changed = {**crops, **{k: v * 3 for k, v in held.items()}}
    _, again = adapted_features(bundle, changed, list(fine), list(unl), on)
    assert again.sha256() == stats.sha256()
    # the unlabelled cases change them only when switched on
    _, without = adapted_features(bundle, crops, list(fine), list(unl), Adaptation(unlabelled_for_norm_stats=False))
    assert without.n_cases == 4 and without.sha256() != stats.sha256()
    # and the embeddings differ from the bundle's
    from shared.models.classifier import backbone_and_head, embed

    backbone, _ = backbone_and_head(bundle.build_classifier("cpu").eval())
    ids = list(held)
    plain = embed(backbone, np.stack([crops[c] for c in ids]), "cpu")
    assert not np.allclose(plain, np.stack([feats[c] for c in ids]), atol=1e-4)


def test_a_restarted_site_reuses_its_statistics_and_embeddings(bundle, tmp_path, monkeypatch):
    """A second process (a new run, another simulation worker) with the same cases neither
    re-estimates the statistics nor re-embeds; a new case is embedded alone; other statistics
    cases give other statistics."""
    from client import adaptation
    from client.cache import AdaptedCache

    fine, held = _crops(bundle, 4, 1), _crops(bundle, 3, 2)
    crops = {**fine, **held}
    keys = {c: f"{i:064x}" for i, c in enumerate(crops)}
    first, stats = adapted_features(bundle, crops, list(fine), [], Adaptation(),
                                    cache=AdaptedCache(tmp_path), keys=keys)
    embedded: list[int] = []
    real_embed, real_stats = adaptation.embed_with, adaptation.site_norm_stats
    monkeypatch.setattr(adaptation, "site_norm_stats", lambda *a, **k: pytest.fail("statistics re-estimated"))
    monkeypatch.setattr(adaptation, "embed_with",
                        lambda b, s, x, d="cpu": embedded.append(len(x)) or real_embed(b, s, x, d))
    again, stats2 = adapted_features(bundle, crops, list(fine), [], Adaptation(),
                                     cache=AdaptedCache(tmp_path), keys=keys)
    assert embedded == [] and stats2.sha256() == stats.sha256()
    assert all(np.array_equal(first[c], again[c]) for c in crops)
    extra = _crops(bundle, 1, 5)  # a new held-out case: embedded alone, the statistics kept
    keys.update({c: "f" * 64 for c in extra})
    more, _ = adapted_features(bundle, {**crops, **extra}, list(fine), [], Adaptation(),
                               cache=AdaptedCache(tmp_path), keys=keys)
    assert embedded == [1] and set(more) == set(crops) | set(extra)
    monkeypatch.setattr(adaptation, "site_norm_stats", real_stats)
    _, other = adapted_features(bundle, crops, list(fine)[:3], [], Adaptation(),
                                cache=AdaptedCache(tmp_path), keys=keys)
    assert other.n_cases == 3 and other.sha256() != stats.sha256()


def test_paper_switches_keep_the_bundle_statistics(bundle):
    crops = _crops(bundle, 4, 1)
    assert adapted_features(bundle, crops, list(crops), [], Adaptation.paper()) == ({}, None)
    # too few crops: the bundle's statistics, with a warning rather than degenerate batch statistics
    assert adapted_features(bundle, {"a": crops["c1-0"]}, ["a"], [], Adaptation()) == ({}, None)


def test_settings_read_the_switches_of_a_config():
    class Config:
        proximal_mu = 0.0
        early_stopping = False

    assert settings(Config()) == Adaptation(proximal_mu=0.0, early_stopping=False)


@pytest.mark.parametrize("line, field", [("proximal_mu = -1.0", "proximal_mu"), ('local_norm_stats = "yes"', "local_norm_stats"),
                                         ("early_stopping = 1", "early_stopping")])
def test_switches_are_typed_and_validated_in_the_site_toml(tmp_path, line, field):
    from client.site_config import load_site_config
    from shared.plumbing.errors import IchfedError

    base = 'name = "s"\ndata_dir = "d"\nstate_dir = "st"\n'
    (tmp_path / "ok.toml").write_text(base + "local_norm_stats = false\nunlabelled_for_norm_stats = false\n"
                                      "proximal_mu = 0.0\nearly_stopping = false\n", encoding="utf-8")
    assert settings(load_site_config(tmp_path / "ok.toml")) == Adaptation.paper()
    (tmp_path / "bad.toml").write_text(base + line + "\n", encoding="utf-8")
    with pytest.raises(IchfedError, match=field):
        load_site_config(tmp_path / "bad.toml")
