"""Run the federation in Flower's simulation engine (Ray backend) on simulated or existing sites.

The very same ``ServerApp`` and ``ClientApp`` as in deployment run here; only the wiring
differs: each virtual SuperNode gets its site config through its ``partition-id``, and the
server settings are passed in directly instead of through ``flwr run``'s run config.

    out/
      sites/<site>/data/          the site folder (generated cohort, unless --site-dirs)
      sites/<site>/state/         the site's caches, received bundles, threshold, outgoing audit
      site_configs/<site>.toml
      server/                     checkpoints and the federated bundle
      report/                     report.json, report.md, report.html, roc.png, confusion.png
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

DEFAULT_PROFILES = ("community-hospital", "hamburg-like", "lowdose-mobile")


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """One simulated site: its name and data folder (generated from ``profile`` if given)."""

    name: str
    data_dir: Path
    profile: str | None = None
    n_cases: int = 0
    seed: int = 0


def plan_sites(out: Path, *, n_sites: int | None = None, profiles: Sequence[str] | None = None,
               site_dirs: Sequence[str | os.PathLike] | None = None, cases_per_site: int = 12,
               seed: int = 0) -> list[SiteSpec]:
    """Which sites the simulation has: the given folders, or ``n_sites`` cohorts cycling ``profiles``."""
    if site_dirs:
        specs = []
        for i, d in enumerate(site_dirs):
            p = Path(d).resolve()
            if not (p / "cases.csv").is_file():
                raise IchfedError(f"--site-dirs: {p} is not a site folder (cases.csv missing)")
            specs.append(SiteSpec(name=_safe_name(f"site-{i + 1}-{p.name}"), data_dir=p))
        if n_sites is not None and n_sites != len(specs):
            raise IchfedError(f"--sites is {n_sites} but --site-dirs names {len(specs)} folders")
        return specs
    if not n_sites or n_sites < 1:
        raise IchfedError("--sites: must be at least 1 (or give --site-dirs)")
    if cases_per_site < 2:
        raise IchfedError(f"--cases-per-site: must be at least 2, got {cases_per_site}")
    names = list(profiles) if profiles else _default_profiles()
    if not names:
        raise IchfedError("--profiles: no site profiles given and none are built in")
    return [SiteSpec(name=f"site-{i + 1}-{names[i % len(names)]}",
                     data_dir=Path(out) / "sites" / f"site-{i + 1}" / "data",
                     profile=names[i % len(names)], n_cases=cases_per_site, seed=seed + 1000 * (i + 1))
            for i in range(n_sites)]


def _default_profiles() -> list[str]:
    from simulations.profiles import list_profiles

    builtin = list_profiles()
    preferred = [p for p in DEFAULT_PROFILES if p in builtin]
    return preferred or [p for p in builtin if p != "charite-like"] or builtin


def _safe_name(s: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "-", s)[:64]


def make_cohorts(specs: Sequence[SiteSpec], scale: str) -> None:
    """Generate the cohorts of simulated sites; a folder already holding that cohort is reused."""
    from simulations.cohort import write_cohort

    for spec in specs:
        if spec.profile is None:
            continue
        meta = spec.data_dir / "cohort.json"
        if meta.is_file() and (spec.data_dir / "cases.csv").is_file():
            m = json.loads(meta.read_text(encoding="utf-8"))
            if (m.get("seed"), m.get("scale"), m.get("n_cases")) == (spec.seed, scale, spec.n_cases) and \
                    (m.get("profile") or {}).get("name") == spec.profile:
                log.info("site %s: reusing cohort in %s", spec.name, spec.data_dir)
                continue
        write_cohort(spec.profile, spec.n_cases, spec.seed, spec.data_dir, scale=scale)


def run(out: str | os.PathLike, bundle: str | os.PathLike, public_key: str | os.PathLike, rounds: int, *,
        n_sites: int | None = None, profiles: Sequence[str] | None = None,
        site_dirs: Sequence[str | os.PathLike] | None = None, cases_per_site: int = 30, scale: str = "ci",
        seed: int = 0, split_seed: int | None = None, signing_key: str | os.PathLike | None = None,
        local_epochs: int = 20, learning_rate: float = 1e-3, fine_tune_fraction: float = 0.2,
        min_cases_for_metrics: int = 5, min_sites: int | None = None, resume: bool = False, device: str = "cpu",
        cpus_per_site: float = 1.0, site_overrides: dict[str, dict[str, Any]] | None = None,
        extra_client_mods: Sequence[Callable] = (), ray_address: str | None = None,
        segmenter_fine_tune: bool = False, server_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a whole simulated federation and return the report (also written to ``out/report``).

    ``seed`` fixes the cohorts; ``split_seed`` (default ``seed``) the sites' fine-tune / held-out
    splits, so repeats with other split seeds reuse the cohorts and their cached features.
    ``site_overrides`` maps a site name (or its index as a string) to extra site-config fields.
    ``ray_address`` runs the virtual sites on an existing Ray cluster (``ray start --head``'s
    address, e.g. ``10.0.0.5:6379``) instead of a Ray instance started for this run; every
    node of that cluster must see ``out`` and the bundle at the same paths.
    ``segmenter_fine_tune`` opts every site in to segmenter rounds (a site override can opt one out);
    ``server_overrides`` sets further ``ServerSettings`` fields (e.g. ``segmenter_rounds``).
    Raises ``IchfedError`` for bad arguments and when the run fails (e.g. too few usable sites).
    """
    from client.app import build_client_app
    from server.app import build_server_app
    from server.settings import ServerSettings

    out = Path(out).resolve()
    _check_run_args(rounds, bundle, public_key)
    specs = plan_sites(out, n_sites=n_sites, profiles=profiles, site_dirs=site_dirs,
                       cases_per_site=cases_per_site, seed=seed)
    make_cohorts(specs, scale)
    config_paths = write_site_configs(
        out, specs, public_key, device=device, fine_tune_fraction=fine_tune_fraction, local_epochs=local_epochs,
        learning_rate=learning_rate, min_cases_for_metrics=min_cases_for_metrics,
        first_seed=seed if split_seed is None else split_seed, site_overrides=site_overrides,
        segmenter_fine_tune=segmenter_fine_tune)
    check_splits(config_paths, min_sites or len(specs))

    settings = ServerSettings(
        bundle_path=Path(bundle).resolve(), public_key=Path(public_key).resolve(), state_dir=out / "server",
        num_rounds=rounds, min_sites=min_sites or len(specs), resume=resume, seed=seed,
        signing_key=Path(signing_key).resolve() if signing_key else None, report_dir=out / "report",
        wait_for_sites_s=120.0, **(server_overrides or {}),
    )
    _clear_previous_run(out, settings, len(specs), resume)
    from shared.plumbing.progress import site_mod

    sites = [(_site_state(out, i), spec.name) for i, spec in enumerate(specs)]
    mods = [site_mod(lambda context: sites[int(context.node_config["partition-id"])]), *extra_client_mods]
    log.info("progress of the run: %s; of each site: %s", settings.state_dir / "runs" / "<run id>" / "events.jsonl",
             out / "sites" / "site-N" / "state" / "events.jsonl")
    run_apps(build_server_app(settings), build_client_app(config_paths, extra_mods=mods),
             len(specs), cpus_per_site, device, ray_address)
    return _final_report(out, settings, [spec.name for spec in specs], seed)


