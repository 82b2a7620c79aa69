"""Typed configuration loaded from TOML and validated once, at the edge.

Every config is a frozen dataclass. ``from_dict`` checks unknown keys, types, choices and
ranges and raises ``IchfedError`` naming the file and the dotted field, so a typo in a
site's TOML is one clear line rather than a stack trace deep in training.

Field constraints live in ``dataclasses.field(metadata=...)``:
``range=(lo, hi)`` (inclusive), ``choices=(...)``, ``length=n`` for tuples, and ``rule=f`` for a value
rule of ``shared.plumbing.rules`` (``f(value, where) -> value``: thresholds, probabilities), which
states each such rule once for every validator.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from shared.plumbing.errors import IchfedError

T = TypeVar("T")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict, with a one-line error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise IchfedError(f"{p}: file not found")
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise IchfedError(f"{p}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        # TOML is UTF-8 by definition; a Latin-1 or UTF-16 file from a Windows editor lands here.
        raise IchfedError(f"{p}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    except OSError as e:
        raise IchfedError(f"{p}: cannot read ({e.strerror})") from None


def from_toml(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """Load dataclass ``cls`` from a TOML file (optionally one table of it)."""
    data = load_toml(path)
    if section is not None:
        data = data.get(section, {})
    return from_dict(cls, data, source=str(path), prefix=section or "")


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating every field."""
    if not isinstance(data, dict):
        raise IchfedError(f"{source}: {prefix or 'config'} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise IchfedError(f"{source}: unknown key '{_dot(prefix, key)}' (known: {known})")
    values = {}
    for name, f in fields.items():
        where = _dot(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise IchfedError(f"{source}: missing required key '{where}'")
            continue
        values[name] = _check(hints[name], data[name], f.metadata, source, where)
    return cls(**values)


def to_dict(obj: Any) -> Any:
    """Inverse of ``from_dict``: plain dicts/lists suitable for TOML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _dot(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check(tp: Any, value: Any, meta: Any, source: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _check(non_none[0], value, meta, source, where)
    if meta and "rule" in meta:  # the rule checks type and range itself, in its own words
        return meta["rule"](value, f"{source}: '{where}'")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, where)
    if origin is Literal:
        if value not in args:
            raise IchfedError(f"{source}: '{where}' must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise IchfedError(f"{source}: '{where}' must be a list, got {type(value).__name__}")
        n = meta.get("length") if meta else None
        if n is not None and len(value) != n:
            raise IchfedError(f"{source}: '{where}' must have {n} values, got {len(value)}")
        item_tp = args[0] if args else Any
        return tuple(_check(item_tp, v, meta, source, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise IchfedError(f"{source}: '{where}' must be a table")
        return dict(value)
    if tp is Path:
        if not isinstance(value, str):
            raise IchfedError(f"{source}: '{where}' must be a path string, got {type(value).__name__}")
        value = Path(value)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise IchfedError(f"{source}: '{where}' must be a number, got {value!r}")
        value = float(value)
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise IchfedError(f"{source}: '{where}' must be an integer, got {value!r}")
    elif tp is bool:
        if not isinstance(value, bool):
            raise IchfedError(f"{source}: '{where}' must be true or false, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise IchfedError(f"{source}: '{where}' must be a string, got {value!r}")
    if meta:
        if "range" in meta and isinstance(value, int | float):
            lo, hi = meta["range"]
            if not (lo <= value <= hi):
                raise IchfedError(f"{source}: '{where}' must be between {lo} and {hi}, got {value!r}")
        if "choices" in meta and value not in meta["choices"]:
            raise IchfedError(
                f"{source}: '{where}' must be one of {', '.join(map(repr, meta['choices']))}, got {value!r}"
            )
    return value


def _range(lo: float, hi: float, **kw: Any) -> dict[str, Any]:
    return {"range": (lo, hi), **kw}


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """How a CT and its ICH/PHE mask become the classifier's input.

    Defaults follow the paper: 200 x 200 x 20 voxels (x, y, z); at 0.45 x 0.45 x 5.0 mm
    that covers 90 x 90 x 100 mm, enough for the largest lesions. HU are clipped to
    ``hu_window`` and scaled linearly to [0, 1]; voxels outside ICH and PHE are 0.
    """

    size_xyz: tuple[int, ...] = dataclasses.field(
        default=(200, 200, 20), metadata={"length": 3, "range": (4, 1024)}
    )
    spacing_mm: tuple[float, ...] = dataclasses.field(
        default=(0.45, 0.45, 5.0), metadata={"length": 3, "range": (0.05, 20.0)}
    )
    hu_window: tuple[float, ...] = dataclasses.field(
        default=(-20.0, 120.0), metadata={"length": 2, "range": (-1024.0, 3071.0)}
    )
    lesion_policy: Literal["largest", "all"] = "largest"

    def __post_init__(self) -> None:
        if self.hu_window[0] >= self.hu_window[1]:
            raise IchfedError(f"crop: 'hu_window' must be increasing, got {list(self.hu_window)}")

    def key(self) -> str:
        """A stable string used in cache keys: change the spec and every cached crop is recomputed."""
        return (
            f"size={'x'.join(map(str, self.size_xyz))};spacing={','.join(f'{s:g}' for s in self.spacing_mm)};"
            f"hu={self.hu_window[0]:g},{self.hu_window[1]:g};policy={self.lesion_policy}"
        )
