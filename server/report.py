"""The run report: ``report.json`` plus ``report.md`` / ``report.html`` with ROC curves and
confusion matrices as PNG, and the paper-style table.

The report compares four arms on the same held-out splits (``server/report_arms.py``):
(a) the reference bundle before fine-tuning (its own threshold), (b) the same head at each
site's out-of-sample threshold, (c) last-layer fine-tuning at each site alone (the paper's
approach), (d) federated last-layer fine-tuning. AUC is the primary comparison: pooled from
score histograms, meta-analysed with DeLong variances, and as paired differences with CIs.

Everything here comes from the aggregates the sites sent; a site's metrics withheld for too
few cases appear as "withheld" with the reason. A failed run's report says so first, with the
reason, then shows what was done until then. Sites are "name (node id)" everywhere.

This renders the JSON of ``server.records.RunReport`` (``report.json``), because ``ichfed
federate report`` re-renders a report from disk.
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from typing import Any

from shared.federation import protocol as P
from shared.plumbing.atomic import atomic_path, write_json, write_text

from . import records
from . import report_arms as arms
from .report_segmenter import segmenter_lines

log = logging.getLogger(__name__)

FINAL_MODELS = arms.ARMS
_COLS = ("auc", "accuracy", "sensitivity", "specificity", "threshold")


def paper_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the paper-style table: pooled per model, then per site and model."""
    rows = []
    final = report.get("final") or {}
    pooled = final.get("pooled") or {}
    for model, title in FINAL_MODELS:
        m = pooled.get(model) or {}
        # The all-sites AUC is the histogram-pooled one; a report without it shows n/a.
        rows.append({"name": f"{title} — all sites", "model": model, "site": None, **m, "auc": m.get("pooled_auc")})
    for site in final.get("sites", []):
        for model, title in FINAL_MODELS:
            m = site.get(model) or {}
            rows.append({"name": f"{site_label(site)}: {title}", "model": model, "site": site_label(site), **m})
    return rows


