"""Hemorrhages and perihematomal edema with the class signal of the paper's Table 1.

Two steps, kept apart so that statistics can be computed without building images:

1. ``sample_plan`` draws the numbers of a case: class, etiology, age, total ICH and PHE volume,
   number of bleeds, intraventricular extension. ICH volume is log-normal per etiology; the
   PHE/ICH ratio is log-normal too and falls with ICH size (small bleeds carry relatively more
   edema), with a higher median in neoplastic etiologies and in vascular malformations, so the
   classes overlap as they do in reality.
2. ``insert_lesions`` realises the plan in a head: each bleed is a lobulated star-shaped region
   whose size is set by taking exactly the planned number of voxels of lowest "shape distance"
   inside parenchyma (so mask volumes equal the plan up to one voxel); the edema is the planned
   number of voxels nearest the bleed in a distance scaled by a smooth random thickness map,
   which favours white matter in neoplastic (vasogenic) edema.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from .phantom import DEEP_GM, VENTRICLE, WM, Head, sample_age, smooth_field
from .profiles import Profile, etiology_weights

ICH, PHE = 1, 2
REFERENCE_ICH_ML = 6.3  # Table 1: median ICH volume of the whole cohort


@dataclasses.dataclass(frozen=True)
class Etiology:
    """Typical imaging features of one etiology (volumes in ml, HU of the acute clot)."""

    neoplastic: bool
    location: str  # deep | lobar | junction | hemispheric | any
    ich_median_ml: float
    ich_sigma: float  # SD of log volume
    phe_ratio: float  # median PHE/ICH ratio at the reference ICH volume
    ivh_probability: float
    multiple_probability: float = 0.0  # chance of more than one bleed
    # Per case, on its largest bleed (drawn with the plan, so their rates are known per class).
    heterogeneity_hu: float = 4.0  # SD of low-frequency HU variation within the clot
    fluid_level_probability: float = 0.0
    calcification_probability: float = 0.0
    edema_grey_matter_factor: float = 0.8  # <1: edema spreads less into grey matter
    elongation: float = 1.3  # max axis ratio of the clot


# Parameters tuned so that the class-level medians and IQRs of ICH and PHE volume match Table 1
# (see docs/simulations.md and tests/simulations/test_volumes.py).
#
# No cue belongs to one class only: a classifier that learns "calcified -> malformation" or
# "several bleeds -> metastasis" would learn the generator, not the disease. Each cue is most
# frequent where it is typical and also occurs, at a lower clinically plausible rate, in the
# other class: tumours calcify (oligodendroglioma, some metastases) and bleed into fluid levels;
# cerebral amyloid angiopathy gives several simultaneous lobar bleeds, coagulopathy sometimes too.
ETIOLOGIES: dict[str, Etiology] = {
    "metastasis": Etiology(True, "junction", 5.6, 1.55, 3.5, 0.04, multiple_probability=0.55,
                           heterogeneity_hu=7.0, edema_grey_matter_factor=0.45, fluid_level_probability=0.02,
                           calcification_probability=0.03),
    "primary_tumour": Etiology(True, "hemispheric", 10.0, 1.45, 4.6, 0.0, heterogeneity_hu=14.0,
                               edema_grey_matter_factor=0.45, elongation=1.5, fluid_level_probability=0.03,
                               calcification_probability=0.08),
    "hypertensive": Etiology(False, "deep", 7.6, 1.75, 1.5, 0.30, elongation=1.7),
    "amyloid_angiopathy": Etiology(False, "lobar", 8.0, 1.7, 1.35, 0.05, heterogeneity_hu=5.0,
                                   multiple_probability=0.20),
    "anticoagulation": Etiology(False, "any", 20.0, 1.3, 1.25, 0.35, fluid_level_probability=0.7,
                                multiple_probability=0.05),
    "vascular_malformation": Etiology(False, "lobar", 2.8, 1.7, 2.5, 0.12, calcification_probability=0.4),
}
# Edema falls with hematoma size: log(PHE/ICH) = log(ratio) - SLOPE * log(ICH / reference) + noise.
RATIO_SLOPE = 0.34
RATIO_SIGMA = 0.42
ICH_RANGE_ML = (0.4, 110.0)
PHE_RANGE_ML = (0.3, 220.0)


@dataclasses.dataclass(frozen=True)
class CasePlan:
    """The numbers of one case, drawn before any voxel exists."""

    neoplastic: bool
    etiology: str
    age: float
    ich_ml: tuple[float, ...]  # per bleed, largest first
    phe_ml: tuple[float, ...]  # per bleed
    ivh: bool
    ivh_ml: float
    fluid_level: bool = False  # hematocrit level in the largest bleed
    calcified: bool = False  # dense calcified spots at the largest bleed's margin

    @property
    def label(self) -> int:
        return int(self.neoplastic)


def sample_plan(profile: Profile, rng: np.random.Generator) -> CasePlan:
    """Draw class, etiology, age and lesion volumes for one case of ``profile``."""
    pop = profile.population
    neoplastic = bool(rng.random() < pop.prevalence)
    weights = etiology_weights(profile, neoplastic)
    names = list(weights)
    etiology = names[int(rng.choice(len(names), p=np.array([weights[n] for n in names])))]
    e = ETIOLOGIES[etiology]
    age = sample_age(rng, pop.age_median - (8.0 if etiology == "vascular_malformation" else 0.0), pop.age_sd)

    ich = float(np.exp(np.log(e.ich_median_ml * pop.lesion_size_scale) + e.ich_sigma * rng.standard_normal()))
    ich = float(np.clip(ich, *ICH_RANGE_ML))
    log_ratio = np.log(e.phe_ratio) - RATIO_SLOPE * np.log(ich / REFERENCE_ICH_ML) + RATIO_SIGMA * rng.standard_normal()
    phe = float(np.clip(ich * np.exp(log_ratio) * pop.edema_scale, *PHE_RANGE_ML))

    n = 1
    if rng.random() < e.multiple_probability:
        n = int(min(2 + rng.poisson(1.0), 6))
    # Several bleeds share the total: the largest dominates, the rest are small.
    shares = np.sort(rng.dirichlet(np.r_[3.0, np.full(n - 1, 1.0)]))[::-1] if n > 1 else np.array([1.0])
    ich_parts = tuple(float(max(ich * s, 0.2)) for s in shares)
    phe_parts = tuple(float(max(phe * s, 0.2)) for s in shares)
    ivh = bool(rng.random() < e.ivh_probability)
    ivh_ml = float(rng.uniform(0.5, 4.0)) if ivh else 0.0
    # Drawn last, so adding them left every earlier draw (class, volumes, bleeds) unchanged.
    fluid_level = bool(rng.random() < e.fluid_level_probability)
    calcified = bool(rng.random() < e.calcification_probability)
    return CasePlan(neoplastic, etiology, age, ich_parts, phe_parts, ivh, ivh_ml, fluid_level, calcified)


@dataclasses.dataclass
class Lesions:
    """A realised plan: the label mask, the lesion HU volume and what was actually placed."""

    mask: np.ndarray  # uint8 (z, y, x): 0 background, 1 ICH (incl. IVH), 2 PHE
    hu: np.ndarray | None  # float32 (z, y, x): the head's HU with lesions inserted (None if mask_only)
    n_lesions: int
    ivh_voxels: int
    # Bleeds painted with each class cue ("fluid_level", "calcification"); empty when mask_only.
    cues: dict[str, int] = dataclasses.field(default_factory=dict)


def _candidates(head: Head, location: str, radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of voxels where a bleed of ``radius_mm`` may be centred."""
    nz = head.grid.shape_zyx[0]
    sz = head.grid.spacing_xyz[2]
    margin = int(np.ceil(0.7 * radius_mm / sz)) + 1
    keep = np.zeros(head.grid.shape_zyx, bool)
    if nz - 2 * margin > 0:
        keep[margin:nz - margin] = True
    else:
        keep[nz // 2] = True
    d = head.depth_mm
    need = max(6.0, 0.8 * radius_mm)
    paren = head.parenchyma & keep
    if location == "deep":
        region = (head.tissue == DEEP_GM) if head.kind == "phantom" else (d > 38.0)
        region = region & (d > need)
    elif location == "lobar":
        region = (d > need) & (d < max(22.0, need + 8.0))
    elif location == "junction":
        region = (d > max(9.0, need)) & (d < max(30.0, need + 10.0))
    elif location == "hemispheric":
        region = (d > max(15.0, need)) & (d < max(48.0, need + 10.0)) & (head.tissue != DEEP_GM)
    else:
        region = d > need
    idx = np.flatnonzero(region & paren)
    if idx.size == 0:
        idx = np.flatnonzero(paren & (d > 4.0))
    if idx.size == 0:
        idx = np.flatnonzero(head.parenchyma)
    return idx


def _box(centre: tuple[int, int, int], half_mm: float, grid) -> tuple[slice, slice, slice]:
    sx, sy, sz = grid.spacing_xyz
    half = (int(np.ceil(half_mm / sz)), int(np.ceil(half_mm / sy)), int(np.ceil(half_mm / sx)))
    return tuple(slice(max(0, c - h), min(n, c + h + 1)) for c, h, n in zip(centre, half, grid.shape_zyx))


def _box_field(box_axes: tuple[np.ndarray, np.ndarray, np.ndarray], wavelength_mm: float,
               rng: np.random.Generator) -> np.ndarray:
    """Unit-SD smooth random field over a lesion box (axes in mm, x, y, z)."""
    return smooth_field(box_axes, wavelength_mm, rng)


def _smallest(values: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` allowed voxels with the smallest values."""
    out = np.zeros(values.shape, bool)
    idx = np.flatnonzero(allowed)
    if idx.size == 0 or k <= 0:
        return out
    if k >= idx.size:
        out.flat[idx] = True
        return out
    part = np.argpartition(values.flat[idx], k - 1)[:k]
    out.flat[idx[part]] = True
    return out


_CONN = np.ones((3, 3, 3), bool)


def _connected_smallest(values: np.ndarray, allowed: np.ndarray, k: int, anchor: np.ndarray | None = None,
                        max_rounds: int = 40) -> np.ndarray:
    """Like ``_smallest`` but one connected piece: a clot (largest component kept) or, with ``anchor``,
    an edema touching the clot. Voxels lost to islands are re-added at the piece's border, again in
    order of value, so the region still grows like a level set and keeps its planned size.
    """
    sel = _smallest(values, allowed, k)
    touch = ndimage.binary_dilation(anchor, _CONN) if anchor is not None else None
    for _ in range(max_rounds):
        lab, n = ndimage.label(sel, _CONN)
        if n > 1 or (touch is not None and n == 1):
            if touch is None:
                sizes = np.bincount(lab.ravel())
                sizes[0] = 0
                sel = lab == int(np.argmax(sizes))
            else:
                keep = np.unique(lab[touch & sel])
                sel = np.isin(lab, keep[keep > 0])
        deficit = k - int(np.count_nonzero(sel))
        if deficit <= 0:
            break
        frontier = ndimage.binary_dilation(sel if sel.any() else touch, _CONN) & allowed & ~sel
        if not frontier.any():
            break
        sel |= _smallest(values, frontier, deficit)
    return sel


def insert_lesions(head: Head, plan: CasePlan, rng: np.random.Generator, mask_only: bool = False) -> Lesions:
    """Place the plan's bleeds, edema and IVH in ``head``; HU are ideal (pre-scanner) for phantoms."""
    grid = head.grid
    e = ETIOLOGIES[plan.etiology]
    sx, sy, sz = grid.spacing_xyz
    vox = grid.voxel_ml
    mask = np.zeros(grid.shape_zyx, np.uint8)
    hu = None if mask_only else head.hu.copy()
    paren = head.parenchyma
    placed = 0
    cues = {"fluid_level": 0, "calcification": 0}
    for i, (ich_ml, phe_ml) in enumerate(zip(plan.ich_ml, plan.phe_ml)):
        r_ich = (3 * ich_ml * 1000 / (4 * np.pi)) ** (1 / 3)
        r_all = (3 * (ich_ml + phe_ml) * 1000 / (4 * np.pi)) ** (1 / 3)
        location = e.location if i == 0 else "junction"
        cand = _candidates(head, location, r_ich, rng)
        centre = np.unravel_index(int(cand[rng.integers(cand.size)]), grid.shape_zyx)
        box = _box(centre, 1.8 * r_all + 2.0 * max(sx, sz), grid)
        box_axes, f = _clot_distance(box, centre, grid, e, r_ich, rng)
        sub_mask = mask[box]
        allowed_ich = paren[box] & (sub_mask != ICH)
        ich = _connected_smallest(f, allowed_ich, max(3, int(round(ich_ml / vox))))
        if not ich.any():
            continue
        placed += 1
        # Edema: nearest voxels to the clot in a distance stretched by a smooth thickness map.
        edt = ndimage.distance_transform_edt(~ich, sampling=(sz, sy, sx)).astype(np.float32)
        thick = np.exp(np.float32(0.45) * _box_field(box_axes, 14.0, rng))
        tissue = head.tissue[box]
        # Local white-matter fraction (not the hard label) so the edema margin is not speckled.
        wm_frac = ndimage.uniform_filter((tissue == WM).astype(np.float32), size=3, mode="nearest")
        thick *= np.float32(e.edema_grey_matter_factor) + np.float32(1 - e.edema_grey_matter_factor) * wm_frac
        g = edt / thick
        allowed_phe = paren[box] & ~ich & (sub_mask != ICH)
        phe = _connected_smallest(g, allowed_phe & (sub_mask != PHE), max(1, int(round(phe_ml / vox))), anchor=ich)
        sub_mask[phe] = PHE
        sub_mask[ich] = ICH
        if hu is not None:
            for cue in _paint(hu, box, box_axes, ich, phe, edt, tissue, head, e, rng,
                              fluid_level=plan.fluid_level and i == 0, calcified=plan.calcified and i == 0):
                cues[cue] += 1
    ivh_voxels = 0
    if plan.ivh:
        ivh_voxels = _paint_ivh(head, mask, hu, plan.ivh_ml, rng)
    return Lesions(mask=mask, hu=hu, n_lesions=placed, ivh_voxels=ivh_voxels, cues=cues if hu is not None else {})


def _clot_distance(box, centre, grid, e, r_ich: float, rng: np.random.Generator):
    """(box axes in mm (x, y, z), the clot's shape distance in the box): anisotropic, lobulated and
    slightly rough; the clot is the voxels of smallest distance."""
    sx, sy, sz = grid.spacing_xyz
    shape = tuple(s.stop - s.start for s in box)
    bz_, by_, bx_ = [((np.arange(s.start, s.stop) - c) * d).astype(np.float32)
                     for s, c, d in zip(box, centre, (sz, sy, sx))]
    box_axes = (bx_, by_, bz_)
    zz, yy, xx = bz_[:, None, None], by_[None, :, None], bx_[None, None, :]
    rot = _random_rotation(rng)
    stretch = np.array([1.0, rng.uniform(1.0, e.elongation), rng.uniform(1.0, 1.0 + (e.elongation - 1) / 2)])
    px = (rot[0, 0] * xx + rot[0, 1] * yy + rot[0, 2] * zz) / stretch[0]
    py = (rot[1, 0] * xx + rot[1, 1] * yy + rot[1, 2] * zz) / stretch[1]
    pz = (rot[2, 0] * xx + rot[2, 1] * yy + rot[2, 2] * zz) / stretch[2]
    dist = np.sqrt(px * px + py * py + pz * pz) + 1e-3
    lobes = np.ones(shape, np.float32)
    for _ in range(int(rng.integers(3, 7))):
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        cosang = (v[0] * px + v[1] * py + v[2] * pz) / dist
        lobes += np.float32(rng.uniform(0.15, 0.6)) * np.exp(rng.uniform(3, 9) * (cosang - 1.0))
    rough = _box_field(box_axes, 5.0, rng)
    return box_axes, dist / lobes + np.float32(0.08 * r_ich) * rough


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _paint(hu: np.ndarray, box, box_axes, ich: np.ndarray, phe: np.ndarray, edt: np.ndarray, tissue: np.ndarray,
           head: Head, e: Etiology, rng: np.random.Generator, fluid_level: bool = False,
           calcified: bool = False) -> list[str]:
    """Write clot and edema HU into ``hu[box]``."""
    sub = hu[box]
    grid = head.grid
    sx, sy, _ = grid.spacing_xyz
    shape = sub.shape
    base = head.hu[box]
    real = head.kind == "real"
    if real:
        # Keep the real scan's noise texture: replace only its local mean.
        texture = base - ndimage.uniform_filter(base, size=(1, 3, 3), mode="nearest")
    else:
        texture = np.zeros(shape, np.float32)
    # Clot: acute blood 55-80 HU with low-frequency heterogeneity.
    het = _box_field(box_axes, 10.0, rng)
    het -= het[ich].mean() if ich.any() else 0.0  # centred on the clot: its mean HU stays that of blood
    clot = np.float32(rng.uniform(58, 76)) + np.float32(e.heterogeneity_hu) * het
    cues = []
    if fluid_level:
        cues.append("fluid_level")
        # Hematocrit level: cells settle posteriorly (+y) in a supine patient.
        ys = np.nonzero(ich)[1]
        level = np.quantile(ys, rng.uniform(0.35, 0.65))
        yy = np.arange(shape[1])[None, :, None]
        clot = np.where(yy > level, np.float32(rng.uniform(80, 88)), np.float32(rng.uniform(50, 56)))
        clot = clot + np.float32(2.0) * _box_field(box_axes, 6.0, rng)
    clot = np.clip(clot, 45.0 if e.heterogeneity_hu > 10 else 50.0, 92.0)
    # Edema: 8-15 HU below the tissue it replaces, most hypodense next to the clot.
    drop = np.float32(rng.uniform(8, 15))
    rim = max(float(edt[phe].max()) if phe.any() else 1.0, 1.0)
    tissue_hu = np.where(tissue == WM, np.float32(27.5), np.float32(36.0)) if not real else ndimage.uniform_filter(
        base, size=(1, 5, 5), mode="nearest")
    edema = tissue_hu - drop * (1.25 - 0.5 * np.clip(edt / rim, 0, 1))
    target = np.where(ich, clot, np.where(phe, edema, base - texture)).astype(np.float32)
    if real:
        lesion = ich | phe
        delta = np.where(lesion, target - (base - texture), 0).astype(np.float32)
        # Soften the edge by ~0.8 mm, as the real scanner's kernel would.
        s_px = max(0.3, 0.8 / sx)
        delta = ndimage.gaussian_filter(delta, sigma=(0.0, s_px, s_px))
        sub[lesion] = (base + delta)[lesion]
    else:
        sub[ich] = target[ich]
        sub[phe] = target[phe]
    if calcified and phe.any():
        cues.append("calcification")
        # Calcified nidus: a few dense spots at the clot margin.
        border = phe & (edt <= 1.5 * max(sx, sy) + 1e-3)
        idx = np.flatnonzero(border if border.any() else phe)
        for j in rng.choice(idx, size=min(idx.size, int(rng.integers(2, 6))), replace=False):
            sub.flat[j] = np.float32(rng.uniform(200, 600))
    return cues


def _paint_ivh(head: Head, mask: np.ndarray, hu: np.ndarray | None, ivh_ml: float, rng: np.random.Generator) -> int:
    """Blood layering in the dependent (posterior) part of the ventricles; labelled ICH."""
    vent = np.flatnonzero((head.tissue == VENTRICLE) & (mask == 0))
    if vent.size < 4:
        return 0
    k = int(min(round(ivh_ml / head.grid.voxel_ml), vent.size // 2))
    if k < 1:
        return 0
    y = np.unravel_index(vent, head.grid.shape_zyx)[1]
    chosen = vent[np.argsort(-y, kind="stable")[:k]]
    mask.flat[chosen] = ICH
    if hu is not None:
        hu.flat[chosen] = np.float32(rng.uniform(55, 75))
    return k
