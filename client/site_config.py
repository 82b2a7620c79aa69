"""A site's configuration: ``site_configs/<name>.toml`` as a typed, validated ``SiteConfig``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from shared.federation import protocol as P
from shared.plumbing.config import from_dict, load_toml
from shared.plumbing.errors import IchfedError

from .adaptation import Adaptation

_ADAPT = Adaptation()  # the adaptation switches' defaults live in one place


@dataclasses.dataclass(frozen=True)
class SiteConfig:
    """``site_configs/<name>.toml``. Relative paths are relative to the TOML file's folder."""

    name: str
    data_dir: Path
    state_dir: Path
    public_key: Path | None = None  # the coordinator's Ed25519 key; without it no bundle is trusted
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fine_tune_fraction: float = dataclasses.field(default=0.2, metadata={"range": (0.01, 0.99)})
    local_epochs: int = dataclasses.field(default=20, metadata={"range": (1, 100_000)})
    learning_rate: float = dataclasses.field(default=1e-3, metadata={"range": (1e-8, 10.0)})
    batch_size: int = dataclasses.field(default=16, metadata={"range": (1, 65_536)})
    # The floor (protocol.MIN_CASES_FLOOR) is part of the privacy boundary: a config cannot lower it.
    min_cases_for_metrics: int = dataclasses.field(default=5, metadata={"range": (P.MIN_CASES_FLOOR, 1_000_000)})
    seed: int = dataclasses.field(default=0, metadata={"range": (0, 2**31 - 1)})
    audit_outgoing: bool = True  # keep a copy of every reply in <state_dir>/outgoing/
    # Site adaptation (client/adaptation.py); all off (proximal_mu = 0) is the paper's plain last-layer fine-tuning.
    local_norm_stats: bool = _ADAPT.local_norm_stats  # backbone BatchNorm statistics from the site's own crops
    unlabelled_for_norm_stats: bool = _ADAPT.unlabelled_for_norm_stats  # empty-label cases feed them (only them)
    proximal_mu: float = dataclasses.field(default=_ADAPT.proximal_mu, metadata={"range": (0.0, 1e6)})  # FedProx
    early_stopping: bool = _ADAPT.early_stopping  # local epochs chosen by inner folds (at most local_epochs)
    # "paper": Adam for local_epochs; "converged": NLL + lambda/2 ||w - w_received||^2 to its optimum,
    # lambda by inner folds (client/head_fit.py); with local_norm_stats this is AdaBN + head refit.
    head_fit: Literal["paper", "converged"] = _ADAPT.head_fit  # type: ignore[assignment]
    # No harm at adoption (client/adoption.py): "auto" activates a delivered federated bundle unless
    # it is clearly worse on the site's own out-of-fold evidence; "manual" waits for `ichfed site approve`.
    adoption: Literal["auto", "manual"] = "auto"
    # "Clearly worse": paired AUC (candidate - current) below -adoption_margin and below 0 at one-sided 5 %.
    adoption_margin: float = dataclasses.field(default=0.05, metadata={"range": (0.0, 1.0)})
    # Segmenter rounds (issue 24, docs/federation.md): fine-tune the received nnU-Net on this site's
    # masked fine-tune cases (and masked unlabelled cases) when the run has segmenter rounds.
    segmenter_fine_tune: bool = False
    # The most nnU-Net iterations (epochs x iterations per epoch) one fine-tune may take here; a round or a
    # local-only fine-tune asking for more is refused (segmenter-budget-exceeded). The default round is 150.
    segmenter_max_iterations: int = dataclasses.field(default=2000, metadata={"range": (1, 1_000_000)})

    @property
    def min_cases(self) -> int:
        """``min_cases_for_metrics``, never below the protocol's floor."""
        return max(int(self.min_cases_for_metrics), P.MIN_CASES_FLOOR)

    def __post_init__(self) -> None:
        if not P.SITE_NAME_RE.match(self.name):
            raise IchfedError(
                f"site config: 'name' must be 1-64 letters, digits, '.', '_' or '-' (got {self.name!r})"
            )
        if self.min_cases_for_metrics < P.MIN_CASES_FLOOR:  # also when built in code, not only from TOML
            raise IchfedError(f"site config: 'min_cases_for_metrics' cannot be below {P.MIN_CASES_FLOOR} "
                              f"(got {self.min_cases_for_metrics})")


def load_site_config(path: str | os.PathLike) -> SiteConfig:
    """Read and validate a site TOML; resolve its paths against the file's folder."""
    p = Path(path)
    data = load_toml(p)
    cfg = from_dict(SiteConfig, data, source=str(p))
    base = p.resolve().parent

    def resolve(q: Path | None) -> Path | None:
        return None if q is None else (q if q.is_absolute() else (base / q)).resolve()

    return dataclasses.replace(
        cfg, data_dir=resolve(cfg.data_dir), state_dir=resolve(cfg.state_dir), public_key=resolve(cfg.public_key)
    )


def write_site_config(cfg: SiteConfig, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as TOML (absolute paths; unset optional keys left out), atomically."""
    import tomli_w

    from shared.plumbing.atomic import write_text
    from shared.plumbing.config import to_dict

    write_text(path, tomli_w.dumps({k: v for k, v in to_dict(cfg).items() if v is not None}))
    return Path(path)
