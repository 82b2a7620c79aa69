"""`ichfed simulate --repeats K`: the same federation with K split seeds, reported as mean ± SD.

Two runs of one setting can differ by more than the effect being claimed, so a headline figure
is never one run. Each repeat keeps the cohorts (and so the sites' cached features: the cache is
keyed by image content and bundle) and changes only the seed of every site's fine-tune /
held-out split. Each repeat's report is kept in ``out/repeats/split-seed-<s>/``; the summary
(``out/repeats/summary.json`` and ``summary.md``) gives mean ± SD over the repeats of every
headline figure of every arm.
"""

from __future__ import annotations

import logging
import shutil
import statistics
from pathlib import Path
from typing import Any, Sequence

from shared.federation import protocol as P
from shared.plumbing.atomic import write_json, write_text

log = logging.getLogger(__name__)

# (name, path inside report["final"]["pooled"][arm]) of the headline figures of one arm.
HEADLINE = (
    ("pooled AUC", ("pooled_auc",)),
    ("AUC fixed effect", ("auc_meta", "fixed", "estimate")),
    ("AUC fixed CI low", ("auc_meta", "fixed", "ci_low")),
    ("AUC fixed CI high", ("auc_meta", "fixed", "ci_high")),
    ("AUC random effects", ("auc_meta", "random", "estimate")),
    ("AUC random CI low", ("auc_meta", "random", "ci_low")),
    ("AUC random CI high", ("auc_meta", "random", "ci_high")),
    ("mean of site AUCs", ("mean_site_auc",)),
    ("accuracy", ("accuracy",)),
    ("sensitivity", ("sensitivity",)),
    ("specificity", ("specificity",)),
    ("ITT sensitivity", ("itt", "sensitivity")),
    ("ITT specificity", ("itt", "specificity")),
    # The primary paired endpoint: mean of within-site differences, equal site weights (t CI).
    ("AUC − reference (mean of sites)", ("minus_reference_mean", "estimate")),
    ("AUC − reference mean CI low", ("minus_reference_mean", "ci_low")),
    ("AUC − reference mean CI high", ("minus_reference_mean", "ci_high")),
    ("AUC − local (mean of sites)", ("minus_local_mean", "estimate")),
    ("AUC − local mean CI low", ("minus_local_mean", "ci_low")),
    ("AUC − local mean CI high", ("minus_local_mean", "ci_high")),
    ("AUC − reference (random)", ("minus_reference_meta", "random", "estimate")),
    ("AUC − reference CI low", ("minus_reference_meta", "random", "ci_low")),
    ("AUC − reference CI high", ("minus_reference_meta", "random", "ci_high")),
    ("AUC − local (random)", ("minus_local_meta", "random", "estimate")),
    ("AUC − local CI low", ("minus_local_meta", "random", "ci_low")),
    ("AUC − local CI high", ("minus_local_meta", "random", "ci_high")),
)


def headline(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{arm: {figure: value}}`` of one run's report; figures the run did not produce are left out."""
    pooled = (report.get("final") or {}).get("pooled") or {}
    out: dict[str, dict[str, float]] = {}
    for arm in P.FINAL_ARMS:
        figures = {}
        for name, path in HEADLINE:
            v: Any = pooled.get(arm)
            for step in path:
                v = v.get(step) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                figures[name] = float(v)
        out[arm] = figures
    return out


def summarise(reports: Sequence[dict[str, Any]], split_seeds: Sequence[int]) -> dict[str, Any]:
    """Mean, SD (n - 1) and the per-repeat values of every headline figure of every arm."""
    per_run = [headline(r) for r in reports]
    arms: dict[str, dict[str, Any]] = {}
    for arm in P.FINAL_ARMS:
        arms[arm] = {}
        for name, _ in HEADLINE:
            values = [h[arm][name] for h in per_run if name in h[arm]]
            if not values:
                continue
            arms[arm][name] = {"mean": statistics.fmean(values),
                               "sd": statistics.stdev(values) if len(values) > 1 else None,
                               "n": len(values), "values": values}
    return {"n_repeats": len(reports), "split_seeds": list(split_seeds), "arms": arms}


def summary_markdown(summary: dict[str, Any]) -> str:
    """One row per arm and figure: mean ± SD over the repeats."""
    lines = [f"Mean ± SD over {summary['n_repeats']} split seeds {summary['split_seeds']} "
             "(same cohorts and cached features; only the fine-tune / held-out split changes).", "",
             "| Arm | Figure | mean ± SD | repeats |", "|---|---|---:|---:|"]
    for arm, figures in summary["arms"].items():
        for name, f in figures.items():
            sd = "n/a" if f["sd"] is None else f"{f['sd']:.3f}"
            lines.append(f"| {arm} | {name} | {f['mean']:.3f} ± {sd} | {f['n']} |")
    return "\n".join(lines) + "\n"


def run_repeats(out: str | Path, bundle, public_key, rounds: int, repeats: int, *, split_seed: int = 0,
                **kwargs: Any) -> dict[str, Any]:
    """Run ``simulations.flower_sim.run`` ``repeats`` times with split seeds ``split_seed + r``.

    ``kwargs`` go to ``flower_sim.run`` (its ``seed`` fixes the cohorts for every repeat).
    Writes every repeat's report and the summary under ``out/repeats``; returns the summary.
    """
    from simulations.flower_sim import run as simulate

    out = Path(out).resolve()
    seeds = [split_seed + r for r in range(repeats)]
    reports = []
    for s in seeds:
        log.info("repeat with split seed %d of %s", s, seeds)
        reports.append(simulate(out, bundle, public_key, rounds, split_seed=s, **kwargs))
        kept = out / "repeats" / f"split-seed-{s}"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(out / "report", kept)
    summary = summarise(reports, seeds)
    write_json(out / "repeats" / "summary.json", summary)
    write_text(out / "repeats" / "summary.md", summary_markdown(summary))
    return summary
