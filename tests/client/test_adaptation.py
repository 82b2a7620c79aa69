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
    from shared.classifier import backbone_and_head, embed

    backbone, _ = backbone_and_head(bundle.build_classifier("cpu").eval())
    ids = list(held)
    plain = embed(backbone, np.stack([crops[c] for c in ids]), "cpu")
    assert not np.allclose(plain, np.stack([feats[c] for c in ids]), atol=1e-4)


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
    from shared.errors import IchfedError

    base = 'name = "s"\ndata_dir = "d"\nstate_dir = "st"\n'
    (tmp_path / "ok.toml").write_text(base + "local_norm_stats = false\nunlabelled_for_norm_stats = false\n"
                                      "proximal_mu = 0.0\nearly_stopping = false\n", encoding="utf-8")
    assert settings(load_site_config(tmp_path / "ok.toml")) == Adaptation.paper()
    (tmp_path / "bad.toml").write_text(base + line + "\n", encoding="utf-8")
    with pytest.raises(IchfedError, match=field):
        load_site_config(tmp_path / "bad.toml")
