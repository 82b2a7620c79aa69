"""Site profiles: the scanner and the patient population of one simulated hospital.

A profile is a TOML file (built-ins live in ``simulations/profiles/*.toml``) with three
tables, ``[scanner]``, ``[population]`` and the optional mixes inside population. It is
validated on load with ``shared.plumbing.config.from_dict``: an unknown key or an out-of-range value
is a one-line ``IchfedError`` naming the file and the dotted field.

Scanner knobs are expressed at the paper's native resolution (e.g. 0.45 mm in-plane, 5 mm
slices); ``simulations.scanner.Grid.for_profile`` maps them onto the chosen scale.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

from shared.plumbing.config import from_dict, load_toml
from shared.plumbing.errors import IchfedError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


def _r(lo: float, hi: float) -> dict:
    return {"range": (lo, hi)}


@dataclasses.dataclass(frozen=True)
class ScannerProfile:
    """How the site's CT scanner turns anatomy into HU (applied in this order: blur, noise, quantise)."""

    hu_offset: float = dataclasses.field(default=0.0, metadata=_r(-10.0, 10.0))
    noise_sd: float = dataclasses.field(default=5.0, metadata=_r(3.0, 15.0))
    kernel: Literal["smooth", "standard", "sharp"] = "standard"
    slice_thickness_mm: float = dataclasses.field(default=5.0, metadata={"choices": (2.5, 5.0)})
    inplane_spacing_mm: float = dataclasses.field(default=0.45, metadata=_r(0.3, 0.7))
    gantry_tilt_deg: float = dataclasses.field(default=0.0, metadata=_r(-30.0, 30.0))
    fov_mm: float = dataclasses.field(default=230.0, metadata=_r(180.0, 320.0))


@dataclasses.dataclass(frozen=True)
class ScannerFleet:
    """A site with several scanners: each case is acquired on a scanner drawn from these ranges.

    A hospital's development data rarely come from one scanner; a fleet spanning kernels, noise levels,
    calibration offsets, tilts and fields of view makes the reference models meet that variety in training
    (issue 19, docs/simulations.md). Each case's scanner is drawn from its own seeded stream.
    """

    hu_offset: tuple[float, float] = dataclasses.field(default=(-10.0, 10.0), metadata={"length": 2})
    noise_sd: tuple[float, float] = dataclasses.field(default=(3.0, 15.0), metadata={"length": 2})
    kernels: tuple[str, ...] = ("smooth", "standard", "sharp")
    slice_thickness_mm: tuple[float, ...] = (2.5, 5.0)
    inplane_spacing_mm: tuple[float, float] = dataclasses.field(default=(0.4, 0.56), metadata={"length": 2})
    gantry_tilt_deg: tuple[float, float] = dataclasses.field(default=(-20.0, 20.0), metadata={"length": 2})
    fov_mm: tuple[float, float] = dataclasses.field(default=(205.0, 280.0), metadata={"length": 2})

    def draw(self, rng) -> ScannerProfile:
        """One scanner of the fleet."""
        def u(lo_hi):
            return float(rng.uniform(*lo_hi))

        return ScannerProfile(hu_offset=u(self.hu_offset), noise_sd=u(self.noise_sd),
                              kernel=str(rng.choice(list(self.kernels))),
                              slice_thickness_mm=float(rng.choice(list(self.slice_thickness_mm))),
                              inplane_spacing_mm=u(self.inplane_spacing_mm), gantry_tilt_deg=u(self.gantry_tilt_deg),
                              fov_mm=u(self.fov_mm))


@dataclasses.dataclass(frozen=True)
class NeoplasticMix:
    """Relative frequencies of neoplastic etiologies (normalised on load)."""

    metastasis: float = dataclasses.field(default=0.68, metadata=_r(0.0, 1.0))
    primary_tumour: float = dataclasses.field(default=0.32, metadata=_r(0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class NonNeoplasticMix:
    """Relative frequencies of non-neoplastic etiologies (normalised on load); defaults from Table 1."""

    hypertensive: float = dataclasses.field(default=0.41, metadata=_r(0.0, 1.0))
    amyloid_angiopathy: float = dataclasses.field(default=0.25, metadata=_r(0.0, 1.0))
    anticoagulation: float = dataclasses.field(default=0.06, metadata=_r(0.0, 1.0))
    vascular_malformation: float = dataclasses.field(default=0.28, metadata=_r(0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class PopulationProfile:
    """Who presents with ICH at the site."""

    prevalence: float = dataclasses.field(default=0.40, metadata=_r(0.05, 0.95))
    neoplastic_mix: NeoplasticMix = dataclasses.field(default_factory=NeoplasticMix)
    non_neoplastic_mix: NonNeoplasticMix = dataclasses.field(default_factory=NonNeoplasticMix)
    # Multiplies every hematoma volume: referral centres see larger bleeds.
    lesion_size_scale: float = dataclasses.field(default=1.0, metadata=_r(0.3, 3.0))
    # Multiplies edema volume: later imaging after onset means more edema.
    edema_scale: float = dataclasses.field(default=1.0, metadata=_r(0.5, 2.0))
    age_median: float = dataclasses.field(default=66.0, metadata=_r(20.0, 90.0))
    age_sd: float = dataclasses.field(default=15.0, metadata=_r(1.0, 30.0))
    # Multiplies age-related atrophy (ventricle size, sulcal width).
    atrophy_scale: float = dataclasses.field(default=1.0, metadata=_r(0.0, 2.5))


@dataclasses.dataclass(frozen=True)
class Profile:
    """One simulated site: a name, its scanner and its population."""

    name: str
    description: str = ""
    scanner: ScannerProfile = dataclasses.field(default_factory=ScannerProfile)
    population: PopulationProfile = dataclasses.field(default_factory=PopulationProfile)
    # Several scanners: each case's scanner is drawn from the fleet (``scanner`` is then only the default).
    scanner_fleet: ScannerFleet | None = None


def list_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path | Profile) -> Profile:
    """Load a built-in profile by name, or a profile TOML file by path; validate every field."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    text = str(name_or_path)
    builtin = PROFILE_DIR / f"{text}.toml"
    if "/" not in text and not text.endswith(".toml") and builtin.is_file():
        path = builtin
    elif text.endswith(".toml") or Path(text).is_file():
        path = Path(text)
    else:
        raise IchfedError(f"profile: unknown profile '{text}' (built-in: {', '.join(list_profiles())})")
    data = load_toml(path)
    data.setdefault("name", path.stem)
    profile = from_dict(Profile, data, source=str(path))
    _check_mix(profile, str(path))
    return profile


def _check_mix(profile: Profile, source: str) -> None:
    neo = dataclasses.asdict(profile.population.neoplastic_mix)
    non = dataclasses.asdict(profile.population.non_neoplastic_mix)
    if sum(neo.values()) <= 0:
        raise IchfedError(f"{source}: 'population.neoplastic_mix' must have at least one positive weight")
    if sum(non.values()) <= 0:
        raise IchfedError(f"{source}: 'population.non_neoplastic_mix' must have at least one positive weight")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", profile.name):
        raise IchfedError(f"{source}: 'name' must be 1-64 letters, digits, '.', '_' or '-', got {profile.name!r}")


def etiology_weights(profile: Profile, neoplastic: bool) -> dict[str, float]:
    """Normalised etiology frequencies within one class."""
    mix = profile.population.neoplastic_mix if neoplastic else profile.population.non_neoplastic_mix
    w = dataclasses.asdict(mix)
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}