def paper_table_markdown(report: dict[str, Any]) -> str:
    """The paper-style Markdown table (n, AUC, accuracy, sensitivity, specificity, threshold)."""
    lines = ["| Model | Site | n | AUC | Accuracy | Sensitivity | Specificity | Threshold |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in paper_rows(report):
        title = dict(FINAL_MODELS)[row["model"]]
        if row.get("withheld"):
            cells = ["withheld"] * 5
        else:
            cells = [_f(row.get(k)) for k in _COLS]
        lines.append(f"| {title} | {row['site'] or 'all sites'} | {row.get('n', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rounds_table_markdown(report: dict[str, Any]) -> str:
    """Per-round table: the global head on each site's held-out split, and pooled."""
    lines = ["| Round | Site | Update | n | AUC | Accuracy | Sensitivity | Specificity |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for rnd in report.get("rounds", []):
        train = {row["site"]: row for row in rnd.get("train", {}).get("sites", [])}
        for row in rnd.get("evaluate", {}).get("sites", []):
            m = row.get(P.MODEL_GLOBAL) or {}
            t = train.get(row["site"], {})
            upd = t.get("status", "-") + (f" ({t['reason']})" if t.get("reason") else "")
            cells = ["withheld"] * 4 if m.get("withheld") else [_f(m.get(k)) for k in _COLS[:4]]
            lines.append(f"| {rnd['round']} | {site_label(row)} | {upd} | {m.get('n', '')} | " + " | ".join(cells) + " |")
        pooled = rnd.get("evaluate", {}).get("pooled") or {}
        pooled = {**pooled, "auc": pooled.get("pooled_auc")}
        lines.append(f"| {rnd['round']} | **pooled** | | {pooled.get('n', '')} | "
                     + " | ".join(_f(pooled.get(k)) for k in _COLS[:4]) + " |")
    return "\n".join(lines) + "\n"


def site_label(row: dict[str, Any]) -> str:
    """A site as "name (node 123)": the name is the site's own claim, the node ID is the one its
    SuperNode key authenticated, so two sites sending one name can still be told apart."""
    return records.site_label(row["site"], row.get("node_id"))


def _sites_line(run: dict[str, Any]) -> str:
    nodes = run.get("site_nodes") or {}
    return ", ".join(records.site_label(name, nodes.get(name)) for name in run.get("sites", []))


def failure_lines(report: dict[str, Any]) -> list[str]:
    """The top of a failed run's report: that it failed, and why (empty for a finished run)."""
    run = report.get("run", {})
    if run.get("status") != "failed":
        return []
    done = len(report.get("rounds") or [])
    return [f"> **This run failed**: {run.get('failure') or 'no reason recorded'}",
            f"> It completed {done} of {run.get('num_rounds')} round(s); what follows is what was done until then.\n"]


def distribution_lines(report: dict[str, Any]) -> list[str]:
    """Who held, received or refused the bundle (refusals with their reasons)."""
    d = report.get("distribution") or {}
    if not d:
        return []
    out = [f"- bundle: {len(d.get('had', []))} site(s) had it, {len(d.get('received', []))} received it, "
           f"{len(d.get('refused', []))} refused"]
    out += [f"  - refused: {label}: {(d.get('reasons') or {}).get(label, '')}" for label in d.get("refused", [])]
    return out


def flagged_lines(report: dict[str, Any]) -> list[str]:
    """Zero-change, replayed and duplicate updates (``server.updates``), one line each."""
    out = []
    for rnd in report.get("rounds", []):
        for row in (rnd.get("train") or {}).get("sites", []):
            for flag in row.get("flags") or []:
                out.append(f"- round {rnd['round']}: {site_label(row)} ({row.get('status')}): {flag}")
    return out


def _f(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html``, ``roc.png`` and ``confusion.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html",
             "roc": out / "roc.png", "confusion": out / "confusion.png",
             "pooled_roc": out / "pooled_roc.png", "reliability": out / "reliability.png"}
    write_json(paths["json"], report)
    has_final = bool((report.get("final") or {}).get("sites"))
    if has_final:
        plot_roc(report, paths["roc"])
        plot_confusion(report, paths["confusion"])
    paths["rounds_plot"] = out / "rounds.png"
    for key, plot in (("pooled_roc", arms.plot_pooled_roc), ("reliability", arms.plot_report_reliability)):
        if not (has_final and plot(report, paths[key])):
            paths.pop(key)
    if not plot_rounds(report, paths["rounds_plot"]):
        paths.pop("rounds_plot")
    write_text(paths["markdown"], markdown(report, has_final))
    write_text(paths["html"], to_html(report, has_final))
    if not has_final:
        paths.pop("roc"), paths.pop("confusion")
    log.info("report written to %s", out)
    return paths


def markdown(report: dict[str, Any], with_figures: bool = True) -> str:
    """The Markdown report."""
    run = report.get("run", {})
    parts = [
        "# ichfed federated fine-tuning report\n",
        *failure_lines(report),
        f"- run: `{run.get('run_id', '')}`; bundle: `{run.get('bundle_hash', '')[:16]}` → final bundle: "
        f"`{(report.get('final_bundle') or {}).get('hash', 'not written')[:16]}`",
        f"- rounds: {run.get('num_rounds')}; sites: {_sites_line(run)}; "
        f"min-sites: {run.get('min_sites')}; seed: {run.get('seed')}",
        f"- resumed from round: {run.get('resumed_from_round', 0)}",
        *distribution_lines(report),
        "",
        "## Four arms on the same held-out cases\n",
        arms.PRIMARY_NOTE + "\n",
        arms.arms_table_markdown(report),
        "\n" + arms.verdict(report) + "\n",
        arms.comparisons_table_markdown(report),
        *arms.bootstrap_lines(report),
        *arms.zero_operating_point_lines(report),
        *arms.no_lesion_lines(report),
        *arms.adoption_lines(report),
        "\n## Per site (all-sites rows: pooled AUC from histograms)\n",
        paper_table_markdown(report),
    ]
    if with_figures:
        hist = arms.has_histograms(report)
        parts += (["\n![Pooled ROC](pooled_roc.png)\n"] if hist else []) + [
            "\n![ROC curves per site](roc.png)\n", "![Confusion matrices](confusion.png)\n"] + (
            ["![Reliability](reliability.png)\n"] if hist else [])
    parts += ["\n### Reliability of the federated head's p(neoplastic), pooled held-out cases\n",
              arms.reliability_table_markdown(report)]
    reasons = _reasons(report)
    if reasons:
        parts += ["\n### Withheld or undefined metrics\n"] + [f"- {r}" for r in reasons] + [""]
    flagged = flagged_lines(report)
    if flagged:
        parts += ["\n### Flagged updates\n"] + flagged + [""]
    parts += segmenter_lines(report)
    parts += ["\n## Rounds: global head on each site's held-out split\n", rounds_table_markdown(report)]
    if report.get("rounds"):  # written whenever there are rounds (write_report, plot_rounds)
        parts += ["\n![Per-round AUC, training loss, update norm and head bytes](rounds.png)\n"]
    return "\n".join(parts)


def _reasons(report: dict[str, Any]) -> list[str]:
    out = []
    for site in (report.get("final") or {}).get("sites", []):
        for key, code in sorted((site.get("reasons") or {}).items()):
            out.append(f"{site_label(site)}: {key}: {code}")
    return out


def to_html(report: dict[str, Any], with_figures: bool = True) -> str:
    """The same report as a self-contained HTML page (PNGs linked beside it)."""
    def table(md: str) -> str:
        lines = md.strip().splitlines()
        rows = [line.strip().strip("|").split("|") for line in lines if line.startswith("|")]
        notes = "".join(f"<p>{html.escape(line[2:])}</p>" for line in lines if line.startswith("- "))
        head, body = rows[0], rows[2:]
        th = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip().strip('*'))}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>{notes}"

    run = report.get("run", {})
    hist = with_figures and arms.has_histograms(report)
    figs = (('<h3>Pooled ROC</h3><img src="pooled_roc.png" alt="Pooled ROC">' if hist else "")
            + '<h3>ROC curves per site</h3><img src="roc.png" alt="ROC curves">'
            '<h3>Confusion matrices</h3><img src="confusion.png" alt="Confusion matrices">'
            + ('<h3>Reliability</h3><img src="reliability.png" alt="Reliability diagram">' if hist else "")
            ) if with_figures else ""
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in _reasons(report))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ichfed run report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
        "img{max-width:100%}</style></head><body>"
        "<h1>ichfed federated fine-tuning report</h1>"
        + "".join(f"<p><strong>{html.escape(line.lstrip('> ').replace('**', ''))}</strong></p>"
                  for line in failure_lines(report))
        + f"<p>run <code>{html.escape(str(run.get('run_id', '')))}</code>, "
        f"bundle <code>{html.escape(run.get('bundle_hash', '')[:16])}</code>, rounds {run.get('num_rounds')}, "
        f"sites {html.escape(_sites_line(run))}, seed {run.get('seed')}</p>"
        "<h2>Four arms on the same held-out cases</h2>"
        f"<p>{html.escape(arms.PRIMARY_NOTE.replace('**', ''))}</p>"
        + table(arms.arms_table_markdown(report)) + f"<p>{html.escape(arms.verdict(report))}</p>"
        + table(arms.comparisons_table_markdown(report))
        + "".join(f"<p>{html.escape(line.strip()[2:])}</p>" for line in [*arms.bootstrap_lines(report),
                                                                         *arms.zero_operating_point_lines(report),
                                                                         *arms.no_lesion_lines(report),
                                                                         *arms.adoption_lines(report)])
        + "<h2>Per site</h2>" + table(paper_table_markdown(report)) + figs
        + "<h3>Reliability of the federated head</h3>" + table(arms.reliability_table_markdown(report))
        + (f"<h3>Withheld or undefined metrics</h3><ul>{reasons}</ul>" if reasons else "")
        + ("<h3>Flagged updates</h3><ul>" + "".join(f"<li>{html.escape(x[2:])}</li>" for x in flagged_lines(report))
           + "</ul>" if flagged_lines(report) else "")
        + "".join(_html_part(x, table) for x in segmenter_lines(report))
        + "<h2>Rounds</h2>" + table(rounds_table_markdown(report))
        + ('<img src="rounds.png" alt="Per-round AUC, training loss, update norm and head bytes">'
           if report.get("rounds") else "")
        + "</body></html>\n"
    )


