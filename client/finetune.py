"""Last-layer fine-tuning on cached embeddings, and scoring with a head.

The backbone is frozen, so the paper's "train only the last layer" is a logistic-regression-
sized problem on the (N, 512) features the backbone produced once per case. Training and
scoring go through the same ``nn.Linear(512, 2)`` + log-softmax as the bundle's classifier.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from shared import protocol as P

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Head:
    """Final-layer weights as plain arrays: ``weight`` (2, 512), ``bias`` (2,), float32."""

    weight: np.ndarray
    bias: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays under their message keys."""
        return {P.HEAD_WEIGHT: self.weight, P.HEAD_BIAS: self.bias}

    @classmethod
    def from_arrays(cls, arrays) -> "Head":
        """From a mapping of key -> array (numpy arrays or Flower ``Array``)."""
        def get(k):
            v = arrays[k]
            return np.asarray(v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else v, np.float32)

        return cls(weight=get(P.HEAD_WEIGHT).copy(), bias=get(P.HEAD_BIAS).copy())


@dataclasses.dataclass(frozen=True)
class TrainResult:
    head: Head
    loss: float  # mean NLL over the last epoch
    epochs: int


def _linear(head: Head, device):
    import torch

    layer = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.asarray(head.weight, np.float32)))
        layer.bias.copy_(torch.from_numpy(np.asarray(head.bias, np.float32)))
    return layer.to(device)


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
) -> TrainResult:
    """Train ``head`` for ``epochs`` on (features, labels) with Adam and NLL loss (as the paper).

    Deterministic for a given seed on CPU. With no features the head comes back unchanged.
    """
    import torch

    n = len(labels)
    if n == 0 or epochs == 0:
        return TrainResult(head=Head(head.weight.copy(), head.bias.copy()), loss=float("nan") if n == 0 else 0.0, epochs=0)
    gen = torch.Generator().manual_seed(int(seed))
    layer = _linear(head, device)
    x = torch.as_tensor(np.asarray(features, np.float32), device=device)
    y = torch.as_tensor(np.asarray(labels, np.int64), device=device)
    opt = torch.optim.Adam(layer.parameters(), lr=learning_rate)
    loss_fn = torch.nn.NLLLoss()
    last = 0.0
    layer.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(torch.log_softmax(layer(x[idx]), dim=1), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        last = total / n
    with torch.no_grad():
        out = Head(
            weight=layer.weight.detach().cpu().numpy().astype(np.float32),
            bias=layer.bias.detach().cpu().numpy().astype(np.float32),
        )
    return TrainResult(head=out, loss=last, epochs=epochs)


def p_neoplastic(head: Head, features: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Probability of class 1 (neoplastic) for each feature row, as float64."""
    import torch

    if len(features) == 0:
        return np.zeros(0, dtype=np.float64)
    layer = _linear(head, device)
    with torch.no_grad():
        lp = torch.log_softmax(layer(torch.as_tensor(np.asarray(features, np.float32), device=device)), dim=1)
    return lp[:, 1].exp().cpu().numpy().astype(np.float64)
