"""Combine one model's held-out metrics across sites, from the aggregates the sites sent.

Per model (arm) this yields:

- pooled accuracy / sensitivity / specificity from summed confusion counts, at the arm's own
  threshold policy, and the same for the intention-to-treat confusion (cases without a
  segmented lesion scored as predicted non-neoplastic) next to the count of such cases;
- ``pooled_auc``: a true pooled ROC/AUC built from the sites' per-class score histograms
  (fixed bins; a site sends them only above the minimum case count);
- ``auc_meta``: fixed-effect and DerSimonian-Laird random-effects AUC with 95 % CIs from each
  site's AUC and DeLong variance (the random-effects CI Hartung-Knapp's with few sites);
- for a model that carries paired differences (the federated and local heads): the primary
  endpoint ``minus_reference_mean`` / ``minus_local_mean``, the mean of the sites' within-site
  AUC differences with equal site weights and a t interval from their spread
  (``rocstats.site_mean``; cases never leave a site, so no case-level bootstrap is possible
  here), and, secondary, ``minus_reference_meta`` / ``minus_local_meta``, their meta-analysis;
- ``mean_site_auc``: the case-weighted mean of site AUCs, named for what it is (older reports
  called it "auc");
- ``zero_operating_point``: the sites (and "pooled") where the arm's sensitivity or specificity
  at its threshold is 0, a model that calls every case one class.

Every pooled figure keeps the per-site values behind it (``sites``: site name, estimate and,
where there is one, variance). Undefined summaries are None with a short reason in ``reasons``.
"""

from __future__ import annotations

from typing import Any

from shared.evaluation.calibration import reliability_from_histograms
from shared.evaluation.rocstats import (
    meta_analysis,
    meta_analysis_auc,
    pooled_roc,
    site_mean,
)
from shared.federation import protocol as P
from shared.plumbing.errors import IchfedError

# (output key, estimate metric, variance metric) of every meta-analysed quantity.
META_TARGETS = (
    ("auc_meta", "auc", "auc-var"),
    ("minus_reference_meta", "auc-minus-reference", "auc-minus-reference-var"),
    ("minus_local_meta", "auc-minus-local", "auc-minus-local-var"),
)
# (output key, paired-difference metric) of the primary endpoint: equal-weight mean over sites.
MEAN_TARGETS = (
    ("minus_reference_mean", "auc-minus-reference"),
    ("minus_local_mean", "auc-minus-local"),
)
_CONF = ("tp", "fp", "tn", "fn")