def _html_part(md: str, table) -> str:
    """One item of a Markdown section as HTML: a table, a heading or a line."""
    text = md.strip()
    if text.startswith("|"):
        return table(text)
    if text.startswith("#"):
        return f"<h2>{html.escape(text.lstrip('#').strip())}</h2>"
    return f"<p>{html.escape(text.lstrip('- '))}</p>" if text else ""


def plot_roc(report: dict[str, Any], path: str | os.PathLike) -> None:
    """One panel per model; a curve per site (TPR at the protocol's fixed FPR grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = report["final"]["sites"]
    fig, axes = plt.subplots(1, len(FINAL_MODELS), figsize=(5 * len(FINAL_MODELS), 4.6), squeeze=False)
    for ax, (model, title) in zip(axes[0], FINAL_MODELS):
        for site in sites:
            m = site.get(model) or {}
            tpr = m.get(P.ROC_TPR)
            if tpr:
                auc = m.get("auc")
                ax.plot(P.ROC_FPR_GRID, tpr, marker=".",
                        label=f"{site_label(site)} (AUC {auc:.2f})" if auc is not None else site_label(site))
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(title=title, xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_confusion(report: dict[str, Any], path: str | os.PathLike) -> None:
    """2x2 confusion matrices: one row per site plus the pooled row, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    final = report["final"]
    rows = [(site_label(s), s) for s in final["sites"]] + [("all sites", {m: {**(final.get("pooled") or {}).get(m, {}),
                                                                          **((final.get("pooled") or {}).get(m, {}).get("confusion") or {})}
                                                                       for m, _ in FINAL_MODELS})]
    fig, axes = plt.subplots(len(rows), len(FINAL_MODELS), figsize=(3.2 * len(FINAL_MODELS), 2.8 * len(rows)), squeeze=False)
    for i, (name, data) in enumerate(rows):
        for j, (model, title) in enumerate(FINAL_MODELS):
            ax = axes[i][j]
            m = data.get(model) or {}
            ax.set_xticks([0, 1], ["pred non-neo", "pred neo"], fontsize=7)
            ax.set_yticks([0, 1], ["non-neo", "neo"], fontsize=7)
            ax.set_title(f"{name}\n{title}", fontsize=8)
            if m.get("tp") is None:
                ax.text(0.5, 0.5, "withheld" if m.get("withheld") else "n/a", ha="center", va="center", transform=ax.transAxes)
                ax.set_xlim(-0.5, 1.5), ax.set_ylim(1.5, -0.5)
                continue
            mat = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
            ax.imshow(mat, cmap="Blues", vmin=0)
            for (y, x), v in np.ndenumerate(mat):
                ax.text(x, y, str(int(v)), ha="center", va="center",
                        color="white" if v > mat.max() / 2 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_rounds(report: dict[str, Any], path: str | os.PathLike) -> bool:
    """Across rounds: the global head's pooled and mean-site AUC on the held-out splits, the
    case-weighted training loss, the mean and largest update norm, and the head payload bytes
    exchanged (the same figures as the ``round_finished`` events). False when there are no rounds."""
    from .run_progress import round_metrics

    rounds = [records.RoundRecord.from_dict(r) for r in report.get("rounds") or []]
    if not rounds:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.round for r in rounds]
    ms = [round_metrics(r) for r in rounds]

    def series(key):
        return [float("nan") if m.get(key) is None else m[key] for m in ms]

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6), squeeze=False)
    panels = [
        ("global head AUC, held-out", [("pooled AUC (histograms)", "global_pooled_auc"),
                                       ("mean site AUC", "global_mean_site_auc")], (0, 1.02)),
        ("training loss (case-weighted)", [("loss", "train_loss_weighted")], None),
        ("head update norm", [("mean", "update_norm_mean"), ("max", "update_norm_max")], None),
        ("head payload bytes", [("sent to sites", "head_bytes_sent"), ("received", "head_bytes_received")], None),
    ]
    for ax, (title, lines, ylim) in zip(axes[0], panels):
        for label, key in lines:
            ys = series(key)
            if all(y != y for y in ys):  # NaN everywhere: a legend entry without points says why instead
                ax.plot([], [], " ", label=f"{label}: none ({_why_missing(rounds[-1], key)})")
            else:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set(title=title, xlabel="round")
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_xticks(xs)
        ax.legend(fontsize=7)
    arms._save(fig, path)
    return True


def _why_missing(record: records.RoundRecord, key: str) -> str:
    """Why a per-round figure has no value, for its legend entry (the pooled evaluation's reason)."""
    reasons = (record.pooled.values.get("reasons") if record.pooled is not None else None) or {}
    why = reasons.get({"global_pooled_auc": "pooled_auc", "global_mean_site_auc": "mean_site_auc"}.get(key, ""))
    if why:
        return why
    return ("sites withheld their metrics: too few held-out cases" if "auc" in key
            else "no site sent an accepted update")
