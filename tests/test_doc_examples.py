"""Every command in a fenced example of README.md and docs/*.md works as written (issue 22 items 1, 7).

- each ``ichfed`` command parses with the real CLI parser (a wrong flag or a missing required
  option fails); a synopsis's ``[optional]`` parts are dropped and ``a|b`` takes ``a``;
- each ``flwr`` / ``flower-superlink`` / ``flower-supernode`` flag exists in that tool's ``--help``;
- the cheap ones run for real in a scratch folder (``pki init``, ``bundle keygen``, ``cohort profiles``),
  and every documented ``ichfed simulate`` on a few simulated sites gets its cohorts made and
  passes the split check it would run first: with the documented values every site can train;
- every ``ichfed`` subcommand's ``--help`` renders (no stray ``%%``), and pyproject.toml's licence
  is the SPDX string setuptools reads without a deprecation warning.

The quick start itself runs end to end in tests/deploy/test_quickstart.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ichfed.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
REAL = {("pki", "init"), ("bundle", "keygen"), ("cohort", "profiles")}


def doc_commands(prefixes=("ichfed", "flwr", "flower-superlink", "flower-supernode")) -> list[tuple[str, str]]:
    """``(where, command)`` of every command line in a fenced block of the docs."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
            first = text[:m.start()].count("\n") + 2
            lines = re.sub(r"\\\n\s*", " ", m.group(1)).splitlines()
            for k, line in enumerate(lines):
                words = line.split()
                if words and words[0] in prefixes:
                    out.append((f"{path.relative_to(REPO)}:{first + k}", _complete(line, lines[k + 1:])))
    return out


def _complete(line: str, rest: list[str]) -> str:
    """``line`` with the following lines joined while a quoted argument is still open."""
    for nxt in [None, *rest]:
        if nxt is not None:
            line = f"{line} {nxt.strip()}"
        try:
            shlex.split(line, comments=True)
            return line.strip()
        except ValueError:  # "No closing quotation": the run config goes on below
            continue
    raise AssertionError(f"unbalanced quotes in a documented command: {line}")


def _argv(command: str) -> list[str] | None:
    """The arguments of a documented ``ichfed`` command, synopsis notation resolved; None for a
    line that elides arguments ("...")."""
    if "..." in command or "…" in command:
        return None
    command = re.sub(r"\s\[[^\]]*\]", "", command)  # [optional parts]
    argv = shlex.split(command, comments=True)[1:]
    argv = [a.split("|")[0] if "|" in a and not a.startswith("-") else a for a in argv]
    return ["1" if re.fullmatch(r"[A-Z]{1,2}", a) else a for a in argv]  # N, S, K: a number


def _parse(argv: list[str]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(argv), ""
        except SystemExit:
            return None, err.getvalue().strip().splitlines()[-1]


def test_every_documented_ichfed_command_parses():
    checked, bad = 0, []
    for where, command in doc_commands(("ichfed",)):
        argv = _argv(command)
        if argv is None:
            continue
        args, err = _parse(argv)
        checked += 1
        if args is None:
            bad.append(f"{where}: `{command}`: {err}")
    assert not bad, "\n".join(bad)
    assert checked >= 25, checked


def _help_flags(tool: str, sub: list[str]) -> set[str]:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    r = subprocess.run([str(BIN / tool), *sub, "--help"], capture_output=True, text=True, encoding="utf-8",
                       env=env, timeout=120)
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", r.stdout + r.stderr))


def test_every_documented_flower_flag_exists():
    cache: dict[tuple, set[str]] = {}
    bad, checked = [], 0
    for where, command in doc_commands(("flwr", "flower-superlink", "flower-supernode")):
        words = shlex.split(command, comments=True)
        tool = words[0]
        sub = [w for w in words[1:3] if re.fullmatch(r"[a-z]+", w)] if tool == "flwr" else []
        if tool == "flwr" and sub and sub[0] != "supernode":
            sub = sub[:1]  # `flwr run APP FED`: APP and FED are arguments, not subcommands
        key = (tool, *sub)
        if key not in cache:
            cache[key] = _help_flags(tool, sub)
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            checked += 1
            if flag not in cache[key]:
                bad.append(f"{where}: `{' '.join(key)}` has no {flag}")
    assert not bad, "\n".join(bad)
    assert checked >= 15, checked


def test_cheap_documented_commands_run_for_real(tmp_path, monkeypatch, capsys):
    ran = []
    for k, (where, command) in enumerate(doc_commands(("ichfed",))):
        argv = _argv(command)
        if argv is None or tuple(argv[:2]) not in REAL:
            continue
        (tmp_path / str(k)).mkdir()
        monkeypatch.chdir(tmp_path / str(k))  # each in a fresh folder, as on a new machine
        assert main(argv) == 0, f"{where}: `{command}`: {capsys.readouterr().err}"
        ran.append(tuple(argv[:2]))
    assert set(ran) == REAL


def test_documented_simulations_pass_their_split_check(tmp_path):
    """Each documented `ichfed simulate` of simulated sites, with its own values and the defaults
    for the rest, has sites big enough to train (the check it runs before any preprocessing)."""
    from simulations.flower_sim import (
        check_splits,
        make_cohorts,
        plan_sites,
        write_site_configs,
    )

    checked = 0
    for k, (where, command) in enumerate(doc_commands(("ichfed",))):
        argv = _argv(command)
        if not argv or argv[0] != "simulate":
            continue
        args, _ = _parse(argv)
        if args is None or not args.sites or args.site_dirs or args.sites > 4:
            continue  # existing site folders are the user's; 100 sites are only parsed
        out = tmp_path / f"sim{k}"
        specs = plan_sites(out, n_sites=args.sites, profiles=args.profiles.split(",") if args.profiles else None,
                           cases_per_site=args.cases_per_site, seed=args.seed)
        make_cohorts(specs, args.scale)
        paths = write_site_configs(out, specs, tmp_path / "coordinator.pub.pem", fine_tune_fraction=args.fine_tune_fraction,
                                   min_cases_for_metrics=args.min_cases, first_seed=args.seed)
        check_splits(paths, args.min_sites or len(specs))  # raises naming the fix when a site is too small
        checked += 1
    assert checked >= 3, checked


def test_every_help_renders_without_stray_percent_signs(capsys):
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    for name in COMMANDS:
        for argv in [[name]] + [[name, action] for action in _actions(subparsers[name])]:
            assert main([*argv, "--help"]) == 0
            text = capsys.readouterr().out
            assert "%%" not in text and "%(" not in text, f"ichfed {' '.join(argv)} --help:\n{text}"
    main(["bootstrap", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "held-out 10% and" in text and "ci about 5 min on 2 CPU cores" in text and "paper hours" in text


def _actions(parser) -> list[str]:
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sorted(subs[0].choices) if subs else []


def test_project_licence_is_the_spdx_string(tmp_path):
    """setuptools reads it without the "TOML table is deprecated" warning `pip install` printed."""
    import shutil

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "README.md").write_text("x", encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dist = apply_configuration(Distribution(), "pyproject.toml")
    finally:
        os.chdir(cwd)
    assert dist.metadata.license_expression == "Apache-2.0"
    assert not [w for w in caught if "license" in str(w.message).lower()]


@pytest.mark.parametrize("name", ["quickstart.md", "deployment.md"])
def test_deployment_docs_name_how_to_stop_and_watch_a_run(name):
    text = (REPO / "docs" / name).read_text(encoding="utf-8")
    assert "flwr stop" in text and "ichfed federate status" in text