def pool_model(site_rows: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """Everything the report shows for ``model`` across ``site_rows`` (see the module doc)."""
    named = [(str(r.get("site", f"site-{i}")), r[model]) for i, r in enumerate(site_rows)
             if r.get(model) and not r[model].get("withheld")]
    rows = [m for _, m in named]
    reasons: dict[str, str] = {}
    out: dict[str, Any] = {"n_sites": len(rows), "n": sum(int(m.get("n") or 0) for m in rows)}
    out.update(_confusion_summary(rows, ""))
    out["n_no_lesion"] = sum(int(m.get("n-no-lesion") or 0) for m in rows)
    out["quality_flags"] = _flag_counts(rows)
    itt = _confusion_summary(rows, "itt-")
    out["itt"] = itt if itt["confusion"] is not None else None
    aucs = [(float(m["auc"]), int(m["n"])) for m in rows if m.get("auc") is not None and m.get("n")]
    out["mean_site_auc"] = sum(a * n for a, n in aucs) / sum(n for _, n in aucs) if aucs else None
    if not aucs:
        reasons["mean_site_auc"] = "no site reported an AUC"
    out["site_aucs"] = [{"site": name, "auc": m.get("auc"), "variance": m.get("auc-var"), "n": m.get("n")}
                        for name, m in named]
    out.update(_pooled_histograms(rows, reasons))
    for key, est, var in META_TARGETS:
        out[key] = _meta(named, est, var, key, reasons)
    for key, est in MEAN_TARGETS:
        out[key] = _site_mean(named, est, key, reasons)
    out["zero_operating_point"] = _zero_operating_points(named, out)
    out["reasons"] = reasons
    return out


def _site_mean(named: list[tuple[str, dict[str, Any]]], est: str, key: str,
               reasons: dict[str, str]) -> dict[str, Any] | None:
    """The equal-weight mean of the sites' ``est`` values with its t interval, and those values."""
    values = [(name, float(m[est])) for name, m in named if m.get(est) is not None]
    if not values:
        if any(est in m for _, m in named):
            reasons[key] = f"no site sent '{est}'"
        return None
    res = site_mean([v for _, v in values]).to_dict()
    res["sites"] = [{"site": name, "estimate": v} for name, v in values]
    if res["k"] == 1:
        reasons[key] = "one site: no between-site spread, no interval"
    return res


def _zero_operating_points(named: list[tuple[str, dict[str, Any]]], pooled: dict[str, Any]) -> list[dict[str, Any]]:
    """Where the arm's sensitivity or specificity at its threshold is 0 (per site, and pooled)."""
    out = []
    for name, m in [*named, ("pooled", pooled)]:
        zero = [k for k in ("sensitivity", "specificity") if m.get(k) is not None and float(m[k]) == 0.0]
        if zero:
            out.append({"site": name, "zero": zero})
    return out


def _flag_counts(rows: list[dict[str, Any]]) -> dict[str, int] | None:
    """Held-out cases with any quality flag ("any") and per flag, summed over the sites that sent them."""
    sent = [m for m in rows if m.get(P.N_FLAGGED) is not None]
    if not sent:
        return None
    return {"any": sum(int(m[P.N_FLAGGED]) for m in sent)} | {
        key[len("flag-"):]: sum(int(m.get(key) or 0) for m in sent) for key in P.QUALITY_METRICS if key != P.N_FLAGGED}


def _confusion_summary(rows: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    with_conf = [m for m in rows if m.get(prefix + "tp") is not None]
    conf = {k: sum(int(m.get(prefix + k) or 0) for m in with_conf) for k in _CONF}
    total = sum(conf.values())
    pos, neg = conf["tp"] + conf["fn"], conf["tn"] + conf["fp"]
    return {
        "confusion": conf if with_conf else None,
        "accuracy": (conf["tp"] + conf["tn"]) / total if total else None,
        "sensitivity": conf["tp"] / pos if pos else None,
        "specificity": conf["tn"] / neg if neg else None,
    }


def _pooled_histograms(rows: list[dict[str, Any]], reasons: dict[str, str]) -> dict[str, Any]:
    hists = [(m[P.HIST_NEG], m[P.HIST_POS]) for m in rows if m.get(P.HIST_NEG) and m.get(P.HIST_POS)]
    out: dict[str, Any] = {"pooled_auc": None, "pooled_roc": None, "hist_sites": len(hists),
                           "hist_neg": None, "hist_pos": None, "reliability": None}
    if not hists:
        reasons["pooled_auc"] = "no site sent score histograms"
        return out
    try:
        roc = pooled_roc(hists)
    except IchfedError as exc:
        reasons["pooled_auc"] = str(exc)
        return out
    neg = [int(sum(h[0][i] for h in hists)) for i in range(len(hists[0][0]))]
    pos = [int(sum(h[1][i] for h in hists)) for i in range(len(hists[0][1]))]
    out.update(pooled_auc=roc.auc, pooled_roc={"fpr": roc.fpr, "tpr": roc.tpr}, pooled_n_pos=roc.n_pos,
               pooled_n_neg=roc.n_neg, hist_neg=neg, hist_pos=pos,
               reliability=[list(p) for p in reliability_from_histograms(neg, pos)])
    if roc.auc is None:
        reasons["pooled_auc"] = "the pooled histograms lack a class"
    return out


def _meta(named: list[tuple[str, dict[str, Any]]], est: str, var: str, key: str,
          reasons: dict[str, str]) -> dict[str, Any] | None:
    trios = [(name, float(m[est]), float(m[var])) for name, m in named
             if m.get(est) is not None and m.get(var) is not None]
    if not trios:
        if any(est in m for _, m in named) or est == "auc":
            reasons[key] = f"no site sent both '{est}' and '{var}'"
        return None
    try:
        # An AUC lives in [0, 1]: pooled on the logit scale; a difference of AUCs on its own scale.
        pool = meta_analysis_auc if est == "auc" else meta_analysis
        return {**pool([e for _, e, _ in trios], [v for _, _, v in trios]).to_dict(),
                "scale": "logit" if est == "auc" else "raw",
                "sites": [{"site": n, "estimate": e, "variance": v} for n, e, v in trios]}
    except IchfedError as exc:
        reasons[key] = str(exc)
        return None
