"""The four-arm comparison of the federation report: tables and figures.

Arms, all on the same held-out cases: the reference bundle at its own threshold; the
reference at the site's out-of-sample threshold; local-only fine-tuning; federated
fine-tuning. AUC is the primary comparison (it needs no threshold); sensitivity and
specificity depend on each arm's threshold policy and are secondary.

Everything comes from ``report["final"]["pooled"]`` as :mod:`server.pooling` builds it; a key
missing from an older report shows as "n/a".
"""

from __future__ import annotations

import os
from typing import Any

from shared.federation import protocol as P
from shared.plumbing.atomic import atomic_path

ARMS = (
    (P.MODEL_REFERENCE, "Before fine-tuning (reference bundle)"),
    (P.MODEL_REFERENCE_SITE, "Before fine-tuning, site threshold"),
    (P.MODEL_LOCAL, "Local-only last-layer fine-tuning"),
    (P.MODEL_FEDERATED, "Federated last-layer fine-tuning"),
)
# (model, other arm, title) of the paired differences; pooled keys "minus_<other>_mean" / "_meta".
COMPARISONS = (
    (P.MODEL_FEDERATED, "reference", "Federated − reference"),
    (P.MODEL_FEDERATED, "local", "Federated − local-only"),
    (P.MODEL_LOCAL, "reference", "Local-only − reference"),
)

PRIMARY_NOTE = (
    "**AUC is the primary comparison**: it does not depend on a threshold. The primary paired endpoint "
    "is the mean over sites, every site weighted the same, of the within-site AUC difference of two "
    "arms on the same held-out cases; its 95 % CI is a t interval (k − 1 degrees of freedom) from how "
    "much the sites' differences vary, because cases never leave a site. The random-effects "
    "meta-analysis of the same differences (DeLong variances; Hartung–Knapp CI with up to 20 sites) is "
    "secondary: its inverse-variance weights favour a site whose head barely changed. Pooled AUC is "
    "built from the sites' per-class score histograms (50 fixed bins; ties within a bin count ½); "
    "\"mean of site AUCs\" is the case-weighted average and has no CI. Sensitivity and specificity "
    "are pooled from summed confusion counts at each arm's threshold: the bundle's for the first arm, "
    "the site's out-of-sample threshold (out-of-fold scores on its fine-tune split, cut midway "
    "between neighbouring scores) for the others; ⚠ marks an arm whose sensitivity or specificity is 0 "
    "at its threshold (pooled or at a site)."
)


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _ci(meta: dict[str, Any] | None, which: str) -> str:
    e = (meta or {}).get(which)
    if not e:
        return "n/a"
    return f"{e['estimate']:.3f} ({e['ci_low']:.3f} to {e['ci_high']:.3f})"


def _pooled(report: dict[str, Any]) -> dict[str, Any]:
    return (report.get("final") or {}).get("pooled") or {}


