"""Which of a NIfTI file's three geometries to believe: the sform, the qform or ``pixdim``.

A NIfTI header can say where its voxels are three times: the sform (``srow_x/y/z``, with
``sform_code``), the qform (a quaternion, ``qoffset`` and ``pixdim``, with ``qform_code``) and the
voxel sizes in ``pixdim``. The NIfTI standard and nibabel take the sform when ``sform_code`` > 0,
else the qform when ``qform_code`` > 0 (``nibabel``'s ``get_best_affine``). ITK does not: it takes its
voxel size from ``pixdim`` whatever the affine says and its axes from whichever form it prefers, so a
qform of 5 mm beside an sform of 1.8 mm gave 5 mm voxels (volumes x 21.4) and a negative
``pixdim[1]`` beside a positive sform mirrored the image left-right. Here:

* when both forms are set and disagree by more than ``TOLERANCE_VOXELS`` of a voxel anywhere in the
  volume, or ``pixdim`` contradicts the form in use (another voxel size, or a negative one), the
  file is refused with one line; ``--nifti-geometry sform|qform`` picks a form, and the result's
  ``notes`` say which and what was set aside;
* a sheared form (axes not at right angles) is refused as such: ITK cannot represent it and would
  otherwise say "truncated or corrupt";
* otherwise the image gets the geometry of the form in use (the standard's), converted to ITK's
  LPS convention (x and y negated), so ITK's reading never decides it.

A file with neither form set (``qform_code`` = ``sform_code`` = 0, the old ANALYZE case) keeps ITK's
``pixdim``-only grid, with a note that its orientation is unknown.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np

from shared.plumbing.errors import IchfedError

#: the forms ``--nifti-geometry`` may name
FORMS = ("sform", "qform")
#: two forms "agree" when no corner of the volume moves by more than this fraction of the smallest voxel
TOLERANCE_VOXELS = 0.1
#: relative difference between ``pixdim`` and the form's own voxel size that counts as a contradiction
PIXDIM_TOLERANCE = 1e-3
#: |cos| of the angle between two voxel axes above which the form counts as sheared (about 0.06 deg)
SHEAR_TOLERANCE = 1e-3
_LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI world space is RAS, ITK's is LPS


@dataclasses.dataclass(frozen=True)
class Grid:
    """An ITK geometry (LPS): spacing, origin, row-major direction; ``source`` names the form used."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    source: str
    notes: tuple[str, ...] = ()


def _forms(header) -> dict[str, np.ndarray | str]:
    """The affines the header sets (RAS, 4x4), or why the qform cannot be built."""
    out: dict[str, np.ndarray | str] = {}
    if int(header["sform_code"]) > 0:
        out["sform"] = np.asarray(header.get_sform(), dtype=np.float64)
    if int(header["qform_code"]) > 0:
        try:
            out["qform"] = np.asarray(header.get_qform(), dtype=np.float64)
        except Exception as e:  # nibabel refuses a qform it cannot build (negative pixdim, bad quaternion)
            out["qform"] = str(e)
    return out


def _corners(shape: tuple[int, ...]) -> np.ndarray:
    """The 8 corner voxel indices of the volume, homogeneous (4, 8)."""
    ends = [(0, max(int(n) - 1, 0)) for n in (list(shape) + [1, 1, 1])[:3]]
    return np.array([[*c, 1.0] for c in itertools.product(*ends)], dtype=np.float64).T


def _zooms(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)


def _fmt(values) -> str:
    return "x".join(f"{float(v):.4g}" for v in values)


def _check_shear(p: Path, name: str, affine: np.ndarray) -> None:
    m = affine[:3, :3]
    z = _zooms(affine)
    if not np.all(np.isfinite(affine)) or not np.all(z > 0):
        raise IchfedError(f"{p}: the {name} has a zero or non-finite voxel axis ({_fmt(z)} mm)")
    unit = m / z
    for i, j in ((0, 1), (0, 2), (1, 2)):
        cos = float(np.dot(unit[:, i], unit[:, j]))
        if abs(cos) > SHEAR_TOLERANCE:
            angle = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
            raise IchfedError(f"{p}: the {name} is sheared (voxel axes {i + 1} and {j + 1} at {angle:.1f} deg, "
                              "not 90); ITK grids need right angles: resample the image onto a regular grid first")


