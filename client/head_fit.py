"""The converged last-layer fit: the head that minimises NLL + lambda/2 ||theta - theta_anchor||^2.

The paper's recipe (``client.finetune``: Adam, a fixed number of epochs from the received head)
moves the head a few percent and stops; "fine-tuning does not help" cannot then be told from
"fine-tuning barely ran". This fit goes to the optimum of a stated objective instead:

    J(W, b) = mean NLL of log-softmax(W x + b) + lambda/2 (||W - W_a||^2 + ||b - b_a||^2)

over the site's fine-tune cases, anchored at the received head ``(W_a, b_a)`` (the reference, or
the round's global head): lambda large keeps the anchor, lambda small fits the site. lambda is
chosen from ``LAMBDAS`` by stratified inner folds of the fine-tune cases (lowest pooled
out-of-fold NLL; ties go to the larger lambda, the head nearer the anchor).

J is strictly convex. For the two-class softmax its optimum moves the two rows of the head by
opposite amounts (the NLL gradients of the rows are negatives of each other), so it is a
logistic regression in ``u`` (513 numbers) with the anchor's logit as an offset; and ``u`` lies
in the span of the cases, so with fewer cases than features (a site's dozen) Newton's method runs
on the n x n Gram matrix (a kernel logistic regression), and on the 513 x 513 Hessian otherwise.
Newton with a backtracking line search stops when the gradient of J (all 1,026 parameters) is
below ``GRAD_TOL``; ``ConvergedFit`` reports the objective, the gradient norm and the iterations,
so convergence is a measured fact, not a hope.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from shared.models.head import Head

log = logging.getLogger(__name__)

LAMBDAS = tuple(float(10.0**e) for e in range(-4, 3))  # 1e-4 ... 1e2
DEFAULT_LAMBDA = 1.0  # when inner folds cannot run (a class with fewer than two cases)
INNER_FOLDS = 5
GRAD_TOL = 1e-7  # ||grad J|| in the 513-d space; J is O(0.01 .. 1)
MAX_NEWTON = 100


@dataclasses.dataclass(frozen=True)
class ConvergedFit:
    """The fitted head and the facts of its fit: ``objective`` = mean NLL + lambda/2 ||theta - anchor||^2,
    ``nll`` the mean NLL alone, ``grad_norm`` the norm of J's gradient over every parameter."""

    head: Head
    lam: float
    objective: float
    nll: float
    grad_norm: float
    iterations: int
    cv_nll: dict[float, float] | None = None


