"""What the coordinator decides for a run (``ServerSettings``), read from Flower's run config.

Settings come from the run config (``pyproject.toml`` ``[tool.flwr.app.config]``, overridable
with ``flwr run . <federation> --run-config "num-server-rounds=5 resume=true"``), or are passed
directly by the simulation runner through ``server.app.build_server_app(settings)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from shared.federation import protocol as P
from shared.plumbing.errors import IchfedError

from .robust import AggregationRule
from .strategy import DEFAULT_MAX_SITE_SHARE, DEFAULT_MAX_UPDATE_NORM

# L2 over every tensor sent. Measured honest updates: ~1-2 after 3 iterations at lr 1e-3 (ci scale);
# docs/federation.md ("Segmenter rounds") has the demo-scale figures the limit leaves room for.
DEFAULT_MAX_SEGMENTER_UPDATE_NORM = 300.0


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What the coordinator decides for a run."""

    bundle_path: Path
    public_key: Path
    state_dir: Path
    num_rounds: int = 3
    min_sites: int = 2
    signing_key: Path | None = None  # signs the federated bundle; without it none is written
    resume: bool = False
    max_update_norm: float = DEFAULT_MAX_UPDATE_NORM
    round_timeout_s: float = 3600.0
    wait_for_sites_s: float = 600.0
    seed: int = 0
    # A federation's report is in its run folder (<state_dir>/runs/<run_id>/); report-dir gets a copy
    # of the newest one. A stats run writes its Table 1 here (default <state_dir>/report).
    report_dir: Path | None = None
    aggregation: str = "fedavg"  # or "median" / "trimmed-mean" (server/robust.py)
    trim_fraction: float = 0.2  # cut at each end by "trimmed-mean" (at least num-malicious-sites)
    num_malicious_sites: int = 1  # lying sites "median" / "trimmed-mean" must withstand (server/robust.py)
    max_site_share: float = DEFAULT_MAX_SITE_SHARE  # the largest FedAvg weight share one site can claim
    mode: str = "federate"  # or "stats": the sites' Table 1 only (server/stats_run.py), no training
    # K fold heads trained beside the main head, for the sites' out-of-fold federated threshold (0: off)
    cross_fit_folds: int = 5
    # Segmenter rounds before the head rounds (issue 24, server/segmenter_phase.py); 0: off. What the
    # opted-in sites fine-tune (decoder or all) and for how long (epochs x iterations of nnU-Net, AdamW).
    segmenter_rounds: int = 0
    segmenter_trainable: str = "all"
    segmenter_epochs: int = 10
    segmenter_iterations: int = 15
    segmenter_learning_rate: float = 1e-3
    segmenter_max_update_norm: float = DEFAULT_MAX_SEGMENTER_UPDATE_NORM

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise IchfedError(f"run config: 'num-server-rounds' must be at least 1, got {self.num_rounds}")
        if self.min_sites < 1:
            raise IchfedError(f"run config: 'min-sites' must be at least 1, got {self.min_sites}")
        if not self.max_update_norm > 0:
            raise IchfedError(f"run config: 'max-update-norm' must be positive, got {self.max_update_norm}")
        AggregationRule(self.aggregation, self.trim_fraction, self.num_malicious_sites)  # its checks, one line each
        if not (self.cross_fit_folds == 0 or 2 <= self.cross_fit_folds <= P.MAX_CROSS_FIT_FOLDS):
            raise IchfedError(f"run config: 'cross-fit-folds' must be 0 (off) or 2..{P.MAX_CROSS_FIT_FOLDS}, "
                              f"got {self.cross_fit_folds}")
        if self.mode not in ("federate", "stats"):
            raise IchfedError(f"run config: 'mode' must be 'federate' or 'stats', got {self.mode!r}")
        if not 0.0 < self.max_site_share <= 1.0:
            raise IchfedError(f"run config: 'max-site-share' must be in (0, 1], got {self.max_site_share}")
        self._check_segmenter()

    def _check_segmenter(self) -> None:
        if not 0 <= self.segmenter_rounds <= 100:
            raise IchfedError(f"run config: 'segmenter-rounds' must be 0 (off) to 100, got {self.segmenter_rounds}")
        self.segmenter_spec(seed=0)  # trainable part, epochs, iterations, learning rate: one line each
        if not self.segmenter_max_update_norm > 0:
            raise IchfedError(f"run config: 'segmenter-max-update-norm' must be positive, "
                              f"got {self.segmenter_max_update_norm}")
        if self.segmenter_rounds and self.signing_key is None and self.mode == "federate":
            raise IchfedError("run config: 'segmenter-rounds' needs 'signing-key': the federated segmenter reaches "
                              "the sites as a signed bundle")

    def segmenter_spec(self, seed: int):
        """The sites' fine-tune (``shared.training.segment_finetune.FineTuneSpec``) of a segmenter round."""
        from shared.training.segment_finetune import FineTuneSpec

        return FineTuneSpec(trainable=self.segmenter_trainable, epochs=self.segmenter_epochs,
                            iterations=self.segmenter_iterations, learning_rate=self.segmenter_learning_rate,
                            seed=seed)

    @property
    def reports(self) -> Path:
        """Where a stats run writes its Table 1 (``report-dir``, default ``<state_dir>/report``)."""
        return Path(self.report_dir) if self.report_dir else Path(self.state_dir) / "report"


_RUN_CONFIG_KEYS = {
    "bundle-path": ("bundle_path", Path),
    "public-key": ("public_key", Path),
    "state-dir": ("state_dir", Path),
    "num-server-rounds": ("num_rounds", int),
    "min-sites": ("min_sites", int),
    "signing-key": ("signing_key", Path),
    "resume": ("resume", bool),
    "max-update-norm": ("max_update_norm", float),
    "round-timeout": ("round_timeout_s", float),
    "wait-for-sites": ("wait_for_sites_s", float),
    "seed": ("seed", int),
    "report-dir": ("report_dir", Path),
    "aggregation": ("aggregation", str),
    "trim-fraction": ("trim_fraction", float),
    "num-malicious-sites": ("num_malicious_sites", int),
    "max-site-share": ("max_site_share", float),
    "mode": ("mode", str),
    "cross-fit-folds": ("cross_fit_folds", int),
    "segmenter-rounds": ("segmenter_rounds", int),
    "segmenter-trainable": ("segmenter_trainable", str),
    "segmenter-epochs": ("segmenter_epochs", int),
    "segmenter-iterations": ("segmenter_iterations", int),
    "segmenter-learning-rate": ("segmenter_learning_rate", float),
    "segmenter-max-update-norm": ("segmenter_max_update_norm", float),
}


def settings_from_run_config(run_config: dict[str, Any]) -> ServerSettings:
    """Settings from a Flower run config; empty strings mean "not set"."""
    values: dict[str, Any] = {}
    for key, (field, kind) in _RUN_CONFIG_KEYS.items():
        v = run_config.get(key)
        if v is None or v == "":
            continue
        try:
            if kind is bool:
                values[field] = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
            elif kind is Path:
                values[field] = Path(str(v)).expanduser()
            else:
                values[field] = kind(v)
        except (TypeError, ValueError):
            raise IchfedError(f"run config: '{key}' must be {kind.__name__}, got {v!r}") from None
    for key in ("bundle-path", "public-key", "state-dir"):
        if _RUN_CONFIG_KEYS[key][0] not in values:
            raise IchfedError(f"run config: '{key}' is required (set it with --run-config \"{key}='...'\")")
    return ServerSettings(**values)
