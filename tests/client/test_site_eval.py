"""The site's out-of-sample threshold, the four arms on the same held-out cases, and what of
them may leave the site (real heads trained with torch on synthetic 512-d embeddings)."""

from __future__ import annotations

import numpy as np
import pytest

from client.calibrate import on_grid, out_of_fold_scores, site_threshold
from client.features import Part, SiteFeatures
from client.final import final_arms
from client.finetune import train_head
from client.privacy import PrivacyViolation, build_reply
from client.seeds import out_of_fold_seed
from client.session import SiteSession
from client.site_config import SiteConfig, load_site_config
from shared.evaluation.metrics import best_threshold, classification_metrics
from shared.federation import protocol as P
from shared.models.head import Head
from shared.plumbing.errors import IchfedError

START = Head(np.zeros((2, 512), np.float32), np.array([0.0, -1.5], np.float32))
TRAIN = dict(epochs=30, learning_rate=1e-2, batch_size=16, seed=0)


def _trainer(epochs, learning_rate, batch_size, **_):
    """``train(start, x, y, seed) -> head`` as ``client.calibrate.out_of_fold_scores`` takes it (each fold brings its own seed)."""
    return lambda start, x, y, s: train_head(start, x, y, epochs=epochs, learning_rate=learning_rate,
                                             batch_size=batch_size, seed=s).head


def _final_arms(config, feats, reference, federated, bundle_threshold, rounds):
    """The four arms as the session computes them (without cross-fit: the federated head's own scores)."""
    session = SiteSession(config)
    t_fed = site_threshold(feats.fine_tune.labels, federated.p_neoplastic(feats.fine_tune.features), bundle_threshold)

    def local_only(start, x, y, seed):
        return session.local_update(start, x, y, seed=seed, device="cpu", epochs=rounds * config.local_epochs)[0]

    return final_arms(config, feats, reference, federated, t_fed, bundle_threshold, local_only, seed=0)


def _data(n_pos, n_neg, rng, mu=1.0, dims=64):
    """Embeddings whose first ``dims`` features carry the class; 512 dims, so a dozen cases are
    separable by a linear head whatever their labels."""
    y = np.array([1] * n_pos + [0] * n_neg, dtype=np.int64)
    x = rng.normal(size=(len(y), 512))
    x[:, :dims] += (2 * y[:, None] - 1) * mu / 2
    return x.astype(np.float32), y


def _part(x, y, no_lesion=0, no_lesion_pos=0):
    return Part(features=x, labels=y, n_no_lesion=no_lesion, dice_ich=[], dice_phe=[], has_masks=False,
                n_no_lesion_pos=no_lesion_pos)


def test_out_of_sample_threshold_on_a_site_whose_head_separates_its_fine_tune_cases():
    rng = np.random.default_rng(0)
    xf, yf = _data(6, 6, rng)
    xh, yh = _data(100, 100, rng)
    head = train_head(START, xf, yf, **TRAIN).head
    in_sample = head.p_neoplastic(xf)
    assert classification_metrics(yf, in_sample, 0.5, n_boot=0)["auc"] == 1.0  # perfectly separated
    held = head.p_neoplastic(xh)
    # the old rule: the threshold on the lowest-scoring positive of the cases the head trained on
    old = classification_metrics(yh, held, best_threshold(yf, in_sample).p, n_boot=0)
    assert old["sensitivity"] < 0.3

    oof = out_of_fold_scores(START, xf, yf, _trainer(**TRAIN), seed=0)
    t = site_threshold(yf, oof, fallback=0.5)
    new = classification_metrics(yh, held, t.p, n_boot=0)
    assert t.reason is None
    assert new["sensitivity"] >= 0.7 and new["specificity"] >= 0.7, new
    # on the wire: on the grid, strictly inside (0, 1), and not any fine-tune case's score
    assert 0.0 < t.p < 1.0 and abs(t.p * 100 - round(t.p * 100)) < 1e-9
    assert t.p not in set(oof.tolist()) | set(in_sample.tolist())
    # the site's calibration is re-fitted on the same out-of-fold scores
    assert t.calibration is not None and t.calibration["kind"] == "platt"


