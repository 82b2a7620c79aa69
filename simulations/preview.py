"""A montage of axial slices of a few cases with ICH (green) and PHE (red) outlines."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.plumbing.atomic import atomic_path
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

BRAIN_WINDOW = (40.0, 80.0)  # level, width


def _read_rows(folder: Path) -> list[dict[str, str]]:
    csv_path = folder / "cases.csv"
    if not csv_path.is_file():
        raise IchfedError(f"{csv_path}: file not found (not a site folder)")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise IchfedError(f"{csv_path}: no cases")
    if "case_id" not in rows[0]:
        raise IchfedError(f"{csv_path}: missing column 'case_id'")
    return rows


def _pick(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    # Alternate classes so the montage shows both.
    by_label: dict[str, list] = {}
    for r in rows:
        by_label.setdefault(r.get("label", ""), []).append(r)
    groups = list(by_label.values())
    picked: list[dict[str, str]] = []
    i = 0
    while len(picked) < min(n, len(rows)):
        g = groups[i % len(groups)]
        j = i // len(groups)
        if j < len(g):
            picked.append(g[j])
        i += 1
        if i > 4 * len(rows) + n:
            break
    return picked


def render_preview(folder: str | Path, out: str | Path, n_cases: int = 6, slices_per_case: int = 3) -> Path:
    """Render ``n_cases`` cases of a site folder (``slices_per_case`` slices through the largest ICH)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder, out = Path(folder), Path(out)
    rows = _pick(_read_rows(folder), n_cases)
    fig, axes = plt.subplots(len(rows), slices_per_case, figsize=(3.0 * slices_per_case, 3.1 * len(rows)),
                             squeeze=False, facecolor="black")
    lo = BRAIN_WINDOW[0] - BRAIN_WINDOW[1] / 2
    hi = BRAIN_WINDOW[0] + BRAIN_WINDOW[1] / 2
    for row_axes, r in zip(axes, rows):
        cid = r["case_id"]
        img_path, msk_path = folder / "images" / f"{cid}.nii.gz", folder / "masks" / f"{cid}.nii.gz"
        if not img_path.is_file():
            raise IchfedError(f"{img_path}: file not found")
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(img_path)))
        msk = sitk.GetArrayFromImage(sitk.ReadImage(str(msk_path))) if msk_path.is_file() else np.zeros_like(img)
        area = (msk == 1).sum(axis=(1, 2))
        centre = int(np.argmax(area)) if area.any() else img.shape[0] // 2
        half = slices_per_case // 2
        ks = np.clip(np.arange(centre - half, centre - half + slices_per_case), 0, img.shape[0] - 1)
        for ax, k in zip(row_axes, ks):
            ax.imshow(img[k], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            for label, colour in ((2, "red"), (1, "lime")):
                if (msk[k] == label).any():
                    ax.contour((msk[k] == label).astype(float), levels=[0.5], colors=colour, linewidths=0.8)
            ax.set_axis_off()
        title = f"{cid}  {r.get('label', '?')} / {r.get('etiology', '?')}"
        if "ich_ml" in r:
            title += f"\nICH {float(r['ich_ml']):.1f} ml  PHE {float(r['phe_ml']):.1f} ml"
        row_axes[0].set_title(title, color="white", fontsize=8, loc="left")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90, facecolor="black", format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    log.info("preview of %d cases written to %s", len(rows), out)
    return out
