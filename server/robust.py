"""How the accepted heads are combined: Flower's FedAvg, FedMedian or FedTrimmedAvg, chosen per round.

``server.strategy.HeadStrategy`` admits the updates and hands the aggregation to the Flower
strategy :meth:`AggregationRule.flower_strategy` builds for the round: composition, not
inheritance, so the validation, bookkeeping and checkpoints are one code path whatever the rule.

``num-malicious-sites`` (f, like ``num_malicious_nodes`` of Flower's Krum) is the number of lying
sites the run must withstand:

- ``median``: the coordinate-wise median of n heads stays within the honest heads' range while
  f < n / 2; a run or round with n <= 2f is refused;
- ``trimmed-mean``: each round cuts k = max(f, floor(trim-fraction x n)) heads at each end, so the
  cut adapts to the number of updates that arrived and never falls below f (with trim 0.2, 5 sites
  and f = 2 the fixed fraction would cut 1 and let the second liar through); n <= 2k is refused;
- ``fedavg`` withstands no liar by its rule: a liar is bounded only by the norm limit and the
  share cap (at most ``max-site-share`` of its deviation). f is not checked.

Neither robust rule uses the claimed case counts, so a site lying about its size gains nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shared.plumbing.errors import IchfedError

AGGREGATIONS = ("fedavg", "median", "trimmed-mean")


@dataclasses.dataclass(frozen=True)
class AggregationRule:
    """The aggregation a run uses, and the number of malicious sites it must withstand."""

    name: str = "fedavg"
    trim_fraction: float = 0.2
    num_malicious: int = 1

    def __post_init__(self) -> None:
        if self.name not in AGGREGATIONS:
            raise IchfedError(f"run config: 'aggregation' must be one of {', '.join(AGGREGATIONS)}, got {self.name!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise IchfedError(f"run config: 'trim-fraction' must be in [0, 0.5), got {self.trim_fraction}")
        if self.num_malicious < 0:
            raise IchfedError(f"run config: 'num-malicious-sites' must be 0 or more, got {self.num_malicious}")

    def trim(self, n: int) -> int:
        """Heads cut at each end from ``n`` updates (0 but for the trimmed mean)."""
        if self.name != "trimmed-mean":
            return 0
        return max(self.num_malicious, int(self.trim_fraction * n))

    def problem(self, n: int) -> str | None:
        """Why ``n`` sites cannot withstand ``num_malicious`` liars under this rule (None: they can)."""
        f = self.num_malicious
        if self.name == "median" and n <= 2 * f:
            return (f"the median of {n} site(s) withstands at most {(n - 1) // 2} malicious site(s), "
                    f"'num-malicious-sites' is {f}")
        k = self.trim(n)
        if self.name == "trimmed-mean" and n <= 2 * k:
            return (f"the trimmed mean cuts {k} of {n} site(s) at each end (at least 'num-malicious-sites' {f}), "
                    "which leaves none")
        return None

    def check_sites(self, n: int) -> None:
        """Refuse a run whose ``n`` ready sites cannot withstand the stated liars (one line with the fix)."""
        why = self.problem(n)
        if why:
            raise IchfedError(f"run config: {why}; add sites, lower 'num-malicious-sites' or choose another "
                              "'aggregation'")

    def flower_strategy(self, n: int, **kwargs: Any):
        """The Flower strategy that aggregates this round's ``n`` ballots (``kwargs``: FedAvg's)."""
        from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

        if self.name == "median":
            return FedMedian(**kwargs)
        if self.name == "trimmed-mean":
            # Flower cuts int(beta * n) at each end: a beta a quarter-step above k / n gives exactly k
            # whatever the float rounding, and stays below 0.5 because n > 2k.
            return FedTrimmedAvg(beta=(self.trim(n) + 0.25) / n, **kwargs)
        return FedAvg(**kwargs)