def test_leave_one_out_below_ten_cases_and_one_class_fallback():
    rng = np.random.default_rng(1)
    x, y = _data(4, 4, rng)
    kw = dict(TRAIN, epochs=5)
    oof = out_of_fold_scores(START, x, y, _trainer(**kw), seed=0)
    full = train_head(START, x, y, **kw).head.p_neoplastic(x)
    assert oof.shape == (8,) and np.all((oof > 0) & (oof < 1)) and not np.allclose(oof, full)
    # case i's score comes from a head trained on the other seven only
    i = 3
    loo = train_head(START, np.delete(x, i, 0), np.delete(y, i), **dict(kw, seed=out_of_fold_seed(0, i))).head
    assert oof[i] == pytest.approx(loo.p_neoplastic(x[i:i + 1])[0], abs=1e-6)

    t = site_threshold(np.zeros(6, np.int64), np.linspace(0.1, 0.6, 6), fallback=0.3712)
    assert (t.p, t.reason, t.calibration) == (0.37, P.REASON_THRESHOLD_FROM_BUNDLE, None)
    assert on_grid(0.3712, np.array([0.37])) == 0.38  # never exactly on an observed score


def test_min_cases_floor_cannot_be_lowered(tmp_path):
    with pytest.raises(IchfedError, match="min_cases_for_metrics"):
        SiteConfig(name="a", data_dir=tmp_path, state_dir=tmp_path, min_cases_for_metrics=3)

    (tmp_path / "s.toml").write_text('name = "s"\ndata_dir = "d"\nstate_dir = "st"\nmin_cases_for_metrics = 2\n',
                                     encoding="utf-8")
    with pytest.raises(IchfedError, match="s.toml.*min_cases_for_metrics"):
        load_site_config(tmp_path / "s.toml")
    assert SiteConfig(name="a", data_dir=tmp_path, state_dir=tmp_path).min_cases == P.MIN_CASES_FLOOR


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    rng = np.random.default_rng(2)
    xf, yf = _data(6, 6, rng, mu=0.4)
    xh, yh = _data(12, 14, rng, mu=0.4)
    tmp = tmp_path_factory.mktemp("arms")
    config = SiteConfig(name="a", data_dir=tmp, state_dir=tmp, local_epochs=10, learning_rate=1e-2)
    feats = SiteFeatures(fine_tune=_part(xf, yf), held_out=_part(xh, yh, no_lesion=6, no_lesion_pos=2), n_unusable=0)
    xr, yr = _data(10, 10, rng, mu=0.4)  # the "bundle's" head: trained elsewhere, weakly
    reference = train_head(START, xr, yr, **dict(TRAIN, epochs=3)).head
    federated = train_head(reference, np.concatenate([xf, xr]), np.concatenate([yf, yr]), **TRAIN).head
    return _final_arms(config, feats, reference, federated, bundle_threshold=0.2345, rounds=2), yh


def test_four_arms_on_the_same_held_out_cases(arms):
    out, yh = arms
    m, r = out.metrics, out.reasons
    for arm in P.FINAL_ARMS:
        assert m[f"{arm}.n"] == len(yh) and m[f"{arm}.n-pos"] == 12 and m[f"{arm}.withheld"] == 0
        assert 0.0 <= m[f"{arm}.auc"] <= 1.0 and 0.0 < m[f"{arm}.auc-var"] < 0.05, m
        assert m[f"{arm}.tp"] + m[f"{arm}.fn"] == 12
        # intention to treat: the 6 cases without a segmented lesion (2 neoplastic) are called negative
        assert m[f"{arm}.itt-fn"] == m[f"{arm}.fn"] + 2 and m[f"{arm}.itt-tn"] == m[f"{arm}.tn"] + 4
        assert sum(m[f"{arm}.hist-neg"]) == 14 and sum(m[f"{arm}.hist-pos"]) == 12
    # reference and reference-site score the same head: same AUC, different thresholds
    assert m["reference.auc"] == m["reference-site.auc"] and m["reference.threshold"] == 0.2345
    assert abs(m["reference-site.threshold"] * 100 - round(m["reference-site.threshold"] * 100)) < 1e-9
    # paired differences on the same cases, with variances
    assert m["federated.auc-minus-reference"] == pytest.approx(m["federated.auc"] - m["reference.auc"])
    assert m["federated.auc-minus-local"] == pytest.approx(m["federated.auc"] - m["local.auc"])
    assert m["local.auc-minus-reference"] == pytest.approx(m["local.auc"] - m["reference.auc"])
    assert m["federated.auc-minus-reference-var"] > 0.0
    # and all of it passes the privacy allow-list
    build_reply("site-a", metrics=m, reasons=r)