def choose_grid(p: Path, header, choice: str | None = None) -> Grid | None:
    """The geometry ``p`` must get, by the rules in the module doc; None when neither form is set.

    ``choice`` (``"sform"``/``"qform"``, the ``--nifti-geometry`` option) uses that form whatever the
    other one and ``pixdim`` say, and notes it. Raises ``IchfedError`` naming ``p`` otherwise.
    """
    forms = _forms(header)
    shape = tuple(int(v) for v in header.get_data_shape())[:3]
    pixdim = np.asarray([float(v) for v in header["pixdim"][1:4]], dtype=np.float64)
    hint = "; pass --nifti-geometry sform or qform to choose one (nibabel and the NIfTI standard use the sform)"
    if choice is not None:
        if choice not in FORMS:
            raise IchfedError(f"--nifti-geometry: expected one of {', '.join(FORMS)}, got {choice!r}")
        form = forms.get(choice)
        if form is None:
            raise IchfedError(f"{p}: --nifti-geometry {choice}: the file sets no {choice} ({choice}_code 0)")
        if isinstance(form, str):
            raise IchfedError(f"{p}: --nifti-geometry {choice}: the qform cannot be built ({form})")
        _check_shear(p, choice, form)
        note = _choice_note(choice, form, forms, pixdim, shape)
        return _grid(form, choice, (note,) if note else ())
    negative = [i + 1 for i, v in enumerate(pixdim[:len(shape)]) if v < 0]
    if negative:
        i = negative[0]
        raise IchfedError(f"{p}: pixdim[{i}] is {pixdim[i - 1]:g}; voxel sizes must be positive (an axis flip "
                          f"belongs in the qform/sform, and ITK would mirror the image){hint}")
    if not forms:
        return None
    if isinstance(forms.get("qform"), str):
        if "sform" not in forms:
            raise IchfedError(f"{p}: the qform cannot be built ({forms['qform']})")
        raise IchfedError(f"{p}: the qform cannot be built ({forms['qform']}){hint}")
    if "sform" in forms and "qform" in forms:
        shift = _max_shift(forms["sform"], forms["qform"], shape)
        if shift > TOLERANCE_VOXELS * float(min(_zooms(forms["sform"]).min(), _zooms(forms["qform"]).min())):
            raise IchfedError(f"{p}: qform and sform disagree (voxel size {_fmt(_zooms(forms['qform']))} mm vs "
                              f"{_fmt(_zooms(forms['sform']))} mm, voxels up to {shift:.3g} mm apart){hint}")
    name = "sform" if "sform" in forms else "qform"
    form = forms[name]
    _check_shear(p, name, form)
    zooms = _zooms(form)
    n = min(len(shape), 3)
    if np.any(np.abs(pixdim[:n] - zooms[:n]) > PIXDIM_TOLERANCE * zooms[:n]):
        raise IchfedError(f"{p}: pixdim says {_fmt(pixdim[:n])} mm voxels but the {name} says {_fmt(zooms[:n])} mm"
                          f"{hint}")
    return _grid(form, name, ())


def _choice_note(choice: str, form: np.ndarray, forms: dict, pixdim: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """What ``--nifti-geometry`` set aside, for the result's notes (None when the file agrees with itself)."""
    aside = []
    other = next((n for n in forms if n != choice), None)
    if other is not None and isinstance(forms[other], str):
        aside.append(f"the {other} cannot be built")
    elif other is not None:
        shift = _max_shift(form, forms[other], shape)
        if shift > TOLERANCE_VOXELS * float(min(_zooms(form).min(), _zooms(forms[other]).min())):
            aside.append(f"the {other} differs by up to {shift:.3g} mm")
    n = min(len(shape), 3)
    if np.any(np.abs(pixdim[:n] - _zooms(form)[:n]) > PIXDIM_TOLERANCE * _zooms(form)[:n]):
        aside.append(f"pixdim {_fmt(pixdim[:n])} mm ignored")
    return f"geometry from the {choice}, as --nifti-geometry asked ({'; '.join(aside)})" if aside else None


def _max_shift(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """How far apart (mm) the two affines put the volume's corner voxels, at most."""
    c = _corners(shape)
    return float(np.max(np.linalg.norm((a @ c - b @ c)[:3], axis=0)))


def _grid(affine: np.ndarray, source: str, notes: tuple[str, ...]) -> Grid:
    """ITK's (LPS) spacing, origin and direction of a RAS voxel-to-world affine without shear."""
    m = _LPS @ affine[:3, :3]
    zooms = np.linalg.norm(m, axis=0)
    # Below SHEAR_TOLERANCE the axes are orthogonalised (nearest rotation), as ITK needs exactly.
    u, _, vt = np.linalg.svd(m / zooms)
    direction = u @ vt
    origin = _LPS @ affine[:3, 3]
    return Grid(spacing=tuple(float(v) for v in zooms), origin=tuple(float(v) for v in origin),
                direction=tuple(float(v) for v in direction.ravel()), source=source, notes=notes)
