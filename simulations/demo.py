"""The three steps of ``ichfed demo`` (``make demo``) on the built-in synthetic default.

1. ``reference_bundle``: reference nnU-Net + ResNet-34 on the synthetic development site
   (charite-like), signed bundle and Table-2-style report (``ichfed bootstrap --profile``). Cached:
   a second run reuses it once it still verifies.
2. ``federate``: three external simulated hospitals fine-tune the last layer with Flower's
   simulation engine (``ichfed simulate``); the report holds the four arms and their differences.
3. ``read_one_case``: one case of a simulated site read as ``ichfed predict --site-config`` reads
   it, through ``client.site_predictor.open_predictor``: the site's active model (the federated
   bundle if the site adopted it) with the site overlay's threshold, calibration and BatchNorm
   statistics.

This module computes; the CLI (``ichfed/commands/demo.py``) prints, so the simulations do not
depend on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from shared.plumbing.errors import IchfedError
from shared.prediction import PredictionResult

log = logging.getLogger(__name__)

SITE_PROFILES = ("hamburg-like", "community-hospital", "lowdose-mobile")
NEAR_CHANCE_AUC = 0.6  # a validation AUC below this is a reference that has learnt next to nothing
MANY_FLAGS_SHARE = 0.25  # a segmenter that flags more than this share of validation cases is off its scanner
EXAMPLE_TRIES = 5  # cases read while looking for an unflagged example (each is a full prediction)


@dataclasses.dataclass(frozen=True)
class Reference:
    """The signed reference bundle, its development keys and its bootstrap report."""

    bundle_dir: Path
    public_key: Path
    signing_key: Path
    report: dict[str, Any]
    reused: bool  # found in the output folder and verified, not trained now


@dataclasses.dataclass(frozen=True)
class CaseReading:
    """One case read by a site: the result, the bundle and site config it was read with, and the
    site's active-model record (``client.adoption.ActiveModel``; None if the site has none)."""

    result: PredictionResult
    bundle_dir: Path
    site_config: Path
    active: Any
    n_read: int = 1  # cases read to find an unflagged example (the others were flagged)


def reference_bundle(out: Path, profile: str, seed: int) -> Reference:
    """Bootstrap the reference bundle into ``out/bundle``, or reuse a cached one that still verifies."""
    from server.bootstrap import get_recipe
    from shared.bundle import load_bundle
    from shared.plumbing.logs import flush_tallies
    from shared.security.keys import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME
    from simulations.reference import bootstrap_development

    out = Path(out).resolve()
    bundle_dir, key_dir, report_path = out / "bundle", out / "bundle-keys", out / "bundle-report.json"
    reused = report_path.is_file() and bundle_dir.is_dir()
    if reused:
        load_bundle(bundle_dir, key_dir / PUBLIC_KEY_NAME)  # a cached bundle must still verify
        report = json.loads(report_path.read_text(encoding="utf-8"))
    else:
        report = bootstrap_development(get_recipe(profile), out=bundle_dir, work_dir=out / "bundle-work", seed=seed)
        flush_tallies()  # repeated case-level conditions of the development site, once each
    return Reference(bundle_dir, key_dir / PUBLIC_KEY_NAME, key_dir / PRIVATE_KEY_NAME, report, reused)


