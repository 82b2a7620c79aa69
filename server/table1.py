"""Table 1 of a federation from the sites' stats replies: per site and pooled, with no data moved.

Pooling sums the sites' fixed-bin histograms; medians and IQRs are interpolated linearly inside
the bin where the cumulative count crosses the quantile, so each is known to within the width
of that bin (reported as its precision). A quantile that falls in an open outer bin is given as
a bound (``≥ 150``). Counts and bins the sites suppressed (fewer than their
``min_cases_for_metrics``) are absent from the sums; the table says how many cases each
histogram holds, so the reader sees what was withheld.
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from typing import Any

from shared.federation import stats_protocol as S
from shared.plumbing.atomic import write_json, write_text

log = logging.getLogger(__name__)

QUANTITIES = (("hist-ich-ml", "ICH volume"), ("hist-phe-ml", "PHE volume"),
              ("hist-ich-hu", "ICH mean density"), ("hist-phe-hu", "PHE mean density"))


def parse_reply(site: str, metrics: dict[str, Any], reasons: dict[str, str],
                scanner: dict[str, list]) -> dict[str, Any]:
    """One site's stats reply as plain data: ``{"site", "counts", "classes", "scanner", "withheld"}``.

    A histogram of the wrong length, or anything that is not a whole non-negative count, is
    dropped (and logged): a site cannot make the pooled column negative or fractional.
    """
    out: dict[str, Any] = {"site": site, "counts": {}, "classes": {c: {"counts": {}, "hist": {}} for c in S.CLASSES},
                           "scanner": {}, "withheld": sorted(reasons)}
    for key, value in metrics.items():
        parts = S.split_key(key)
        if parts is None:
            log.warning("stats: site %s sent an unknown key %s; ignored", site, key)
            continue
        cls, metric = parts
        if not all(_is_count(v) for v in (value if isinstance(value, list) else [value])):
            log.warning("stats: site %s: %s is not made of whole non-negative counts; dropped", site, key)
            continue
        if metric in S.HISTOGRAMS:
            if not isinstance(value, list) or len(value) != S.n_bins(S.HISTOGRAMS[metric]):
                log.warning("stats: site %s: histogram %s has the wrong shape; dropped", site, key)
                continue
            out["classes"][cls]["hist"][metric] = [int(v) for v in value]
        elif cls is None:
            out["counts"][metric] = int(value)
        else:
            out["classes"][cls]["counts"][metric] = int(value)
    for field in S.SCANNER_FIELDS:
        labels, counts = scanner.get(field), scanner.get(f"{field}.n")
        if isinstance(labels, list) and isinstance(counts, list) and len(labels) == len(counts) \
                and all(_is_count(n) for n in counts):
            out["scanner"][field] = {str(lab): int(n) for lab, n in zip(labels, counts)}
    return out


def _is_count(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and float(v) == int(v)


def pool(sites: list[dict[str, Any]]) -> dict[str, Any]:
    """The all-sites column: counts and histograms summed over the sites that sent them."""
    pooled: dict[str, Any] = {"site": "all sites", "counts": {}, "scanner": {},
                              "classes": {c: {"counts": {}, "hist": {}} for c in S.CLASSES}}
    for s in sites:
        for k, v in s["counts"].items():
            pooled["counts"][k] = pooled["counts"].get(k, 0) + v
        for cls in S.CLASSES:
            mine, theirs = pooled["classes"][cls], s["classes"][cls]
            for k, v in theirs["counts"].items():
                mine["counts"][k] = mine["counts"].get(k, 0) + v
            for k, h in theirs["hist"].items():
                old = mine["hist"].get(k, [0] * len(h))
                mine["hist"][k] = [a + b for a, b in zip(old, h)]
        for field, cats in s["scanner"].items():
            dest = pooled["scanner"].setdefault(field, {})
            for label, n in cats.items():
                dest[label] = dest.get(label, 0) + n
    pooled["withheld_at"] = _withheld_at(sites)
    return pooled


def _withheld_at(sites: list[dict[str, Any]]) -> dict[str, int]:
    """For each count and histogram of the pooled column, how many sites did not send it (they
    suppressed it, or the class it belongs to): the pooled sum lacks their cases.

    A site with no case of a class sends that class's ``n`` as 0 and nothing else: it is
    complete (its other counts are 0), not withheld.
    """
    out: dict[str, int] = {}
    for metric in S.SITE_COUNTS:
        out[metric] = sum(1 for s in sites if metric not in s["counts"])
    for cls in S.CLASSES:
        for metric in (*S.CLASS_COUNTS, *(name for name, _ in QUANTITIES)):
            missing = 0
            for s in sites:
                block = s["classes"][cls]
                if block["counts"].get(S.N) == 0:
                    continue
                missing += metric not in block["counts"] and metric not in block["hist"]
            out[f"{cls}.{metric}"] = missing
    return {k: v for k, v in out.items() if v}


def quantile(counts: list[int], edges: tuple[float, ...], q: float) -> dict[str, Any] | None:
    """The ``q`` quantile of a fixed-bin histogram, linearly interpolated in its bin.

    Returns ``{"value", "precision"}`` (precision: the bin's width), or ``{"bound": "≥ x" | "< x"}``
    when it falls in an open outer bin; None for an empty histogram.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cum = 0.0
    for i, c in enumerate(counts):
        if c > 0 and cum + c >= rank:
            if i == 0:
                return {"bound": f"< {edges[0]:g}"}
            if i == len(counts) - 1:
                return {"bound": f"≥ {edges[-1]:g}"}
            lo, hi = edges[i - 1], edges[i]
            return {"value": lo + (rank - cum) / c * (hi - lo), "precision": hi - lo}
        cum += c
    return None


def summarise(column: dict[str, Any]) -> dict[str, Any]:
    """Median and IQR of every histogram of one column (a site or the pool), by class."""
    out: dict[str, Any] = {}
    for cls in S.CLASSES:
        for name, _ in QUANTITIES:
            h = column["classes"][cls]["hist"].get(name)
            if h is None:
                continue
            edges = S.HISTOGRAMS[name]
            out.setdefault(cls, {})[name] = {"n": sum(h), **{q: quantile(h, edges, p) for q, p in
                                                            (("q1", 0.25), ("median", 0.5), ("q3", 0.75))}}
    return out


def build_table1(sites: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """The whole Table 1 document: per site, pooled, and their medians/IQRs."""
    pooled = pool(sites)
    for col in [*sites, pooled]:
        col["summary"] = summarise(col)
        n = col["counts"].get(S.N)
        n_neo = col["classes"]["neoplastic"]["counts"].get(S.N)
        partial = col is pooled and {S.N, f"neoplastic.{S.N}"} & set(pooled.get("withheld_at", {}))
        col["prevalence"] = (n_neo / n) if n and n_neo is not None and not partial else None
    return {"run": run, "sites": sites, "pooled": pooled,
            "bins": {name: list(S.HISTOGRAMS[name]) for name, _ in QUANTITIES}}


def _q(v: dict[str, Any] | None) -> str:
    if v is None:
        return "–"
    return v["bound"] if "bound" in v else f"{v['value']:.1f}"


def _cell(summary: dict[str, Any] | None, unit: str) -> str:
    if not summary:
        return "withheld"
    m = summary["median"] or {}
    prec = f" ±{m['precision'] / 2:g}" if "precision" in m else ""
    return f"{_q(summary['median'])}{prec} [{_q(summary['q1'])}–{_q(summary['q3'])}] {unit} (n={summary['n']})"


def _count(v: int | None, withheld_at: int = 0, n_sites: int = 0) -> str:
    """A count; "withheld" for a suppressed one, never 0. A pooled sum lacking ``withheld_at``
    sites' values is a lower bound and says so."""
    if v is None or (withheld_at and not v):
        return "withheld" if not withheld_at or withheld_at >= n_sites else f"withheld at {withheld_at} of {n_sites} sites"
    return f"≥ {v} (withheld at {withheld_at} of {n_sites} sites)" if withheld_at else str(v)


def _counter(table: dict[str, Any]):
    """``count(column, value, key)``: a site's cell as sent, the pooled cell with what it lacks."""
    pooled = table["pooled"]
    n_sites = len(table["sites"])

    def count(col: dict[str, Any], value: int | None, key: str) -> str:
        if col is pooled:
            return _count(value, pooled.get("withheld_at", {}).get(key, 0), n_sites)
        return _count(value)

    return count


def rows(table: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(row label, one cell per column) for every row of the table; columns are the sites then the pool."""
    cols = [*table["sites"], table["pooled"]]
    count = _counter(table)
    withheld = table["pooled"].get("withheld_at", {})
    out = [("cases", [count(c, c["counts"].get(S.N), S.N) for c in cols]),
           ("neoplastic, n (prevalence)", [
               count(c, c["classes"]["neoplastic"]["counts"].get(S.N), f"neoplastic.{S.N}")
               + (f" ({100 * c['prevalence']:.0f}%)" if c.get("prevalence") is not None else "") for c in cols]),
           ("measured on reference masks", [count(c, c["counts"].get(S.N_FROM_MASKS), S.N_FROM_MASKS) for c in cols]),
           ("unusable cases", [count(c, c["counts"].get(S.N_UNUSABLE), S.N_UNUSABLE) for c in cols])]
    for cls in S.CLASSES:
        out.append((f"**{cls}**", ["" for _ in cols]))
        for name, label in ((S.N_NO_LESION, "no lesion segmented"),
                            *zip(S.LESIONS, ("ICH lesions = 1", "ICH lesions = 2", "ICH lesions = 3 or more"))):
            out.append((f"{cls}: {label}", [count(c, c["classes"][cls]["counts"].get(name), f"{cls}.{name}")
                                            for c in cols]))
        for name, label in QUANTITIES:
            unit = S.HISTOGRAM_UNITS[name]
            lacking = withheld.get(f"{cls}.{name}", 0)
            out.append((f"{cls}: {label}, median ±precision [IQR]",
                        [_cell(c["summary"].get(cls, {}).get(name), unit)
                         + (f" (withheld at {lacking} of {len(cols) - 1} sites)"
                            if c is table["pooled"] and lacking and c["summary"].get(cls, {}).get(name) else "")
                         for c in cols]))
    for field in S.SCANNER_FIELDS:
        labels = sorted({lab for c in cols for lab in c["scanner"].get(field, {})})
        for lab in labels:
            out.append((f"scanner {field}: {lab}", [_count(c["scanner"].get(field, {}).get(lab)) for c in cols]))
    return out


def markdown(table: dict[str, Any]) -> str:
    """Table 1 as Markdown, one column per site and one for all sites."""
    names = [s["site"] for s in table["sites"]] + ["all sites"]
    lines = ["# ichfed Table 1 (federated: counts and fixed-bin histograms only)\n",
             f"- sites: {', '.join(names[:-1])}; bundle `{str(table['run'].get('bundle_hash', ''))[:16]}`",
             "- medians and IQRs are interpolated inside fixed bins: ± is half the width of the median's bin; "
             "`withheld` marks counts a site suppressed (fewer than its `min_cases_for_metrics`); "
             "histograms lack the cases of suppressed bins (their n says how many they hold)\n",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows(table)]
    return "\n".join(lines) + "\n\n![Volume distributions by site and class](table1_volumes.png)\n"


def to_html(table: dict[str, Any]) -> str:
    """Table 1 as a self-contained HTML page with the volume distributions plotted beside it."""
    names = [s["site"] for s in table["sites"]] + ["all sites"]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["", *names])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip('*'))}</td>" for c in [label, *cells]) + "</tr>"
                   for label, cells in rows(table))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>ichfed Table 1</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
            "img{max-width:100%}</style></head><body><h1>ichfed Table 1</h1>"
            "<p>Federated: each site sent counts and fixed-bin histograms only. Medians and IQRs are interpolated "
            "inside the bins (± half the bin width); <em>withheld</em> marks what a site suppressed.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            "<h2>Volume distributions by site and class</h2>"
            "<img src='table1_volumes.png' alt='ICH and PHE volume histograms by site and class'></body></html>\n")


def plot_volumes(table: dict[str, Any], path: str | os.PathLike) -> None:
    """ICH and PHE volume histograms (share of each site's cases per bin), one panel per quantity and class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report_arms import _save  # the report's one PNG writer

    names = ("hist-ich-ml", "hist-phe-ml")
    fig, axes = plt.subplots(len(names), len(S.CLASSES), figsize=(6 * len(S.CLASSES), 3.6 * len(names)), squeeze=False)
    edges = S.VOLUME_EDGES_ML
    # The open bin below the first edge (0 ml) is always empty for a volume, so it is not drawn.
    labels = [f"{a:g}–{b:g}" for a, b in zip(edges, edges[1:])] + [f"≥{edges[-1]:g}"]
    for i, name in enumerate(names):
        for j, cls in enumerate(S.CLASSES):
            ax = axes[i][j]
            cols = [*table["sites"], table["pooled"]]
            width = 0.8 / len(cols)
            drawn = False
            for k, col in enumerate(cols):
                h = col["classes"][cls]["hist"].get(name)
                if not h or not sum(h):
                    continue
                drawn = True
                h = h[1:]
                x = [b + (k - len(cols) / 2) * width + width / 2 for b in range(len(h))]
                ax.bar(x, [v / sum(h) for v in h], width=width, label=f"{col['site']} (n={sum(h)})",
                       color="black" if col is table["pooled"] else None)
            ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
            ax.set(title=f"{dict(QUANTITIES)[name]}, {cls}", xlabel="ml", ylabel="share of cases", ylim=(0, 1))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            if not drawn:
                ax.text(0.5, 0.5, _why_empty(table, cls), ha="center", va="center", wrap=True, fontsize=9,
                        transform=ax.transAxes)
    _save(fig, path)


def _why_empty(table: dict[str, Any], cls: str) -> str:
    """Why a panel of the volume figure has no bars."""
    if all(s["classes"][cls]["counts"].get(S.N) == 0 for s in table["sites"]):
        return f"no {cls} cases at any site"
    return (f"withheld at every site:\neach volume bin held fewer {cls} cases\n"
            "than the site's min_cases_for_metrics")


def write_table1(table: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``table1.json``, ``table1.md``, ``table1.html`` and ``table1_volumes.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "table1.json", "markdown": out / "table1.md", "html": out / "table1.html",
             "volumes": out / "table1_volumes.png"}
    write_json(paths["json"], table)
    plot_volumes(table, paths["volumes"])
    write_text(paths["markdown"], markdown(table))
    write_text(paths["html"], to_html(table))
    log.info("table 1 written to %s", out)
    return paths