def test_everything_within_the_classes_is_withheld_when_a_class_is_under_the_floor(tmp_path):
    rng = np.random.default_rng(3)
    xf, yf = _data(6, 6, rng)
    xh, yh = _data(3, 10, rng)  # 3 positives held out: fewer than the floor of 5
    config = SiteConfig(name="a", data_dir=tmp_path, state_dir=tmp_path, local_epochs=2)
    feats = SiteFeatures(fine_tune=_part(xf, yf), held_out=_part(xh, yh), n_unusable=0)
    out = _final_arms(config, feats, START, START, bundle_threshold=0.3, rounds=1)
    assert "federated.hist-pos" not in out.metrics and "federated.hist-neg" not in out.metrics
    assert out.reasons["federated.hist-pos"] == P.REASON_TOO_FEW
    # issue 21: the AUC, the class sizes and the confusion counts described those 3 patients too
    for metric in ("auc", "n-pos", "n-neg", "tp", "fn", "sensitivity", "roc-tpr", "auc-minus-reference"):
        assert f"federated.{metric}" not in out.metrics and out.reasons[f"federated.{metric}"] == P.REASON_TOO_FEW
    assert out.metrics["federated.n"] == 13 and out.metrics["federated.withheld"] == 0
    build_reply("site-a", metrics=out.metrics, reasons=out.reasons)


@pytest.mark.parametrize("metrics, fragment", [
    ({"federated.hist-pos": [1.0] * 3 + [0.0] * 47}, "fewer than 5"),
    ({"federated.hist-neg": [0.5] * 50}, "whole counts"),
    ({"federated.hist-neg": [1.0] * 49}, "list of 50"),
    ({"federated.threshold": 0.4271}, "grid"),
    ({"reference-site.threshold": 0.305}, "grid"),
    ({"federated.auc-minus-local": 1.5}, "outside"),
    ({"federated.auc-var": -0.01}, "outside"),
    ({"federated.itt-fn": 2.5}, "count"),
])
def test_allow_list_refuses_histograms_under_the_floor_and_off_grid_thresholds(metrics, fragment):
    with pytest.raises(PrivacyViolation, match=fragment):
        build_reply("site-a", metrics=metrics)


def test_allow_list_accepts_grid_thresholds_and_the_bundles_own():
    build_reply("site-a", metrics={"federated.threshold": 0.43, "reference.threshold": 0.2345,
                                   "federated.auc-minus-reference": -0.12, "federated.hist-pos": [5] + [0] * 49})


def test_a_single_positive_withholds_the_auc_variance_instead_of_failing():
    """Five held-out cases with one positive pass the count floor but not the class floor: the AUC
    and its variance and the paired differences are withheld with a reason, no site error (before
    issue 21 the AUC of that one patient against four was sent)."""
    from client.evaluate import arm_metrics, paired_metrics

    x, y = _data(1, 4, np.random.default_rng(3))
    p = START.p_neoplastic(x)
    metrics, reasons = arm_metrics(P.MODEL_GLOBAL, _part(x, y), p, 0.5, min_cases=5)
    assert P.metric_key(P.MODEL_GLOBAL, "auc") not in metrics
    assert P.metric_key(P.MODEL_GLOBAL, "auc-var") not in metrics
    assert reasons[P.metric_key(P.MODEL_GLOBAL, "auc-var")] == P.REASON_TOO_FEW
    m, r = paired_metrics(P.MODEL_FEDERATED, y, p, {P.MODEL_REFERENCE: p[::-1].copy()}, min_cases=5)
    assert not m and r[P.metric_key(P.MODEL_FEDERATED, "auc-minus-reference")] == P.REASON_TOO_FEW
