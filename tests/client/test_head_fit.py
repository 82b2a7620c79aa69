"""The converged last-layer fit (client/head_fit.py) on small real embeddings: the tiny bundle's
backbone on true-mask crops of a simulated external site. It reaches the optimum of its stated
objective (gradient norm ~0, the same value as an independent L-BFGS), below what the paper's
Adam recipe reaches, and the site session runs it when its config says ``head_fit = "converged"``."""

from __future__ import annotations

import numpy as np
import pytest

from client.adaptation import Adaptation, local_update
from client.head_fit import (
    DEFAULT_LAMBDA,
    LAMBDAS,
    choose_lambda,
    converged_update,
    fit_anchored,
    objective,
)
from shared.models.head import Head


@pytest.fixture(scope="module")
def real(tiny_bundle):
    """(reference head, head inputs (n, 512 or 515 for a hybrid head), labels) of 32 hamburg-like cases, ci
    scale, true masks."""
    from shared.bundle import load_bundle
    from shared.models.classifier import backbone_and_head, embed
    from shared.pipeline import prepare
    from simulations.cohort import make_case

    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    crops, labels, ich, phe = [], [], [], []
    for k in range(32):
        case = make_case("hamburg-like", k, seed=5, scale="ci")
        image, mask = case.images()
        prepared = prepare(image, bundle.crop_spec, mask=mask)
        if prepared.crop.array is not None:
            crops.append(prepared.crop.array)
            labels.append(case.record.label)
            ich.append(prepared.volumetrics.ich_ml)
            phe.append(prepared.volumetrics.phe_ml)
    backbone, _ = backbone_and_head(bundle.build_classifier("cpu").eval())
    x = bundle.head_inputs.features(embed(backbone, np.stack(crops), "cpu"), ich, phe)
    y = np.asarray(labels, np.int64)
    assert min(np.bincount(y, minlength=2)) >= 6
    return Head.from_bundle(bundle), x.astype(np.float32), y


def _fine_tune(y, n=12, seed=0):
    """A stratified dozen, as a site's fine-tune split."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return np.r_[rng.choice(pos, n // 2, replace=False), rng.choice(neg, n - n // 2, replace=False)]


def test_converged_fit_reaches_the_optimum_and_beats_the_paper_recipe_on_its_objective(real):
    ref, x, y = real
    idx = _fine_tune(y)
    fit = converged_update(ref, x[idx], y[idx], seed=0)
    assert fit.lam in LAMBDAS and fit.cv_nll is not None and set(fit.cv_nll) == set(LAMBDAS)
    assert fit.grad_norm < 1e-5, fit
    # The paper's recipe, run by the same site function with the paper's switches.
    paper = local_update(Adaptation.paper(), ref, x[idx], y[idx], epochs=20, learning_rate=1e-3,
                         batch_size=16, seed=0).head
    j_paper, _, g_paper = objective(paper, ref, x[idx], y[idx], fit.lam)
    j_start, _, _ = objective(ref, ref, x[idx], y[idx], fit.lam)
    assert fit.objective < j_paper and fit.objective < j_start
    assert g_paper > 100 * fit.grad_norm  # the paper's head is far from any stationary point
    # An independent optimiser on all the head's parameters (1,026, or 1,032 for a hybrid head) lands on the
    # same objective value.
    from scipy.optimize import minimize

    n_w = ref.weight.size

    def f(theta):
        h = Head(theta[:n_w].reshape(ref.weight.shape).astype(np.float32), theta[n_w:].astype(np.float32))
        return objective(h, ref, x[idx], y[idx], fit.lam)[0]

    theta0 = np.r_[ref.weight.ravel(), ref.bias].astype(np.float64)
    lbfgs = minimize(f, theta0, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-10})
    assert fit.objective <= lbfgs.fun + 1e-6


def test_lambda_by_inner_folds_and_the_ends_of_its_range(real):
    ref, x, y = real
    idx = _fine_tune(y, n=16, seed=1)
    lam, cv = choose_lambda(ref, x[idx], y[idx], seed=3)
    assert cv[lam] == min(cv.values()) and lam == max(k for k, v in cv.items() if v == cv[lam])
    # A huge penalty keeps the anchor; a tiny one fits the fine-tune cases almost perfectly.
    stiff = fit_anchored(ref, x[idx], y[idx], 1e6)
    assert stiff.head.distance(ref) < 1e-3
    loose = fit_anchored(ref, x[idx], y[idx], 1e-6)
    assert loose.nll < 0.05 and loose.grad_norm < 1e-5
    # Too few cases of a class for folds: the documented default.
    one_pos = np.r_[np.flatnonzero(y == 1)[:1], np.flatnonzero(y == 0)[:6]]
    assert choose_lambda(ref, x[one_pos], y[one_pos], seed=0) == (DEFAULT_LAMBDA, None)
    # No cases: the anchor comes back unchanged.
    empty = fit_anchored(ref, x[:0], y[:0], 1.0)
    assert np.array_equal(empty.head.weight, ref.weight)


def test_the_site_session_trains_with_the_converged_fit_when_its_config_says_so(real, tmp_path):
    from client.session import SiteSession
    from client.site_config import SiteConfig

    ref, x, y = real
    idx = _fine_tune(y, seed=2)
    cfg = SiteConfig(name="s", data_dir=tmp_path, state_dir=tmp_path / "state", head_fit="converged")
    head, loss = SiteSession(cfg).local_update(ref, x[idx], y[idx], seed=7, device="cpu")
    expected = converged_update(ref, x[idx], y[idx], seed=7)
    assert np.array_equal(head.weight, expected.head.weight) and loss == pytest.approx(expected.nll)
    paper_cfg = SiteConfig(name="s", data_dir=tmp_path, state_dir=tmp_path / "state")
    assert paper_cfg.head_fit == "paper"  # the paper's recipe stays the default
    paper_head, _ = SiteSession(paper_cfg).local_update(ref, x[idx], y[idx], seed=7, device="cpu")
    assert not np.array_equal(paper_head.weight, head.weight)