def _site_state(out: Path, i: int) -> Path:
    """The state folder of simulated site ``i`` (0-based)."""
    return out / "sites" / f"site-{i + 1}" / "state"


def _check_run_args(rounds: int, bundle: str | os.PathLike, public_key: str | os.PathLike) -> None:
    if rounds < 1:
        raise IchfedError(f"--rounds: must be at least 1, got {rounds}")
    for what, p in (("--bundle", bundle), ("--public-key", public_key)):
        if not Path(p).exists():
            raise IchfedError(f"{what}: {p} not found")


def _clear_previous_run(out: Path, settings, n_sites: int, resume: bool) -> None:
    """Remove what a previous run left that could pass for this run's: its report, and unless
    resuming, its server state and the sites' audit trails and final scores."""
    report_path = settings.reports / "report.json"
    if report_path.exists():
        report_path.unlink()  # a stale report must not pass for this run's
    if not resume:
        # A simulation owns its output folder: a new (not resumed) run replaces the previous run's
        # server state and audit trail, and keeps the cohorts and the sites' preprocessing caches.
        import shutil

        if settings.state_dir.exists():
            log.info("starting afresh: removing the previous run's server state in %s", settings.state_dir)
            shutil.rmtree(settings.state_dir)
        for i in range(n_sites):
            shutil.rmtree(_site_state(out, i) / "outgoing", ignore_errors=True)
    from client.session import FINAL_SCORES

    for i in range(n_sites):  # a site that does not answer this run's final query leaves no stale scores
        (_site_state(out, i) / FINAL_SCORES).unlink(missing_ok=True)


