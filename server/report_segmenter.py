"""The report's segmenter section (issue 24): the segmenter rounds, the segmentation table per site and
what a round costs on the wire, rendered from ``report.json``'s ``segmenter`` entry.

The table has one row per site and segmenter arm (reference, federated, local-only), each scored on the
site's held-out cases: on those with a reference mask, mean ICH and PHE Dice, mean ICH components and the
share whose largest ICH component lies on the lesion; on all, the share with a plausibility flag, the
cases where no lesion was found, and the AUC the bundle's own head reaches on the crops this segmenter
gives (the segmenter's effect on the end-to-end AUC, the head held fixed). Means, not medians, leave a
site: a median of a few cases is one patient's value.
"""

from __future__ import annotations

from typing import Any

from shared.federation import protocol as P

from . import records

ARM_TITLES = {P.SEG_REFERENCE: "reference", P.SEG_FEDERATED: "federated", P.SEG_LOCAL: "local-only"}


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _flagged_share(m: dict[str, Any]) -> float | None:
    n, none, flagged = m.get("n"), m.get("n-no-lesion"), m.get(P.N_FLAGGED)
    if None in (n, none, flagged) or n + none == 0:
        return None
    return flagged / (n + none)


def segmentation_table_markdown(seg: dict[str, Any]) -> str:
    """Per site and segmenter arm: Dice, components, flags and the bundle head's AUC (see the module doc)."""
    lines = ["| Site | Segmenter | n masked | ICH Dice | PHE Dice | ICH components | Largest on lesion | "
             "Flagged share | No lesion | AUC (bundle head) | Site's choice |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    decisions = seg.get("decisions") or {}
    for row in seg.get("sites") or []:
        label = records.site_label(row["site"], row.get("node_id"))
        if row.get("status") != records.OK:
            lines.append(f"| {label} | {row.get('status')}: {row.get('reason', '')} |" + " |" * 9)
            continue
        for arm, title in ARM_TITLES.items():
            m = row.get(arm)
            if not m:
                continue
            chosen = _choice(arm, decisions.get(label))
            lines.append(f"| {label} | {title} | {_f(m.get('n-masked'))} | {_f(m.get('dice-ich'))} | "
                         f"{_f(m.get('dice-phe'))} | {_f(m.get('ich-components'), 1)} | {_f(m.get('largest-on-lesion'))} | "
                         f"{_f(_flagged_share(m))} | {_f(m.get('n-no-lesion'))} | {_f(m.get('auc'))} | {chosen} |")
    return "\n".join(lines) + "\n"


def _choice(arm: str, decision: str | None) -> str:
    if arm == P.SEG_LOCAL or decision is None:
        return ""
    uses_federated = decision == P.ADOPTION_ACTIVATED
    if (arm == P.SEG_FEDERATED) == uses_federated:
        return "**in use**" + ("" if uses_federated else f" ({decision})")
    return ""


def effect_lines(seg: dict[str, Any]) -> list[str]:
    """Mean over sites (each site once) of federated - reference and local-only - reference."""
    out = []
    for arm in (P.SEG_FEDERATED, P.SEG_LOCAL):
        for metric, what in (("dice-ich", "ICH Dice"), ("auc", "AUC of the bundle head")):
            diffs = [row[arm][metric] - row[P.SEG_REFERENCE][metric] for row in seg.get("sites") or []
                     if row.get("status") == records.OK and (row.get(arm) or {}).get(metric) is not None
                     and (row.get(P.SEG_REFERENCE) or {}).get(metric) is not None]
            if diffs:
                out.append(f"- {ARM_TITLES[arm]} − reference, {what}: mean {sum(diffs) / len(diffs):+.3f} over "
                           f"{len(diffs)} site(s) ({', '.join(f'{d:+.3f}' for d in diffs)})")
    return out


def rounds_table_markdown(seg: dict[str, Any]) -> str:
    """Per segmenter round and site: the update's fate, masked cases, loss, pseudo Dice, norm, weight."""
    lines = ["| Round | Site | Update | Masked cases | Loss | Pseudo Dice | Update norm | Weight |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for rnd in seg.get("rounds") or []:
        for row in sorted((rnd.get("train") or {}).get("sites", []), key=lambda r: (r["site"], r.get("node_id") or 0)):
            status = row.get("status", "-") + (f" ({row['reason']})" if row.get("reason") else "")
            lines.append(f"| {rnd['round']} | {records.site_label(row['site'], row.get('node_id'))} | {status} | "
                         f"{_f(row.get('n_fine_tune'))} | {_f(row.get('train_loss'), 4)} | {_f(row.get('train_dice'))} | "
                         f"{_f(row.get('update_norm'), 2)} | {_f(row.get('weight'), 1)} |")
    return "\n".join(lines) + "\n"


def bytes_line(seg: dict[str, Any]) -> str:
    """What a segmenter round costs per site on the wire, beside a head round."""
    b = seg.get("bytes") or {}
    if not b:
        return ""

    def mb(key: str) -> str:
        if b.get(key) is None:
            return "n/a"
        return f"{b[key] / 1e6:.2f} MB" if b[key] >= 100_000 else f"{b[key] / 1e3:.1f} kB"

    return (f"- bytes per site and round: segmenter {mb('segmenter_round_sent')} sent, "
            f"{mb('segmenter_reply_tensors')} returned; head record {mb('head_round_sent')} sent, "
            f"{mb('head_reply_tensors')} returned; the segmenter bundle once: {mb('segmenter_bundle_delivery')}")


def segmenter_lines(report: dict[str, Any]) -> list[str]:
    """The Markdown section (empty for a run without segmenter rounds)."""
    seg = report.get("segmenter")
    if not seg:
        return []
    st = seg.get("settings") or {}
    out = ["\n## Segmenter rounds (federated nnU-Net fine-tuning)\n",
           f"- {st.get('rounds')} round(s), trainable: {st.get('trainable')}, {st.get('epochs')} x "
           f"{st.get('iterations')} nnU-Net iterations per round, learning rate {st.get('learning_rate')}; "
           f"opted in: {', '.join(f'{k} ({v} masked cases)' for k, v in (seg.get('opted_in') or {}).items()) or 'none'}"]
    if seg.get("stopped"):
        out.append(f"- **stopped**: {seg['stopped']}; the run went on with the reference segmenter")
    if seg.get("bundle"):
        out.append(f"- segmenter bundle: `{seg['bundle']['hash'][:16]}` ({seg['bundle']['path']})")
    for tag, info in (seg.get("final_bundles") or {}).items():
        out.append(f"- federated bundle with the {tag}: `{info['hash'][:16]}`")
    line = bytes_line(seg)
    if line:
        out.append(line)
    if seg.get("rounds"):
        out += ["", rounds_table_markdown(seg)]
    if seg.get("sites"):
        out += ["\n### Segmentation on the held-out cases, per site\n", segmentation_table_markdown(seg),
                *effect_lines(seg)]
    return out
