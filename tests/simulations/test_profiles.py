"""Site profiles: built-ins load, bad files give one-line errors naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from shared.plumbing.errors import IchfedError
from simulations.profiles import Profile, etiology_weights, list_profiles, load_profile


def test_at_least_six_builtin_profiles_load_and_differ():
    names = list_profiles()
    assert {"charite-like", "hamburg-like"} <= set(names)
    assert len(names) >= 6
    profiles = [load_profile(n) for n in names]
    assert [p.name for p in profiles] == names
    # Every profile differs from the development site in scanner and in population (but the development
    # site's own scanner fleet, which shares its patients).
    dev = load_profile("charite-like")
    for p in profiles:
        if p.name != dev.name and p.scanner_fleet is None:
            assert p.scanner != dev.scanner, p.name
            assert p.population != dev.population, p.name
    for p in profiles:
        assert 3.0 <= p.scanner.noise_sd <= 15.0
        assert -10.0 <= p.scanner.hu_offset <= 10.0
        assert p.scanner.slice_thickness_mm in (2.5, 5.0)
    assert {p.scanner.kernel for p in profiles} == {"smooth", "standard", "sharp"}


def test_development_profile_follows_table_1():
    p = load_profile("charite-like")
    assert p.population.prevalence == pytest.approx(0.40, abs=0.01)
    assert etiology_weights(p, True)["metastasis"] == pytest.approx(0.68, abs=0.01)
    w = etiology_weights(p, False)
    assert sum(w.values()) == pytest.approx(1.0)
    assert w["hypertensive"] > w["vascular_malformation"] > w["anticoagulation"]


def test_profile_from_file_path(tmp_path):
    f = tmp_path / "mysite.toml"
    f.write_text('[scanner]\nnoise_sd = 12\nkernel = "sharp"\n[population]\nprevalence = 0.5\n', encoding="utf-8")
    p = load_profile(str(f))
    assert p.name == "mysite"  # defaults to the file stem
    assert p.scanner.noise_sd == 12.0 and p.scanner.kernel == "sharp"
    assert p.population.prevalence == 0.5
    assert p.population.neoplastic_mix == load_profile("charite-like").population.neoplastic_mix
    assert load_profile(p) is p


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[scanner]\nnoise = 4\n", "unknown key 'scanner.noise'"),
        ("[scanner]\nnoise_sd = 40\n", "'scanner.noise_sd' must be between 3.0 and 15.0"),
        ("[scanner]\nhu_offset = -11\n", "'scanner.hu_offset' must be between -10.0 and 10.0"),
        ("[scanner]\nslice_thickness_mm = 3.0\n", "'scanner.slice_thickness_mm' must be one of"),
        ('[scanner]\nkernel = "bone"\n', "'scanner.kernel' must be one of"),
        ("[population]\nprevalence = 1.5\n", "'population.prevalence' must be between"),
        ("[population.neoplastic_mix]\nglioma = 0.3\n", "unknown key 'population.neoplastic_mix.glioma'"),
        ("[population.neoplastic_mix]\nmetastasis = 0\nprimary_tumour = 0\n", "at least one positive weight"),
        ("[scanner\n", "not valid TOML"),
        ('name = "my site"\n', "'name' must be"),
    ],
)
def test_bad_profile_is_one_line_error_naming_file_and_field(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(IchfedError) as e:
        load_profile(str(f))
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg
    assert str(f) in msg


def test_unknown_profile_name_lists_builtins():
    with pytest.raises(IchfedError, match="unknown profile 'nowhere'.*charite-like"):
        load_profile("nowhere")


def test_profiles_are_frozen():
    p = load_profile("hamburg-like")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.scanner.noise_sd = 3.0  # type: ignore[misc]
    assert isinstance(p, Profile)


def test_a_scanner_fleet_draws_each_cases_scanner_within_its_ranges_and_reproducibly():
    from simulations.cohort import case_rng, make_case

    fleet = load_profile("charite-fleet")
    assert fleet.population == load_profile("charite-like").population  # the same patients, several scanners
    drawn = [fleet.scanner_fleet.draw(case_rng(0, fleet.name, k, "fleet")) for k in range(60)]
    assert {d.kernel for d in drawn} == {"smooth", "standard", "sharp"}
    assert all(-10 <= d.hu_offset <= 10 and 3 <= d.noise_sd <= 15 and -20 <= d.gantry_tilt_deg <= 20 for d in drawn)
    assert len({round(d.noise_sd, 3) for d in drawn}) == 60  # a scanner per case, not one per site
    a, b = make_case("charite-fleet", 3, 0, scale="ci"), make_case("charite-fleet", 3, 0, scale="ci")
    assert a.grid == b.grid and (a.image == b.image).all()
    # a profile without a fleet is unchanged by the fleet's stream
    assert make_case("charite-like", 3, 0, scale="ci").grid == make_case("charite-like", 3, 0, scale="ci").grid