def _final_report(out: Path, settings, names: list[str], seed: int) -> dict[str, Any]:
    """The run's report, with the case-level bootstrap of the sites' kept scores added (and written)."""
    report_path = settings.reports / "report.json"
    if not report_path.is_file():
        raise IchfedError(f"simulation ended without a report in {settings.reports} (see the log above)")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    boot = case_level_bootstrap([_site_state(out, i) for i in range(len(names))], names, seed=seed)
    if boot is not None and report.get("final"):
        from server.report import write_report
        from server.run_folder import latest_run

        report["final"]["bootstrap"] = boot
        for folder in {settings.reports, latest_run(settings.state_dir)} - {None}:  # the copy and the run's own
            write_report(report, folder)
    return report


BOOTSTRAP_ARMS = ("reference", "local", "federated")


def case_level_bootstrap(state_dirs: Sequence[Path], names: Sequence[str], n_boot: int = 2000,
                         seed: int = 0) -> dict[str, Any] | None:
    """The paired endpoints with a hierarchical bootstrap CI, from the sites' case-level scores.

    In a simulation every site's folder is on this machine, so the held-out scores each site kept
    (``final_scores.npz``) can be resampled: sites with replacement, then cases within each site
    (``shared.evaluation.site_bootstrap``). A real federation has only the per-site aggregates and
    its report uses the t interval over sites instead. None when no site kept usable scores.
    """
    import numpy as np

    from client.session import FINAL_SCORES
    from shared.evaluation.site_bootstrap import Block, SiteScores, bootstrap_sites

    sites = []
    for name, state in zip(names, state_dirs):
        path = Path(state) / FINAL_SCORES
        if not path.is_file():
            continue
        with np.load(path, allow_pickle=False) as z:
            y = z["labels"]
            if min(int((y == 1).sum()), int((y == 0).sum())) < 2 or any(a not in z for a in BOOTSTRAP_ARMS):
                continue
            sites.append(SiteScores(name, [Block(y, {a: z[a] for a in BOOTSTRAP_ARMS})]))
    if not sites:
        return None
    boot = bootstrap_sites(sites, BOOTSTRAP_ARMS, n_boot=n_boot, seed=seed)
    pairs = (("federated", "reference"), ("federated", "local"), ("local", "reference"))
    return {"method": "hierarchical bootstrap (sites, then cases within site); equal site weights; percentile CI",
            "n_boot": n_boot, "n_sites": len(sites),
            "auc": {a: boot.mean(a).to_dict() for a in BOOTSTRAP_ARMS},
            "differences": {f"{a} − {b}": boot.difference(a, b).to_dict() for a, b in pairs}}


def write_site_configs(out: Path, specs: Sequence[SiteSpec], public_key: str | os.PathLike, *,
                       first_seed: int = 0, site_overrides: dict[str, dict[str, Any]] | None = None,
                       **fields: Any) -> list[Path]:
    """``out/site_configs/<site>.toml`` of each simulated site (seed ``first_seed + i``, ``fields``
    such as ``fine_tune_fraction`` for all, ``site_overrides[name or index]`` for one)."""
    from client.site_config import SiteConfig, write_site_config
    from shared.plumbing.config import from_dict, to_dict

    paths = []
    for i, spec in enumerate(specs):
        extra = dict((site_overrides or {}).get(spec.name) or (site_overrides or {}).get(str(i)) or {})
        cfg = SiteConfig(name=spec.name, data_dir=spec.data_dir, state_dir=_site_state(Path(out), i),
                         public_key=Path(public_key).resolve(), seed=first_seed + i, **fields)
        if extra:
            merged = {**to_dict(cfg), **{k: str(v) if isinstance(v, Path) else v for k, v in extra.items()}}
            cfg = from_dict(SiteConfig, {k: v for k, v in merged.items() if v is not None},
                            source=f"site_overrides[{spec.name}]")
        paths.append(write_site_config(cfg, Path(out) / "site_configs" / f"{spec.name}.toml"))
    return paths


