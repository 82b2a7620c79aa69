"""Robust aggregation of the head beside FedAvg: Flower's own coordinate-wise median
(``FedMedian``) and trimmed mean (``FedTrimmedAvg``), with ichfed's update validation.

``HeadFedAvg`` calls ``super().aggregate_train`` after rejecting bad updates and capping the
claimed weights; mixing it in front of Flower's robust strategies makes that call the median or
the trimmed mean, so the validation, bookkeeping and checkpoints stay one code path.

Neither robust rule uses the claimed case counts, so a site lying about its size gains nothing.
Coordinate-wise, the median of n heads lies within the honest heads' range while fewer than
half are malicious; the trimmed mean with fraction ``beta`` does so while at most
``int(beta * n)`` are (with 3 or 4 sites and beta 0.2 it trims nothing and is a plain mean).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

from shared.plumbing.errors import IchfedError

from .strategy import HeadFedAvg

AGGREGATIONS = ("fedavg", "median", "trimmed-mean")


class HeadFedMedian(HeadFedAvg, FedMedian):
    """Coordinate-wise median of the accepted heads (Flower's FedMedian)."""


class HeadFedTrimmedAvg(HeadFedAvg, FedTrimmedAvg):
    """Coordinate-wise trimmed mean of the accepted heads (Flower's FedTrimmedAvg)."""

    def __init__(self, *, trim_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.beta = trim_fraction  # FedTrimmedAvg's name for the fraction cut at each end


def make_strategy(aggregation: str = "fedavg", *, trim_fraction: float = 0.2, **kwargs: Any) -> HeadFedAvg:
    """The head strategy for ``aggregation`` ("fedavg" | "median" | "trimmed-mean"); ``kwargs``
    go to :class:`server.strategy.HeadFedAvg`."""
    if aggregation == "fedavg":
        return HeadFedAvg(**kwargs)
    if aggregation == "median":
        return HeadFedMedian(**kwargs)
    if aggregation == "trimmed-mean":
        if not 0.0 <= trim_fraction < 0.5:
            raise IchfedError(f"run config: 'trim-fraction' must be in [0, 0.5), got {trim_fraction}")
        return HeadFedTrimmedAvg(trim_fraction=trim_fraction, **kwargs)
    raise IchfedError(f"run config: 'aggregation' must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
