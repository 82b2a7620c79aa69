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

from shared.evaluation.rocstats import detectable_difference
from shared.federation import protocol as P
from shared.plumbing.atomic import atomic_path

ARMS = (
    (P.MODEL_REFERENCE, "Before fine-tuning (reference bundle)"),
    (P.MODEL_REFERENCE_SITE, "Before fine-tuning, site threshold"),
    (P.MODEL_LOCAL, "Local-only last-layer fine-tuning"),
    (P.MODEL_FEDERATED, "Federated last-layer fine-tuning"),
)
# (model, pooled key, title) of the paired differences.
COMPARISONS = (
    (P.MODEL_FEDERATED, "minus_reference_meta", "Federated − reference"),
    (P.MODEL_FEDERATED, "minus_local_meta", "Federated − local-only"),
    (P.MODEL_LOCAL, "minus_reference_meta", "Local-only − reference"),
)

PRIMARY_NOTE = (
    "**AUC is the primary comparison**: it does not depend on a threshold. Pooled AUC is built from "
    "the sites' per-class score histograms (50 fixed bins; ties within a bin count ½); the "
    "meta-analytic AUC combines each site's AUC and DeLong variance (inverse-variance fixed effect "
    "and DerSimonian–Laird random effects, 95 % CI); \"mean of site AUCs\" is the case-weighted "
    "average and has no CI. Sensitivity and specificity are pooled from summed confusion counts at "
    "each arm's threshold: the bundle's for the first arm, the site's out-of-sample threshold "
    "(out-of-fold scores on its fine-tune split, cut midway between neighbouring scores) for the others."
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
    """One row per arm: pooled AUC, meta-analytic AUC with CIs, mean of site AUCs, sens/spec."""
    lines = [
        "| Arm | sites | n | Pooled AUC | AUC fixed effect (95 % CI) | AUC random effects (95 % CI) | I² "
        "| Mean of site AUCs | Sensitivity | Specificity | ITT sensitivity | ITT specificity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pooled = _pooled(report)
    for model, title in ARMS:
        m = pooled.get(model)
        if m is None:
            lines.append(f"| {title} | " + " | ".join(["n/a"] * 11) + " |")
            continue
        meta = m.get("auc_meta")
        itt = m.get("itt") or {}
        cells = [m.get("n_sites"), m.get("n"), _f(m.get("pooled_auc")), _ci(meta, "fixed"), _ci(meta, "random"),
                 _f((meta or {}).get("i2"), 2), _f(m.get("mean_site_auc", m.get("auc"))), _f(m.get("sensitivity")),
                 _f(m.get("specificity")), _f(itt.get("sensitivity")), _f(itt.get("specificity"))]
        lines.append(f"| {title} | " + " | ".join("n/a" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def comparisons_table_markdown(report: dict[str, Any]) -> str:
    """Paired AUC differences (DeLong per site, meta-analysed) with 95 % CIs, and the smallest
    difference this design detects (two-sided 5 %, 80 % power, from the random-effects SE).
    CIs are normal-theory and not clipped to [-1, 1]."""
    lines = ["| Paired AUC difference | sites | Fixed effect (95 % CI) | Random effects (95 % CI) | I² "
             "| Detectable difference (80 % power) |",
             "|---|---:|---:|---:|---:|---:|"]
    pooled = _pooled(report)
    for model, key, title in COMPARISONS:
        meta = (pooled.get(model) or {}).get(key)
        se = ((meta or {}).get("random") or {}).get("se")
        mdd = _f(detectable_difference(se)) if se is not None else "n/a"
        lines.append(f"| {title} | {_f((meta or {}).get('k'))} | {_ci(meta, 'fixed')} | {_ci(meta, 'random')} "
                     f"| {_f((meta or {}).get('i2'), 2)} | {mdd} |")
    return "\n".join(lines) + "\n"


def verdict(report: dict[str, Any]) -> str:
    """One sentence saying whether the federated head's AUC gain has a CI excluding 0."""
    fed = _pooled(report).get(P.MODEL_FEDERATED) or {}
    parts = []
    for key, other in (("minus_reference_meta", "the reference"), ("minus_local_meta", "local-only fine-tuning")):
        r = (fed.get(key) or {}).get("random")
        if not r:
            parts.append(f"vs {other}: not available")
        elif r["ci_low"] > 0:
            parts.append(f"better than {other} (random-effects CI excludes 0)")
        elif r["ci_high"] < 0:
            parts.append(f"worse than {other} (random-effects CI excludes 0)")
        else:
            parts.append(f"no detectable difference from {other} (CI includes 0)")
    return "Federated AUC: " + "; ".join(parts) + "."


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