def reference_warnings(report: dict[str, Any]) -> list[str]:
    """One line per reason not to trust the reference bundle, from its bootstrap report's validation part.

    Examples
    --------
    >>> reference_warnings({"validation": {"auc": 0.55, "n_scored": 40, "flagged_share": 0.1, "n_cases": 40}})[0][:48]
    'the reference classifier is near chance: validat'
    >>> reference_warnings({"validation": {"auc": 0.9, "n_scored": 40, "flagged_share": 0.0, "n_cases": 40}})
    []
    """
    val = report.get("validation") or {}
    lines = []
    auc = val.get("auc")
    if auc is None:
        lines.append("the reference classifier could not be judged: its validation part lacks one of the classes")
    elif auc < NEAR_CHANCE_AUC:
        lines.append(f"the reference classifier is near chance: validation AUC {auc:.2f} on {val.get('n_scored')} "
                     f"cases (< {NEAR_CHANCE_AUC}); its readings below are not evidence of anything")
    share = val.get("flagged_share")
    if share is not None and share > MANY_FLAGS_SHARE:
        lines.append(f"the reference segmenter flags {share:.0%} of its {val.get('n_cases')} validation cases "
                     f"(> {MANY_FLAGS_SHARE:.0%}): many readings will say 'not reliable, review'")
    return lines


def federate(out: Path, ref: Reference, *, rounds: int, cases_per_site: int, profile: str,
             seed: int) -> dict[str, Any]:
    """Federate ``SITE_PROFILES`` in ``out/federation``; returns the simulation report."""
    from simulations.flower_sim import run as simulate

    return simulate(federation_dir(out), ref.bundle_dir, ref.public_key, rounds, profiles=list(SITE_PROFILES),
                    n_sites=len(SITE_PROFILES), cases_per_site=cases_per_site, scale=profile, seed=seed,
                    signing_key=ref.signing_key)


def federation_dir(out: Path) -> Path:
    """Where ``federate`` runs: sites, server state, report."""
    return Path(out).resolve() / "federation"


def read_one_case(sim_out: Path, fallback_bundle: Path) -> CaseReading:
    """A typical case of a simulated site of ``sim_out``, read as that site reads it: the first of the site's
    last ``EXAMPLE_TRIES`` cases that no plausibility check flags (else the last case, flagged as it is).

    ``open_predictor(None, site_config=...)`` is ``ichfed predict --site-config`` without
    ``--bundle``: the site's active model (``client.adoption``: the federated bundle if the site
    adopted it, else the model it was given), verified with the site's key, with the site's overlay
    for it (threshold, calibration, BatchNorm statistics). The site is the first (by config name)
    that adopted the federated bundle, else the first. A site without an active model (a run that
    ended early) reads the federated bundle, or ``fallback_bundle`` when the run wrote none.
    """
    from client.adoption import active_model
    from client.site_config import load_site_config
    from client.site_predictor import open_predictor
    from shared.bundle import bundle_hash
    from shared.imaging.sitedata import read_site

    sim_out = Path(sim_out)
    configs = sorted(sim_out.glob("site_configs/*.toml"))
    if not configs:
        raise IchfedError(f"{sim_out}: no site configs; run the federation step first")
    federated = _final_bundle(sim_out)
    federated_hash = bundle_hash(federated) if federated is not None else None
    sites = [(path, load_site_config(path)) for path in configs]
    actives = {path: active_model(site.state_dir) for path, site in sites}
    path, site = next(((p, s) for p, s in sites
                       if actives[p] is not None and actives[p].bundle_hash == federated_hash), sites[0])
    cases = sorted(read_site(site.data_dir, allow_unlabelled=True).cases, key=lambda c: c.case_id)
    if not cases:
        raise IchfedError(f"{site.data_dir}: no cases to read")
    bundle = None if actives[path] is not None else (federated or Path(fallback_bundle))
    predictor = open_predictor(bundle, site_config=path)
    result, n_read = None, 0
    for case in reversed(cases[-EXAMPLE_TRIES:]):
        result, n_read = predictor.predict(case.image_path), n_read + 1
        if not result.flagged:
            break
        log.info("example case %s is flagged (%s); trying another", case.case_id, ", ".join(result.quality_flags))
    return CaseReading(result, Path(predictor.bundle.path), path, actives[path], n_read)


def _final_bundle(sim_out: Path) -> Path | None:
    """The federated bundle the server wrote, if the run produced one."""
    candidates = sorted((sim_out / "server").glob("**/manifest.json"))
    return candidates[-1].parent if candidates else None
