"""``ichfed stats`` in Flower's simulation engine: the same ServerApp (``mode = "stats"``) and ClientApp.

    out/
      sites/site-<i>/data/     generated cohorts (unless site folders or site configs are given)
      sites/site-<i>/state/    each site's bundle cache and outgoing audit
      site_configs/<site>.toml
      table1/                  table1.json, table1.md, table1.html, table1_volumes.png
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


def run_stats(out: str | os.PathLike, bundle: str | os.PathLike, public_key: str | os.PathLike, *,
              site_configs: Sequence[str | os.PathLike] | None = None, n_sites: int | None = None,
              profiles: Sequence[str] | None = None, site_dirs: Sequence[str | os.PathLike] | None = None,
              cases_per_site: int = 12, scale: str = "ci", seed: int = 0, min_cases_for_metrics: int = 5,
              device: str = "cpu") -> dict[str, Any]:
    """Simulate a statistics run and return Table 1 (also written to ``out/table1``).

    ``site_configs`` (existing TOMLs) are used as they are; otherwise sites are planned and
    generated as ``ichfed simulate`` does (``simulations.flower_sim.plan_sites``).
    Raises ``IchfedError`` for bad arguments or when no Table 1 was written.
    """
    import json

    from client.app import build_client_app
    from client.site_config import SiteConfig, load_site_config, write_site_config
    from server.app import build_server_app
    from server.settings import ServerSettings

    from .flower_sim import make_cohorts, plan_sites, run_apps

    out = Path(out).resolve()
    for what, p in (("--bundle", bundle), ("--pubkey", public_key)):
        if not Path(p).exists():
            raise IchfedError(f"{what}: {p} not found")
    if site_configs:
        paths = [Path(p).resolve() for p in site_configs]
        for p in paths:
            load_site_config(p)  # a bad config is a one-line error now, not a refusal later
    else:
        specs = plan_sites(out, n_sites=n_sites, profiles=profiles, site_dirs=site_dirs,
                           cases_per_site=cases_per_site, seed=seed)
        make_cohorts(specs, scale)
        paths = [write_site_config(
            SiteConfig(name=s.name, data_dir=s.data_dir, state_dir=out / "sites" / f"site-{i + 1}" / "state",
                       public_key=Path(public_key).resolve(), device=device,
                       min_cases_for_metrics=min_cases_for_metrics, seed=seed + i),
            out / "site_configs" / f"{s.name}.toml") for i, s in enumerate(specs)]
    settings = ServerSettings(bundle_path=Path(bundle).resolve(), public_key=Path(public_key).resolve(),
                              state_dir=out / "server", min_sites=len(paths), report_dir=out / "table1",
                              wait_for_sites_s=120.0, mode="stats")
    result = settings.reports / "table1.json"
    if result.exists():
        result.unlink()  # a stale table must not pass for this run's
    run_apps(build_server_app(settings), build_client_app(paths), len(paths), 1.0, device)
    if not result.is_file():
        raise IchfedError(f"statistics run ended without a Table 1 in {settings.reports} (see the log above)")
    return json.loads(result.read_text(encoding="utf-8"))