def arms_table_markdown(report: dict[str, Any]) -> str:
    """One row per arm: pooled AUC, meta-analytic AUC with CIs, mean of site AUCs, sens/spec;
    ⚠ on an arm whose sensitivity or specificity is 0 at its threshold (pooled or at any site).

    "sites" and "n" count the sites and cases the pooled AUC used (those that sent score
    histograms); where sensitivity and specificity pool more sites, a note under the table says so.
    """
    lines = [
        "| Arm | sites (AUC) | n (AUC) | Pooled AUC | AUC fixed effect (95 % CI) | AUC random effects (95 % CI) | I² "
        "| Mean of site AUCs | Sensitivity | Specificity | ITT sensitivity | ITT specificity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pooled = _pooled(report)
    notes = []
    for model, title in ARMS:
        m = pooled.get(model)
        if m is None:
            lines.append(f"| {title} | " + " | ".join(["n/a"] * 11) + " |")
            continue
        meta = m.get("auc_meta")
        itt = m.get("itt") or {}
        mark = " ⚠" if m.get("zero_operating_point") else ""
        auc_sites, auc_n = _auc_counts(m)
        if auc_sites != m.get("n_sites"):
            notes.append(f"- {title}: the AUC columns use {auc_sites} site(s) ({auc_n} cases; the others sent no "
                         f"score histograms, too few cases); sensitivity and specificity pool {m.get('n_sites')} "
                         f"site(s) ({m.get('n')} cases).")
        cells = [auc_sites, auc_n, _f(m.get("pooled_auc")), _ci(meta, "fixed"), _ci(meta, "random"),
                 _f((meta or {}).get("i2"), 2), _f(m.get("mean_site_auc", m.get("auc"))), _f(m.get("sensitivity")),
                 _f(m.get("specificity")), _f(itt.get("sensitivity")), _f(itt.get("specificity"))]
        lines.append(f"| {title}{mark} | " + " | ".join("n/a" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _auc_counts(m: dict[str, Any]) -> tuple[Any, Any]:
    """Sites and cases behind an arm's pooled AUC (a report from before ``hist_sites``: all its sites)."""
    if "hist_sites" not in m:
        return m.get("n_sites"), m.get("n")
    n = (m.get("pooled_n_pos") or 0) + (m.get("pooled_n_neg") or 0)
    return m["hist_sites"], n if m["hist_sites"] else 0


def _mean_ci(res: dict[str, Any] | None) -> str:
    if not res:
        return "n/a"
    if res.get("ci_low") is None:
        return f"{res['estimate']:.3f} (one site: no CI)"
    return f"{res['estimate']:.3f} ({res['ci_low']:.3f} to {res['ci_high']:.3f})"


def _site_values(res: dict[str, Any] | None) -> str:
    return ", ".join(f"{s['site']} {s['estimate']:+.3f}" for s in (res or {}).get("sites") or []) or "n/a"


def comparisons_table_markdown(report: dict[str, Any]) -> str:
    """Paired AUC differences: the primary equal-weight mean of within-site differences with its
    t interval, the random-effects meta-analysis (Hartung–Knapp CI with few sites) and the
    per-site values behind both. CIs are not clipped to [-1, 1]."""
    lines = ["| Paired AUC difference | sites | Mean within-site difference, equal site weights (95 % CI) "
             "| Random effects (95 % CI) | I² | Per-site differences |",
             "|---|---:|---:|---:|---:|---|"]
    pooled = _pooled(report)
    for model, other, title in COMPARISONS:
        m = pooled.get(model) or {}
        mean, meta = m.get(f"minus_{other}_mean"), m.get(f"minus_{other}_meta")
        k = (mean or meta or {}).get("k")
        lines.append(f"| {title} | {_f(k)} | {_mean_ci(mean)} | {_ci(meta, 'random')} "
                     f"| {_f((meta or {}).get('i2'), 2)} | {_site_values(mean or meta)} |")
    return "\n".join(lines) + "\n"


def verdict(report: dict[str, Any]) -> str:
    """One sentence per comparison of the federated head, on the primary endpoint (the equal-weight
    mean of within-site differences; reports from before it fall back to random effects)."""
    fed = _pooled(report).get(P.MODEL_FEDERATED) or {}
    parts = []
    for other, name in (("reference", "the reference"), ("local", "local-only fine-tuning")):
        r = fed.get(f"minus_{other}_mean") or (fed.get(f"minus_{other}_meta") or {}).get("random")
        if not r:
            parts.append(f"vs {name}: not available")
        elif r.get("ci_low") is None:
            parts.append(f"vs {name}: {r['estimate']:+.3f} at one site (no interval)")
        elif r["ci_low"] > 0:
            parts.append(f"better than {name} ({r['estimate']:+.3f}, CI excludes 0)")
        elif r["ci_high"] < 0:
            parts.append(f"worse than {name} ({r['estimate']:+.3f}, CI excludes 0)")
        else:
            parts.append(f"no difference from {name} shown ({r['estimate']:+.3f}, CI includes 0)")
    return "Federated AUC: " + "; ".join(parts) + "."


def bootstrap_lines(report: dict[str, Any]) -> list[str]:
    """A simulation's case-level endpoints (``report["final"]["bootstrap"]``): the same equal-weight
    mean of within-site differences with a hierarchical bootstrap CI (sites, then cases)."""
    boot = (report.get("final") or {}).get("bootstrap")
    if not boot:
        return []
    out = [f"- case-level check (simulation: every site's held-out scores on this machine; {boot['n_sites']} sites, "
           f"{boot['n_boot']} hierarchical bootstrap resamples):"]
    for name, d in boot["differences"].items():
        ci = "" if d.get("ci_low") is None else f" ({d['ci_low']:+.3f} to {d['ci_high']:+.3f})"
        out.append(f"  - {name}: {d['estimate']:+.3f}{ci}" if d.get("estimate") is not None else f"  - {name}: n/a")
    return out


def zero_operating_point_lines(report: dict[str, Any]) -> list[str]:
    """One line per arm whose sensitivity or specificity at its threshold is 0 (pooled or at a site)."""
    out = []
    for model, title in ARMS:
        hits = (_pooled(report).get(model) or {}).get("zero_operating_point") or []
        if hits:
            where = "; ".join(f"{h['site']}: {' and '.join(h['zero'])} 0" for h in hits)
            out.append(f"- ⚠ {title}: {where} at its threshold (it calls every case one class there)")
    return out


def adoption_lines(report: dict[str, Any]) -> list[str]:
    """Per site: whether the federated bundle became the site's model, and if not why (a reason code)."""
    rows = [s for s in (report.get("final") or {}).get("sites", []) if s.get("adoption")]
    if not rows:
        return []
    out = ["- federated bundle at each site (no harm at adoption: compared with the site's current model on "
           "its own out-of-fold evidence):"]
    for s in rows:
        out.append(f"  - {s['site']}: {ADOPTION_TEXT.get(s['adoption'], s['adoption'])} (`{s['adoption']}`)")
    return out


ADOPTION_TEXT = {
    P.ADOPTION_ACTIVATED: "activated (now the site's model)",
    P.ADOPTION_CLEARLY_WORSE: "kept, not activated: clearly worse than the site's current model",
    P.ADOPTION_ZERO_OPERATING_POINT: "kept, not activated: sensitivity or specificity 0 at its site threshold",
    P.ADOPTION_INSUFFICIENT: "kept, not activated: too few fine-tune cases of a class to compare",
    P.ADOPTION_AWAITING_APPROVAL: "kept, awaiting the hospital's manual approval",
}


def no_lesion_lines(report: dict[str, Any]) -> list[str]:
    """Counts of held-out cases without a segmented lesion and the intention-to-treat rule."""
    pooled = _pooled(report)
    ref = pooled.get(P.MODEL_REFERENCE) or {}
    n = ref.get("n_no_lesion")
    return [f"- held-out cases with no segmented lesion: {_f(n)} (not scored by the classifier; the ITT columns "
            "count them as predicted non-neoplastic)", quality_flag_line(ref.get("quality_flags"))]


def quality_flag_line(counts: dict[str, int] | None) -> str:
    """Held-out cases whose segmentation failed a plausibility check, in total and per flag."""
    if not counts:
        return "- held-out cases with quality flags: n/a (no site reported them, or too few cases)"
    per_flag = ", ".join(f"{name} {n}" for name, n in counts.items() if name != "any" and n)
    return (f"- held-out cases with quality flags (segmentation to review): {counts.get('any', 0)}"
            + (f" ({per_flag})" if per_flag else ""))


def reliability_table_markdown(report: dict[str, Any], model: str = P.MODEL_FEDERATED) -> str:
    """Reliability of ``model``'s p(neoplastic) from pooled histograms: predicted vs observed per bin."""
    rel = (_pooled(report).get(model) or {}).get("reliability")
    lines = ["| p(neoplastic) bin mid | observed fraction neoplastic | n |", "|---:|---:|---:|"]
    if not rel:
        return "\n".join(lines + ["| n/a (no score histograms) | n/a | n/a |"]) + "\n"
    lines += [f"| {mid:.2f} | {frac:.2f} | {n} |" for mid, frac, n in rel]
    return "\n".join(lines) + "\n"


def has_histograms(report: dict[str, Any]) -> bool:
    """Whether any arm has pooled score histograms (so the pooled ROC and reliability figures exist)."""
    return any((m or {}).get("pooled_roc") for m in _pooled(report).values() if isinstance(m, dict))


def plot_pooled_roc(report: dict[str, Any], path: str | os.PathLike) -> bool:
    """Pooled ROC of every arm (from summed histograms) in one panel; False when none exists."""
    curves = [(title, m["pooled_roc"], m.get("pooled_auc")) for model, title in ARMS
              if (m := _pooled(report).get(model) or {}).get("pooled_roc")]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    for title, roc, auc in curves:
        ax.plot(roc["fpr"], roc["tpr"], label=f"{title} (pooled AUC {_f(auc)})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(title="Pooled ROC, all sites' held-out cases", xlabel="1 - specificity", ylabel="sensitivity",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)
    return True


def plot_reliability(points_by_label: dict[str, list], path: str | os.PathLike, title: str) -> bool:
    """Reliability diagram: observed fraction positive against predicted p, marker area ~ n."""
    series = {k: v for k, v in points_by_label.items() if v}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    for label, pts in series.items():
        xs, ys, ns = zip(*pts)
        ax.plot(xs, ys, marker="o", lw=1, label=label)
        ax.scatter(xs, ys, s=[8 + 4 * n for n in ns], alpha=0.3)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(title=title, xlabel="predicted p(neoplastic)", ylabel="observed fraction neoplastic", xlim=(0, 1),
           ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)
    return True


def plot_report_reliability(report: dict[str, Any], path: str | os.PathLike) -> bool:
    """Reliability of every arm's scores from the pooled histograms."""
    pooled = _pooled(report)
    return plot_reliability({title: (pooled.get(model) or {}).get("reliability") for model, title in ARMS
                             if model != P.MODEL_REFERENCE_SITE}, path, "Reliability, pooled held-out cases")


def _save(fig, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG atomically and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
