"""Statistics and text of ``bench_federation.py``: endpoints with hierarchical-bootstrap CIs, the
pilot's design, the headroom check and the Markdown result.

The primary endpoint is the mean over the simulated sites (equal weights) of the within-site AUC
difference federated (converged fit) - reference on the same held-out cases, averaged over the
replicates and cohort seeds; its 95 % CI resamples sites, then each site's cases within each
cohort (``shared.evaluation.site_bootstrap``). Every figure keeps the per-site values behind it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

PRIMARY = ("federated-converged", "reference")
DIFFERENCES = (
    PRIMARY,
    ("federated-converged", "local-converged"),
    ("federated-paper", "reference"),
    ("federated-paper", "local-paper"),
    ("federated-fedprox", "reference"),
    ("local-converged", "reference"),
    ("local-paper", "reference"),
    ("local-stats-refit", "reference"),
    ("federated-stats-refit", "reference"),
    ("federated-converged", "oracle-central-12"),
    ("oracle-site-300", "reference"),
    ("oracle-central-12", "reference"),
    ("oracle-central-300", "reference"),
    ("volume-baseline", "reference"),
    ("development-scanner", "reference"),
)
GAPS = (("federated-converged", "oracle-central-300"), ("federated-paper", "oracle-central-300"),
        ("federated-converged", "oracle-site-300"), ("federated-converged", "oracle-central-12"))
NO_HEADROOM = 0.02  # site oracle within this of the reference: "no headroom for a last layer"
TARGET_AUC_GAIN = 0.03
TARGET_GAP = 0.70
Z_POWER = 2.8015852  # z_0.975 + z_0.80


def endpoints(boot, alpha: float = 0.05) -> dict[str, Any]:
    """Mean AUC of every model, the paired differences and the oracle gaps, each with its CI and site values."""
    out: dict[str, Any] = {"auc": {m: boot.mean(m, alpha).to_dict() for m in boot.models}, "differences": {},
                           "gap_closed": {}}
    for a, b in DIFFERENCES:
        if a in boot.models and b in boot.models:
            out["differences"][f"{a} − {b}"] = boot.difference(a, b, alpha).to_dict()
    for arm, oracle in GAPS:
        if arm in boot.models and oracle in boot.models:
            out["gap_closed"][f"({arm} − reference) / ({oracle} − reference)"] = \
                boot.gap_closed(arm, "reference", oracle, alpha).to_dict()
    return out


def headroom(boot) -> dict[str, Any]:
    """The site oracle's gain over the reference, per site and on average; within 0.02 the verdict is
    "no headroom for a last layer" (a federated − reference figure there says nothing about federation)."""
    if "oracle-site-300" not in boot.models:
        return {}
    i, r = boot.models.index("oracle-site-300"), boot.models.index("reference")

    def verdict(gain: float) -> str:
        return "no headroom for a last layer" if gain <= NO_HEADROOM else "headroom"

    sites = {name: {"oracle_minus_reference": float(row[i] - row[r]), "verdict": verdict(float(row[i] - row[r]))}
             for name, row in zip(boot.names, boot.point)}
    mean = float(np.mean([v["oracle_minus_reference"] for v in sites.values()]))
    return {"sites": sites, "mean": mean, "verdict": verdict(mean)}


def replicate_values(per_replicate: dict, names: list[str], arm: str, other: str) -> list[list[float]]:
    """Per cohort seed, per replicate: the equal-weight mean over ``names`` of AUC(arm) - AUC(other)."""
    out = []
    for seed_rows in per_replicate.values():
        reps = len(next(iter(seed_rows.values()))[arm]["auc"])
        out.append([float(np.mean([seed_rows[n][arm]["auc"][r] - seed_rows[n][other]["auc"][r] for n in names]))
                    for r in range(reps)])
    return out


def design(values: list[list[float]], se_total: float, se_cases: float, *, target: float = TARGET_AUC_GAIN,
           max_replicates: int = 2000) -> dict[str, Any]:
    """The pilot's design for detecting ``target`` at 80 % power (two-sided 5 %).

    The SE of the primary endpoint has a part that replicates average away (the spread of the
    per-replicate endpoint, ``sigma_rep``) and one they do not (sites and held-out cases):
    SE(R)^2 = SE_fixed^2 + sigma_rep^2 / (R C). The detectable difference is 2.80 SE(R); the design
    takes the fewest replicates R that bring it to ``target``, or says that none does and how many
    held-out cases per site the case-level part would need (it scales as 1/n).
    """
    n_seeds = len(values)
    reps = [len(v) for v in values]
    var_rep = statistics.fmean(statistics.variance(v) for v in values if len(v) > 1) if max(reps) > 1 else 0.0
    pilot_r = min(reps)
    fixed2 = max(se_total**2 - var_rep / (pilot_r * n_seeds), 0.0)

    def mdd(r: int) -> float:
        return Z_POWER * math.sqrt(fixed2 + var_rep / (r * n_seeds))

    needed = next((r for r in range(2, max_replicates + 1) if mdd(r) <= target), None)
    out = {"target": target, "pilot_replicates": pilot_r, "cohort_seeds": n_seeds,
           "sd_between_replicates": math.sqrt(var_rep), "se_pilot": se_total, "se_cases_only": se_cases,
           "se_fixed_part": math.sqrt(fixed2), "detectable_difference_pilot": Z_POWER * se_total,
           "replicates_needed": needed, "detectable_difference_at_100": mdd(100),
           "detectable_difference_floor": Z_POWER * math.sqrt(fixed2),
           "label": "detectable difference = 2.80 x SE from the pilot's hierarchical bootstrap and replicate "
                    "variance (80 % power, two-sided 5 %)"}
    if needed is None:
        site2 = max(fixed2 - se_cases**2, 0.0)
        room = (target / Z_POWER) ** 2 - site2
        out["note"] = ("no number of replicates reaches the target: the sites and held-out cases alone give "
                       f"{out['detectable_difference_floor']:.3f}")
        out["held_out_scale_needed"] = (se_cases**2 / room) if room > 0 else None
    return out


def balanced_accuracy(per_replicate: dict, names: list[str], arms: list[str]) -> dict[str, Any]:
    """Mean balanced accuracy (sensitivity + specificity) / 2 at each arm's own threshold, per site and overall."""
    out = {}
    for arm in arms:
        per_site = {}
        for n in names:
            vals = [0.5 * (se + sp) for seed_rows in per_replicate.values()
                    for se, sp in zip(seed_rows[n][arm]["sensitivity"], seed_rows[n][arm]["specificity"])
                    if se is not None and sp is not None]
            per_site[n] = statistics.fmean(vals) if vals else None
        ok = [v for v in per_site.values() if v is not None]
        out[arm] = {"mean_over_sites": statistics.fmean(ok) if ok else None, "sites": per_site}
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #20's targets, each with its measured value and whether it was met."""
    d = result["endpoints"]["differences"]
    prim = d.get(f"{PRIMARY[0]} − {PRIMARY[1]}") or {}
    vs_local = d.get("federated-converged − local-converged") or {}
    gap = result["endpoints"]["gap_closed"].get("(federated-converged − reference) / (oracle-central-300 − reference)")
    mdd = result["design_check"].get("detectable_difference_actual")
    no_room = (result.get("headroom") or {}).get("verdict") == "no headroom for a last layer"
    rows = [
        ("federated − reference ≥ +0.03" + (" (no headroom for a last layer)" if no_room else ""),
         prim.get("estimate"), lambda v: v >= TARGET_AUC_GAIN),
        ("federated − reference: 95 % CI above 0", prim.get("ci_low"), lambda v: v > 0),
        ("federated ≥ local-only", vs_local.get("estimate"), lambda v: v >= 0),
        ("federated closes ≥ 70 % of the centralised oracle's gain", (gap or {}).get("estimate"),
         lambda v: v >= TARGET_GAP),
        ("detectable difference ≤ 0.03", mdd, lambda v: v <= TARGET_AUC_GAIN),
    ]
    return [{"target": name, "value": v, "met": None if v is None else bool(ok(v))} for name, v, ok in rows]


