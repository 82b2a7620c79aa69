"""The reference model's last layer after the CNN is trained: the paper's head as trained, or a hybrid head.

``ReferenceModel`` is what bootstrap evaluates and signs: the trained ResNet-34, the head it scores with and
the head's inputs (``shared.models.head_inputs``). With ``head = "hybrid"`` the last layer is a stacked model:
a logistic regression on four numbers, the CNN's own logit and the three standardised log volumes, fitted on
a *stacking part* of the training cases that the CNN did not train on (true masks, like the CNN's training
crops), its L2 strength chosen by log-loss on the validation part (predicted masks, not trained on). Because the
CNN's logit is linear in the embedding, the stack folds exactly into a ``Linear(515, 2)`` on the embedding
and the volumes, which replaces the CNN's ``fc``: one layer a site can fine-tune. The validation part then
gives the threshold, as for the paper's head.

Why stacking and not one regression on all 515 inputs: with a few hundred cases, 512 embedding weights under
one penalty overfit (measured on noise embeddings, ``tests/server/test_bootstrap_head.py``: AUC 0.67 against
0.85 for the volumes alone), while four weights cannot; and the CNN's logit on its own training crops would
be over-trusted, hence the separate stacking part.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from shared.models.head import Head
from shared.models.head_inputs import HeadInputs

log = logging.getLogger(__name__)
C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # inverse L2 strengths tried on the validation part


@dataclasses.dataclass
class ReferenceModel:
    """The trained classifier as bootstrap scores and signs it."""

    model: Any  # the MONAI ResNet-34 (eval mode, CPU); its fc is ``head``
    head: Head
    inputs: HeadInputs
    fit: dict[str, Any] = dataclasses.field(default_factory=dict)  # how the head was fitted (report)

    def features(self, part: dict[str, Any], device: str) -> np.ndarray:
        """What the head reads for a part's crops and volumes."""
        from shared.models.classifier import backbone_and_head, embed
        from shared.plumbing.device import pick_device

        if not len(part["crops"]):
            return np.zeros((0, self.inputs.n_features), np.float32)
        backbone, _ = backbone_and_head(self.model)
        emb = embed(backbone, part["crops"], pick_device(device), 32)
        return self.inputs.features(emb, part["volumes"][:, 0], part["volumes"][:, 1])

    def p_neoplastic(self, part: dict[str, Any], device: str) -> np.ndarray:
        """p(neoplastic) of every case of a part."""
        x = self.features(part, device)
        return self.head.p_neoplastic(x) if len(x) else np.zeros(0)


def stacking_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (the CNN's training part, the stacking part): stratified, seeded."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    cnn, stack = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed + 2)
    return np.sort(cnn), np.sort(stack)


def reference_model(model: Any, kind: str, train: dict[str, Any], stack: dict[str, Any] | None,
                    val: dict[str, Any], device: str) -> ReferenceModel:
    """The paper's head as trained (``kind = "embedding"``) or a hybrid head stacked on ``stack``'s cases."""
    from shared.models.classifier import backbone_and_head

    _, fc = backbone_and_head(model)
    ref = ReferenceModel(model=model, head=Head.from_linear(fc), inputs=HeadInputs())
    if kind == "embedding":
        return ref
    if kind != "hybrid" or stack is None:
        raise ValueError(f"head: must be 'embedding', or 'hybrid' with a stacking part, got {kind!r}")
    cnn_head = ref.head
    ref.inputs = HeadInputs.fit(train["volumes"][:, 0], train["volumes"][:, 1])
    head, fit = fit_hybrid_head(cnn_head, ref.features(stack, device), stack["labels"], ref.features(val, device),
                                val["labels"])
    _replace_fc(model, head)
    ref.head, ref.fit = head, fit
    return ref


def fit_hybrid_head(cnn_head: Head, x_stack: np.ndarray, y_stack: np.ndarray, x_val: np.ndarray,
                    y_val: np.ndarray) -> tuple[Head, dict[str, Any]]:
    """Logistic regression on (the CNN's logit, the three volume features), C by validation log-loss, folded
    into a two-row ``Head`` reading (embedding, volume features).

    ``x_*`` are hybrid head inputs (512 embedding columns, then 3 volume columns). Two rows ``(-w/2, +w/2)``
    give a log-softmax whose class difference is the regression's logit.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    n_emb = cnn_head.n_features
    w_cnn = (cnn_head.weight[1] - cnn_head.weight[0]).astype(np.float64)
    b_cnn = float(cnn_head.bias[1] - cnn_head.bias[0])

    def stacked(x):
        return np.column_stack([x[:, :n_emb] @ w_cnn + b_cnn, x[:, n_emb:]])

    z_st, z_va = stacked(x_stack), stacked(x_val)
    mu, sd = z_st.mean(axis=0), z_st.std(axis=0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    scores, best = {}, None
    for c in C_GRID:
        lr = LogisticRegression(C=c, max_iter=5000).fit((z_st - mu) / sd, y_stack)
        loss = float(log_loss(y_val, lr.predict_proba((z_va - mu) / sd)[:, 1], labels=[0, 1]))
        scores[c] = loss
        if best is None or loss < best[0]:
            best = (loss, c, lr)
    _, c, lr = best
    a = lr.coef_[0] / sd  # on the unstandardised stacked inputs
    b = float(lr.intercept_[0] - np.sum(lr.coef_[0] * mu / sd))
    w = np.concatenate([a[0] * w_cnn, a[1:]])
    b = b + a[0] * b_cnn
    head = Head(weight=np.stack([-w / 2, w / 2]).astype(np.float32), bias=np.array([-b / 2, b / 2], np.float32))
    log.info("hybrid head: C=%g chosen on %d validation cases (log-loss %s); weights cnn %.3f, volumes %s", c,
             len(y_val), {k: round(v, 4) for k, v in scores.items()}, a[0], np.round(a[1:], 3).tolist())
    return head, {"head": "hybrid", "C": c, "validation_log_loss": scores, "n_stack": int(len(y_stack)),
                  "cnn_logit_weight": float(a[0]), "volume_weights": [float(v) for v in a[1:]]}


def _replace_fc(model: Any, head: Head) -> None:
    """Put ``head`` in the model as its ``fc`` (a Linear reading the hybrid inputs), so the bundle holds it."""
    model.fc = head.to_linear()
    model.eval()
