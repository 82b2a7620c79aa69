"""Long work off a terminal says it is alive (issue 22 item 3): ``progress.bar`` / ``heartbeat``
print a line at least every ``INTERVAL_S`` (30 s; shortened here), and a command with a log file
names it at the start."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.plumbing import progress

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.3)
    monkeypatch.setattr(progress, "_quiet", False)


def test_heartbeat_names_the_innermost_bar_or_the_last_log_message(fast, capsys):
    with progress.heartbeat("bootstrap"):
        logging.getLogger("server.bootstrap").warning("training nnU-Net")
        time.sleep(0.8)
        for _ in progress.bar(range(4), desc="segment", unit="case"):
            time.sleep(0.25)
    lines = [line for line in capsys.readouterr().err.splitlines() if LINE.match(line)]
    assert any("bootstrap (" in line and "last: training nnU-Net" in line for line in lines), lines
    assert any(re.search(r"bootstrap \(.*\): segment: \d/4 case", line) for line in lines), lines
    assert any("segment: done, 4 case in" in line for line in lines), lines
    stamps = [time.strptime(line[1:9], "%H:%M:%S") for line in lines]
    assert len(stamps) >= 3  # about 1.8 s of work at one line per 0.3 s, at most


def test_quick_work_prints_nothing_and_a_terminal_gets_tqdm(fast, capsys, monkeypatch):
    with progress.heartbeat("quick"):
        for _ in progress.bar(range(3), desc="fast", unit="case"):
            pass
    assert not capsys.readouterr().err
    monkeypatch.setattr(progress, "_on_terminal", lambda: True)
    from tqdm import tqdm

    b = progress.bar(range(2), desc="t", unit="case", disable=True)
    assert isinstance(b, tqdm)
    b.close()


def _ichfed(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ichfed", *args], capture_output=True, text=True, encoding="utf-8",
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})},
                          timeout=300)


def test_a_command_off_a_terminal_prints_progress_lines_and_quiet_silences_them(tmp_path):
    fast = {"ICHFED_PROGRESS_INTERVAL": "0.3"}
    r = _ichfed("cohort", "make", "--profile", "charite-like", "--cases", "12", "--seed", "0", "--scale", "ci",
                "--out", str(tmp_path / "a"), env=fast)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if LINE.match(line)]
    assert any(re.search(r"cohort \(\d+m\d\ds\): cohort charite-like: \d+/12 case", line) for line in lines), r.stderr
    r = _ichfed("-q", "cohort", "make", "--profile", "charite-like", "--cases", "12", "--seed", "0", "--scale", "ci",
                "--out", str(tmp_path / "b"), env=fast)
    assert r.returncode == 0 and not [line for line in r.stderr.splitlines() if LINE.match(line)], r.stderr


def test_the_log_file_is_named_first(tmp_path):
    """The log path comes before anything else, on stdout: stderr keeps its one ``error:`` line."""
    out = tmp_path / "table1"
    r = _ichfed("stats", "--sites", "1", "--bundle", str(tmp_path / "no-bundle"), "--pubkey", str(tmp_path / "k.pem"),
                "--out", str(out))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), r.stderr
    assert r.stdout.splitlines()[0] == f"log: {out / 'ichfed.log'}", r.stdout
