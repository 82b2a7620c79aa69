"""Last-layer fine-tuning on cached embeddings, and scoring with a head.

The backbone is frozen, so the paper's "train only the last layer" is a logistic-regression-
sized problem on the (N, 512) features the backbone produced once per case. Training and
scoring go through the same ``nn.Linear(512, 2)`` + log-softmax as the bundle's classifier.

A site's local update (``local_update``) can be regularised: FedProx's proximal term keeps the
head near the received global head, and early stopping chooses the epoch count by inner folds
of the fine-tune split. With both off it is the paper's plain last-layer fine-tuning.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from shared.models.head import Head

log = logging.getLogger(__name__)

INNER_FOLDS = 5  # early stopping: stratified folds inside the fine-tune split (fewer when a class is small)


@dataclasses.dataclass(frozen=True)
class HeadTrainResult:
    """A locally trained head: ``loss`` is the mean training NLL of the last epoch (without the
    proximal term), ``epochs`` how many were run (chosen by the inner folds with early stopping)."""

    head: Head
    loss: float
    epochs: int


def _linear(head: Head, device):
    return head.to_linear(device)


def _head_of(layer) -> Head:
    return Head.from_linear(layer)


def _fit(start: Head, x, y, *, epochs: int, learning_rate: float, batch_size: int, seed: int, device,
         proximal_mu: float, anchor: Head, val=None):
    """Adam on NLL (+ ``proximal_mu``/2 ||w - anchor||^2) from ``start``; returns (layer, last train
    loss, validation NLL after every epoch when ``val`` = (x, y) is given)."""
    import torch

    n = len(y)
    gen = torch.Generator().manual_seed(int(seed))
    layer = _linear(start, device)
    ref = [t.detach().clone() for t in _linear(anchor, device).parameters()] if proximal_mu > 0 else []
    opt = torch.optim.Adam(layer.parameters(), lr=learning_rate)
    loss_fn = torch.nn.NLLLoss()
    last, val_losses = 0.0, []
    for _ in range(epochs):
        layer.train()
        order = torch.randperm(n, generator=gen).to(device)
        total = 0.0
        for s in range(0, n, batch_size):
            idx = order[s: s + batch_size]
            opt.zero_grad()
            nll = loss_fn(torch.log_softmax(layer(x[idx]), dim=1), y[idx])
            loss = nll
            if ref:  # FedProx: stay near the head every site started the round from
                loss = nll + 0.5 * proximal_mu * sum(((p - r) ** 2).sum() for p, r in zip(layer.parameters(), ref))
            loss.backward()
            opt.step()
            total += float(nll.detach()) * len(idx)
        last = total / n
        if val is not None:
            with torch.no_grad():
                val_losses.append(float(loss_fn(torch.log_softmax(layer(val[0]), dim=1), val[1])))
    return layer, last, val_losses


def train_head(
    head: Head,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    device: str = "cpu",
    proximal_mu: float = 0.0,
    anchor: Head | None = None,
) -> HeadTrainResult:
    """Train ``head`` for ``epochs`` on (features, labels) with Adam and NLL loss (as the paper).

    ``proximal_mu`` > 0 adds FedProx's proximal term ``mu/2 * ||w - w_anchor||^2`` over weight and
    bias, pulling the local head toward ``anchor`` (default: ``head``, the received global head):
    with a dozen cases per site an unregularised head drifts to fit them. Deterministic for a given
    seed on CPU. With no features the head comes back unchanged.
    """
    import torch

    n = len(labels)
    if n == 0 or epochs == 0:
        return HeadTrainResult(head=Head(head.weight.copy(), head.bias.copy()),
                               loss=float("nan") if n == 0 else 0.0, epochs=0)
    x = torch.as_tensor(np.asarray(features, np.float32), device=device)
    y = torch.as_tensor(np.asarray(labels, np.int64), device=device)
    layer, last, _ = _fit(head, x, y, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                          device=device, proximal_mu=float(proximal_mu), anchor=anchor or head)
    return HeadTrainResult(head=_head_of(layer), loss=last, epochs=epochs)


def choose_epochs(head: Head, features: np.ndarray, labels: np.ndarray, *, max_epochs: int, learning_rate: float,
                  batch_size: int, seed: int, device: str = "cpu", proximal_mu: float = 0.0,
                  folds: int = INNER_FOLDS) -> int:
    """Early stopping by inner folds: the epoch count (1..``max_epochs``) with the lowest mean
    validation NLL over stratified folds of (features, labels), each fold trained from ``head``.

    ``max_epochs`` when a class has fewer than two cases (no fold could validate both classes).
    """
    import torch
    from sklearn.model_selection import StratifiedKFold

    y_np = np.asarray(labels, np.int64)
    counts = np.bincount(y_np, minlength=2)
    k = min(int(folds), int(counts.min()))
    if k < 2 or max_epochs <= 1:
        return int(max_epochs)
    x_all = torch.as_tensor(np.asarray(features, np.float32), device=device)
    y_all = torch.as_tensor(y_np, device=device)
    curves = []
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=int(seed) % (2**32))
    for f, (tr, va) in enumerate(splitter.split(np.zeros(len(y_np)), y_np)):
        tr_t, va_t = torch.as_tensor(tr, device=device), torch.as_tensor(va, device=device)
        _, _, val = _fit(head, x_all[tr_t], y_all[tr_t], epochs=max_epochs, learning_rate=learning_rate,
                         batch_size=batch_size, seed=seed * 7919 + f, device=device, proximal_mu=proximal_mu,
                         anchor=head, val=(x_all[va_t], y_all[va_t]))
        curves.append(val)
    mean = np.mean(np.asarray(curves), axis=0)
    return int(np.argmin(mean)) + 1


def local_update(head: Head, features: np.ndarray, labels: np.ndarray, *, max_epochs: int, learning_rate: float,
                 batch_size: int, seed: int, device: str = "cpu", proximal_mu: float = 0.0,
                 early_stopping: bool = False) -> HeadTrainResult:
    """A site's training of the received ``head``: optionally stop early (``choose_epochs``), with
    the proximal term toward ``head`` when ``proximal_mu`` > 0. Both off is the paper's recipe."""
    epochs = max_epochs
    if early_stopping and len(labels):
        epochs = choose_epochs(head, features, labels, max_epochs=max_epochs, learning_rate=learning_rate,
                               batch_size=batch_size, seed=seed, device=device, proximal_mu=proximal_mu)
    return train_head(head, features, labels, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                      seed=seed, device=device, proximal_mu=proximal_mu)

