"""The console summary of one prediction (``ichfed predict`` without ``--json``, ``ichfed demo``)."""

from __future__ import annotations

from shared.prediction import PredictionResult


def format_result(r: PredictionResult) -> str:
    """Human-readable summary of one ``shared.prediction.PredictionResult``.

    A flagged (implausible) segmentation never reads as a confident label, here as in the reader.
    """
    lines = [r.source]
    if not r.lesion_found:
        lines.append("  no hemorrhage found (not classified)")
    else:
        lines.append(f"  ICH  {r.ich_ml:.1f} ml  mean {_hu(r.ich_mean_hu)}   lesions: {r.n_components}")
        lines.append(f"  PHE  {r.phe_ml:.1f} ml  mean {_hu(r.phe_mean_hu)}")
        verdict = f"not reliable, review (model: {r.label})" if r.flagged else r.label
        lines.append(
            f"  p(neoplastic) = {r.p_neoplastic:.3f}  (threshold {r.threshold:.3f}, "
            f"{r.threshold_source})  ->  {verdict}"
        )
    if r.flagged:
        lines.append(f"  quality flags: {', '.join(r.quality_flags)}")
    for note in r.ingest_notes:
        lines.append(f"  input: {note}")
    if r.extracranial_ml_removed:
        lines.append(f"  removed outside the skull: {r.extracranial_ml_removed:.1f} ml")
    t = ", ".join(f"{k} {v:.2f}s" for k, v in r.timings.items())
    lines.append(f"  bundle {r.bundle.name} {r.bundle.version} ({r.bundle.model})   timings: {t}")
    return "\n".join(lines)


def _hu(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} HU"