def check_splits(config_paths: Sequence[Path], min_sites: int) -> None:
    """Before any case is preprocessed: a site whose fine-tune split is below its minimum would
    refuse every round. Fewer than ``min_sites`` sites left to train is an error naming the flag
    that fixes it (the run could not succeed); otherwise the small sites are a warning.

    The same split as ``ichfed site check`` (``client.split_plan``) on each site's labelled cases.
    """
    from client.site_config import load_site_config
    from client.split_plan import (
        SPARE,
        more_cases_needed,
        plan_split,
        smallest_fraction,
    )
    from shared.imaging.sitedata import read_site

    short = []
    for path in config_paths:
        cfg = load_site_config(path)
        labels = {c.case_id: int(c.label) for c in read_site(cfg.data_dir, allow_unlabelled=True).labelled}
        plan = plan_split(labels, cfg.fine_tune_fraction, cfg.min_cases, cfg.seed)
        if plan.ready:
            continue
        fraction = smallest_fraction(labels, cfg.min_cases + SPARE, above=cfg.fine_tune_fraction)
        more = more_cases_needed(labels, cfg.fine_tune_fraction, cfg.min_cases + SPARE)
        fixes = ([f"--fine-tune-fraction {fraction:.2f}"] if fraction is not None else []) + (
            [f"--cases-per-site {len(labels) + more} (or {more} more labelled cases per site folder)"]
            if more is not None else [])
        short.append(f"{cfg.name}: {plan.n_fine_tune} fine-tune of {len(labels)} labelled cases at "
                     f"fine_tune_fraction {cfg.fine_tune_fraction:g}, below the minimum of {cfg.min_cases}"
                     + (f"; use {' or '.join(fixes)}" if fixes else ""))
    if len(config_paths) - len(short) < min_sites:
        raise IchfedError(f"{len(short)} of {len(config_paths)} site(s) too small to train (each would refuse every "
                          f"round; {min_sites} must train): " + "; ".join(short))
    for line in short:
        log.warning("site too small to train, left out of every round: %s", line)


def backend_config(n_nodes: int, cpus_per_site: float, device: str,
                   ray_address: str | None = None) -> dict[str, Any]:
    """Flower's Ray backend config: resources per virtual site, and how Ray is started.

    Without ``ray_address`` a private Ray instance gets this machine's CPUs; with it, Ray joins
    that cluster, which already knows its resources (Ray refuses ``num_cpus`` then).
    """
    from shared.plumbing.device import pick_device

    gpus = 0.0
    if pick_device(device).type == "cuda":
        import torch

        gpus = min(1.0, torch.cuda.device_count() / max(1, n_nodes))
    total_cpus = max(1, os.cpu_count() or 1)
    if ray_address:
        init_args: dict[str, Any] = {"address": ray_address}
        num_cpus = cpus_per_site
    else:
        # "local": a private instance even when `ray start` left a cluster address in /tmp/ray
        # (ray.init() without an address would join that cluster, and refuse num_cpus there).
        init_args = {"address": "local", "num_cpus": total_cpus, "num_gpus": 1 if gpus else 0,
                     "include_dashboard": False}
        num_cpus = min(cpus_per_site, total_cpus)
    return {"client_resources": {"num_cpus": num_cpus, "num_gpus": gpus}, "init_args": init_args}


def run_apps(server_app, client_app, n_nodes: int, cpus_per_site: float, device: str,
             ray_address: str | None = None) -> None:
    """Run ``server_app`` and ``client_app`` on Flower's simulation engine, in this process.

    Flower's public Python API (``flwr.simulation.run_simulation``) keeps the apps in this process:
    no FAB to build, and the ServerApp's report is on disk when it returns. Flower 1.42 marks that
    entry point deprecated in favour of ``flwr run``; the notice is about the entry point, not the
    engine, so it is dropped from the console and log (``_FlowerEntryPointNotice``) and noted once
    at DEBUG. An ``IchfedError`` raised inside an app comes out as itself.
    """
    from flwr.simulation import run_simulation

    from shared.plumbing.logs import quiet_flower

    quiet_flower()  # Flower's records reach the console once (and by default only the log file)
    notice = _FlowerEntryPointNotice()
    flower_log = logging.getLogger("flwr")
    flower_log.addFilter(notice)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_nodes, backend_name="ray",
                       backend_config=backend_config(n_nodes, cpus_per_site, device, ray_address))
    except RuntimeError as e:
        cause = e.__cause__
        if isinstance(cause, IchfedError):
            raise cause from None
        raise
    finally:
        flower_log.removeFilter(notice)
        _shutdown_ray(ray_address)


class _FlowerEntryPointNotice(logging.Filter):
    """Drops Flower's "`run_simulation` is deprecated, use `flwr run`" banner (logged once at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "DEPRECATED FEATURE" in text and "`run_simulation`" in text:
            log.debug("Flower notes that its Python simulation entry point is deprecated in favour of `flwr run`")
            return False
        return True


def _shutdown_ray(ray_address: str | None) -> None:
    """Disconnect from Ray: a private instance stops, a cluster given by address keeps running."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception as e:  # shutting down is best effort; the run's outcome is already known
        log.debug("ray.shutdown: %s", e)
