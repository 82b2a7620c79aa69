"""What the intracranial mask changes on real-background cases (issue 13), with a given bundle.

Cases are generated in memory (``simulations.cohort.make_case``, ``--background real`` by
default: synthetic bleeds inserted into the real GE head). Each is segmented once with the
bundle's nnU-Net; the labels are scored twice, without and with the intracranial mask (the
mask step is switched off by patching ``shared.imaging.intracranial.restrict_labels``). Per case: ICH
Dice, ICH components, false ICH ml (predicted ICH outside the true lesion), whether the largest
ICH component overlaps the true ICH (what the crop is centred on), ICH volume error, and the
quality flags; and the masked labels after the postprocessing candidates ``largest`` and
``min_ml:0.5`` (``shared.models.postprocess``). Writes ``benchmarks/results/intracranial_<name>.json``.

    python benchmarks/bench_intracranial.py --bundle BUNDLE --cases 12 --seed 77
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout


def _score(pred, truth, voxel_ml: float) -> dict:
    import numpy as np
    from scipy import ndimage

    p, t = pred == 1, truth == 1
    denom = int(p.sum() + t.sum())
    comp, n = ndimage.label(p)
    largest_on = None
    if n:
        sizes = np.bincount(comp.ravel())[1:]
        largest_on = bool((comp == int(np.argmax(sizes)) + 1)[t].any())
    return {
        "ich_dice": None if denom == 0 else round(2 * float((p & t).sum()) / denom, 4),
        "ich_components": int(n),
        "false_ich_ml": round(float((p & ~(truth > 0)).sum()) * voxel_ml, 3),
        "largest_on_lesion": largest_on,
        "ich_volume_error": None if not t.any() else round(float(p.sum() - t.sum()) / float(t.sum()), 4),
    }


def _summary(rows: list[dict]) -> dict:
    import numpy as np

    def med(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return None if not vals else round(float(np.median(vals)), 4)

    on = [r["largest_on_lesion"] for r in rows]
    return {
        "median_ich_dice": med("ich_dice"),
        "median_components": med("ich_components"),
        "median_false_ich_ml": med("false_ich_ml"),
        "median_abs_volume_error": (None if not rows else round(float(np.median(
            [abs(r["ich_volume_error"]) for r in rows if r["ich_volume_error"] is not None])), 4)),
        "largest_on_lesion": f"{sum(bool(x) for x in on)}/{len(on)}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--profile", default="charite-like")
    ap.add_argument("--scale", default="demo")
    ap.add_argument("--background", default="real")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    import numpy as np
    import SimpleITK as sitk

    import shared.imaging.intracranial as ic
    from shared.bundle import load_bundle
    from shared.pipeline import Predictor
    from simulations.cohort import make_case

    bundle = load_bundle(Path(args.bundle), None, allow_unsigned=True)
    predictor = Predictor(bundle, device=args.device)
    restrict = ic.restrict_labels
    from shared.models.postprocess import Rule, apply_rule

    rules = {"with_mask+largest": Rule("largest"), "with_mask+min_ml:0.5": Rule("min_ml", 0.5)}
    rows = {"without_mask": [], "with_mask": [], **{k: [] for k in rules}}
    t0 = time.perf_counter()
    for k in range(args.cases):
        case = make_case(args.profile, k, args.seed, scale=args.scale, background=args.background)
        image, _ = case.images()
        voxel_ml = case.grid.voxel_ml
        for key, fn in (("without_mask", lambda labels, inside: (labels, 0)), ("with_mask", restrict)):
            ic.restrict_labels = fn
            try:
                seg = predictor.segment_case(image)
            finally:
                ic.restrict_labels = restrict
            prepared = predictor.preprocess(image, segmentation=seg)
            row = {"case": k, "etiology": case.record.etiology, **_score(sitk.GetArrayFromImage(seg.labels),
                                                                         case.mask, voxel_ml),
                   "extracranial_ml_removed": round(seg.extracranial_ml_removed, 3),
                   "quality_flags": prepared.quality_flags}
            rows[key].append(row)
            print(key, json.dumps(row), flush=True)
        # The postprocessing candidates bootstrap chooses from, on the masked labels.
        labels = sitk.GetArrayFromImage(seg.labels)
        for key, rule in rules.items():
            rows[key].append({"case": k, **_score(apply_rule(labels, rule, voxel_ml), case.mask, voxel_ml),
                              "quality_flags": None})
    result = {
        "bundle": str(args.bundle), "bundle_hash": bundle.hash, "profile": args.profile, "scale": args.scale,
        "background": args.background, "cases": args.cases, "seed": args.seed, "device": args.device,
        "seconds": round(time.perf_counter() - t0, 1), "load_average": os.getloadavg(),
        "summary": {k: _summary(v) for k, v in rows.items()}, "per_case": rows,
        "flagged_with_mask": int(np.sum([bool(r["quality_flags"]) for r in rows["with_mask"]])),
        "postprocessing_of_bundle": predictor.segmenter.postprocessing.name,
    }
    out = ROOT / "benchmarks" / "results" / f"intracranial_{args.name or Path(args.bundle).name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result["summary"], indent=1))
    print(out)


if __name__ == "__main__":
    main()