def _ci(e: dict[str, Any] | None, signed: bool = False) -> str:
    if not e or e.get("estimate") is None:
        return "n/a"
    f = "{:+.3f}" if signed else "{:.3f}"
    est = f.format(e["estimate"])
    if e.get("ci_low") is None:
        return est
    return f"{est} [{f.format(e['ci_low'])}, {f.format(e['ci_high'])}]"


def render(result: dict[str, Any]) -> str:
    """The Markdown result."""
    d, e = result["design"], result["endpoints"]
    lines = [f"# Does federation help a new hospital? ({result['created_utc']})", "",
             f"Bundle `{result['bundle']['hash'][:12]}` ({result['bundle']['name']} {result['bundle']['version']}); "
             f"{len(d['simulated_sites'])} simulated sites × {d['cases']} cases ({d['masks']} masks, {d['scale']} "
             f"scale), cohort seeds {d['seeds']}, {d['replicates']} replicates of {d['fine_tune']} stratified "
             f"fine-tune cases per site, {d['rounds']} rounds, {d['cross_fit_folds']} cross-fit folds"
             + (f"; real-background site {d['real_site']} on its own line." if d.get("real_site") else "."), "",
             "Primary endpoint: mean over sites (equal weights) of the within-site AUC difference on the same held-out "
             "cases; 95 % CI from a hierarchical bootstrap (sites, then cases within each site and cohort).", "",
             "| Model | mean within-site AUC [95 % CI] | balanced accuracy at its threshold |", "|---|---:|---:|"]
    ba = result.get("balanced_accuracy", {})
    for m, v in e["auc"].items():
        b = (ba.get(m) or {}).get("mean_over_sites")
        lines.append(f"| {m} | {_ci(v)} | {'–' if b is None else f'{b:.3f}'} |")
    lines += ["", "| Paired difference | estimate [95 % CI] | per site |", "|---|---:|---|"]
    for name, v in e["differences"].items():
        sites = ", ".join(f"{k} {x:+.3f}" for k, x in v["site_values"].items() if x is not None)
        lines.append(f"| {name} | {_ci(v, True)} | {sites} |")
    lines += ["", "| Share of the oracle gap closed | estimate [95 % CI] |", "|---|---:|"]
    lines += [f"| {k} | {_ci(v)} |" for k, v in e["gap_closed"].items()]
    h = result["headroom"]
    lines += ["", f"Headroom (site oracle − reference): mean {h['mean']:+.3f}"
              + (" — **no headroom for a last layer**: the federated − reference figure is not a verdict on "
                 "federation" if h["verdict"] != "headroom" else "") + "; " + "; ".join(
        f"{k} {v['oracle_minus_reference']:+.3f}" + (" (no headroom for a last layer)" if v["verdict"] != "headroom"
                                                     else "") for k, v in h["sites"].items())]
    real = result.get("real_site")
    if real:
        lines += ["", f"Real-background site {real['name']} (cases resampled, one site): " + "; ".join(
            f"{k} {_ci(v, True)}" for k, v in real["differences"].items())]
    dc = result["design_check"]
    lines += ["", f"Detectable difference this run had: {dc.get('detectable_difference_actual', float('nan')):.3f} "
              f"({dc['label']})."]
    if dc.get("pilot"):
        p = dc["pilot"]
        lines.append(f"Pilot design: {p.get('replicates_needed') or 'no'} replicates needed for ≥ {p['target']} "
                     f"(pilot: {p['pilot_replicates']} replicates, detectable {p['detectable_difference_pilot']:.3f}"
                     f"; floor {p['detectable_difference_floor']:.3f}).")
    lines += ["", "| Target | measured | met |", "|---|---:|---|"]
    for t in result["targets"]:
        v = "n/a" if t["value"] is None else f"{t['value']:+.3f}"
        lines.append(f"| {t['target']} | {v} | {'n/a' if t['met'] is None else 'yes' if t['met'] else 'no'} |")
    la = result["load_average"]
    w = result["wall_s"]
    lines += ["", f"Wall time {w['total']} s with {w['jobs']} worker process(es), the feature cache included where it "
              f"was built; load average at start {la['start']}, at end {la['end']}."]
    return "\n".join(lines) + "\n"