def _design(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.hstack([x, np.ones((x.shape[0], 1))])


def _anchor_logit(anchor: Head, a: np.ndarray) -> np.ndarray:
    w = anchor.weight.astype(np.float64)
    b = anchor.bias.astype(np.float64)
    return a @ np.r_[w[1] - w[0], b[1] - b[0]]


def _nll(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-case NLL of the positive-class logit ``z`` (log(1 + e^z) - y z, computed stably)."""
    return np.logaddexp(0.0, z) - y * z


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def objective(head: Head, anchor: Head, x: np.ndarray, y: np.ndarray, lam: float) -> tuple[float, float, float]:
    """``(J, mean NLL, ||grad J||)`` of ``head`` over every parameter (float64), as defined above."""
    x64 = np.asarray(x, np.float64)
    w, b = head.weight.astype(np.float64), head.bias.astype(np.float64)
    dw, db = w - anchor.weight.astype(np.float64), b - anchor.bias.astype(np.float64)
    z = x64 @ (w[1] - w[0]) + (b[1] - b[0])
    yf = np.asarray(y, np.float64)
    nll = float(_nll(z, yf).mean())
    r = (_sigmoid(z) - yf) / len(yf)
    g1 = np.r_[x64.T @ r, r.sum()]  # d NLL / d(row 1); row 0 gets its negative
    grad = np.concatenate([-g1 + lam * np.r_[dw[0], db[0]], g1 + lam * np.r_[dw[1], db[1]]])
    penalty = 0.5 * lam * (float((dw**2).sum()) + float((db**2).sum()))
    return nll + penalty, nll, float(np.linalg.norm(grad))


def _newton_dual(k: np.ndarray, za: np.ndarray, y: np.ndarray, lam: np.ndarray,
                 weights: np.ndarray) -> tuple[np.ndarray, int]:
    """Newton's method on P problems at once, each mean_w NLL(za + 2 K alpha) + lam alpha' K alpha.

    ``lam`` (P,) and ``weights`` (P, n) (0 drops a case: an inner fold's validation rows) set the
    problems; u = A' alpha. A step solves (2 S W K / sum(w) + lam I) d = -g, g = W r / sum(w) +
    lam alpha, then is halved per problem until its J does not increase; a problem stops when
    the norm of its gradient in u-space, 2 sqrt(g' K g), is below ``GRAD_TOL``.
    """
    n_p, n = weights.shape
    c = weights / weights.sum(axis=1, keepdims=True)
    alpha = np.zeros((n_p, n))
    eye = np.eye(n)

    def j(al):
        z = za + 2.0 * al @ k
        return (c * _nll(z, y)).sum(1) + lam * np.einsum("pi,ij,pj->p", al, k, al)

    cur = j(alpha)
    active = np.ones(n_p, bool)
    for it in range(1, MAX_NEWTON + 1):
        p = _sigmoid(za + 2.0 * alpha @ k)
        g = c * (p - y) + lam[:, None] * alpha
        gnorm = 2.0 * np.sqrt(np.maximum(np.einsum("pi,ij,pj->p", g, k, g), 0.0))
        active &= gnorm >= GRAD_TOL
        if not active.any():
            return alpha, it - 1
        s = 2.0 * c * p * (1.0 - p)
        d = np.linalg.solve(s[:, :, None] * k[None] + lam[:, None, None] * eye, -g[:, :, None])[:, :, 0]
        d[~active] = 0.0
        step = np.ones(n_p)
        todo = active.copy()
        for _ in range(40):  # backtracking, per problem
            trial = j(alpha + step[:, None] * d)
            todo &= trial > cur
            if not todo.any():
                break
            step[todo] *= 0.5
        step[todo] = 0.0  # no decrease left at machine precision: converged as far as it can
        alpha = alpha + step[:, None] * d
        new = j(alpha)
        active &= ~todo & (cur - new > 1e-15 * np.abs(cur))
        cur = new
    return alpha, MAX_NEWTON


def _newton_primal(am: np.ndarray, za: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, int]:
    """The same fit in u-space (513 numbers), for more cases than features."""
    n, d = am.shape
    u = np.zeros(d)

    def j(v):
        return _nll(za + 2.0 * am @ v, y).mean() + lam * v @ v

    cur = j(u)
    for it in range(1, MAX_NEWTON + 1):
        p = _sigmoid(za + 2.0 * am @ u)
        g = 2.0 * am.T @ (p - y) / n + 2.0 * lam * u
        if np.linalg.norm(g) < GRAD_TOL:
            return u, it - 1
        h = 4.0 * (am.T * (p * (1.0 - p) / n)) @ am + 2.0 * lam * np.eye(d)
        step_dir = np.linalg.solve(h, -g)
        step = _backtrack(j, u, step_dir, cur)
        if step is None:
            return u, it
        u = u + step * step_dir
        cur = j(u)
    return u, MAX_NEWTON


def _backtrack(j, at: np.ndarray, direction: np.ndarray, current: float) -> float | None:
    """The largest step 1, 1/2, 1/4, ... that does not increase ``j``; None when none above 1e-10 does."""
    step = 1.0
    while step > 1e-10:
        if j(at + step * direction) <= current:
            return step
        step *= 0.5
    return None


def _solve_u(am: np.ndarray, za: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, int]:
    if am.shape[0] <= am.shape[1]:
        alpha, it = _newton_dual(am @ am.T, za, y, np.array([lam]), np.ones((1, len(y))))
        return am.T @ alpha[0], it
    return _newton_primal(am, za, y, lam)


def _head_from_u(anchor: Head, u: np.ndarray) -> Head:
    delta = np.vstack([-u, u])  # rows 0 and 1 move by opposite amounts
    w = anchor.weight.astype(np.float64) + delta[:, :-1]
    b = anchor.bias.astype(np.float64) + delta[:, -1]
    return Head(weight=w.astype(np.float32), bias=b.astype(np.float32))


def fit_anchored(anchor: Head, x: np.ndarray, y: np.ndarray, lam: float) -> ConvergedFit:
    """The head minimising J at this ``lam`` (Newton to ``GRAD_TOL``); the anchor itself without cases."""
    y64 = np.asarray(y, np.float64)
    if len(y64) == 0:
        return ConvergedFit(Head(anchor.weight.copy(), anchor.bias.copy()), lam, 0.0, float("nan"), 0.0, 0)
    am = _design(x)
    u, iterations = _solve_u(am, _anchor_logit(anchor, am), y64, float(lam))
    head = _head_from_u(anchor, u)
    value, nll, grad = objective(head, anchor, x, y64, lam)
    return ConvergedFit(head, float(lam), value, nll, grad, iterations)


def choose_lambda(anchor: Head, x: np.ndarray, y: np.ndarray, *, seed: int, lambdas=LAMBDAS,
                  folds: int = INNER_FOLDS) -> tuple[float, dict[float, float] | None]:
    """lambda with the lowest pooled out-of-fold NLL over stratified inner folds (ties: the larger).

    ``(DEFAULT_LAMBDA, None)`` when a class has fewer than two cases (no fold could validate both).
    """
    from sklearn.model_selection import StratifiedKFold

    y_np = np.asarray(y, np.int64)
    k = min(int(folds), int(np.bincount(y_np, minlength=2).min()))
    if k < 2:
        return DEFAULT_LAMBDA, None
    am = _design(x)
    za = _anchor_logit(anchor, am)
    y64 = y_np.astype(np.float64)
    lams = np.asarray(lambdas, np.float64)
    splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=int(seed) % (2**32))
                  .split(np.zeros(len(y_np)), y_np))
    totals = np.zeros(len(lams))
    if am.shape[0] <= am.shape[1]:
        # Every (fold, lambda) problem at once on the full Gram matrix; a fold's validation rows
        # get weight 0 in its problems.
        gram = am @ am.T
        weights = np.repeat(np.array([np.isin(np.arange(len(y_np)), tr) for tr, _ in splits], float), len(lams), 0)
        alpha, _ = _newton_dual(gram, za, y64, np.tile(lams, len(splits)), weights)
        z = za + 2.0 * alpha @ gram
        for f, (_, va) in enumerate(splits):
            totals += _nll(z[f * len(lams):(f + 1) * len(lams)][:, va], y64[va]).sum(1)
    else:
        for tr, va in splits:
            for i, lam in enumerate(lams):
                u, _ = _newton_primal(am[tr], za[tr], y64[tr], float(lam))
                totals[i] += float(_nll(za[va] + 2.0 * am[va] @ u, y64[va]).sum())
    totals = {float(lam): float(t) for lam, t in zip(lams, totals)}
    cv = {lam: v / len(y_np) for lam, v in totals.items()}
    best = min(cv.values())
    return max(lam for lam, v in cv.items() if v <= best + 1e-12), cv


def converged_update(anchor: Head, x: np.ndarray, y: np.ndarray, *, seed: int) -> ConvergedFit:
    """lambda by inner folds (``choose_lambda``), then the converged fit at it on every case."""
    lam, cv = choose_lambda(anchor, x, y, seed=seed)
    fit = fit_anchored(anchor, x, y, lam)
    if fit.grad_norm > 1e-4:
        log.warning("converged head fit stopped with gradient norm %.2g (lambda %g)", fit.grad_norm, lam)
    return dataclasses.replace(fit, cv_nll=cv)
