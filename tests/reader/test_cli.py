"""`ichfed reader` as a user runs it: a real process, a real bundle, a real site config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _ichfed(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ichfed", *args], cwd=REPO, capture_output=True, text=True,
                          encoding="utf-8", timeout=120, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_names_the_options_and_loopback_default():
    r = _ichfed("reader", "--help")
    assert r.returncode == 0
    for opt in ("--bundle", "--threshold-from", "--host", "--port", "--max-upload-mb"):
        assert opt in r.stdout
    assert "127.0.0.1" in r.stdout


def test_missing_bundle_is_one_error_line(tmp_path):
    r = _ichfed("reader", "--bundle", str(tmp_path / "nope"), "--allow-unsigned", "--port", str(_free_port()))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr
    r = _ichfed("reader", "--bundle", str(tmp_path / "nope"), "--allow-unsigned", "--port", "70000")
    assert r.returncode == 2 and "--port" in r.stderr


@pytest.mark.slow
def test_reader_serves_with_the_sites_locally_calibrated_threshold(tiny_bundle, tmp_path):
    from shared.bundle import bundle_hash

    state = tmp_path / "state"
    (state / "thresholds").mkdir(parents=True)
    (state / "thresholds" / f"{bundle_hash(tiny_bundle.path)}.json").write_text(
        json.dumps({"bundle_hash": bundle_hash(tiny_bundle.path), "threshold": 0.12, "source": "test"}), encoding="utf-8")
    (tmp_path / "data").mkdir()
    site = tmp_path / "site.toml"
    site.write_text(
        f'name = "test-site"\ndata_dir = "data"\nstate_dir = "state"\npublic_key = "{tiny_bundle.public_key}"\n'
        'device = "cpu"\n', encoding="utf-8")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ichfed", "reader", "--bundle", str(tiny_bundle.path), "--threshold-from", str(site),
         "--device", "cpu", "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8"
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        info = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                info = httpx.get(f"{url}/api/info", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert info is not None, proc.stderr.read() if proc.poll() is not None else "reader did not start"
        assert info["threshold"] == pytest.approx(0.12) and info["threshold_source"] == "site"
        assert info["bundle"]["hash"] == bundle_hash(tiny_bundle.path)
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "ichfed reader" in page.text
        assert httpx.get(f"{url}/static/reader.js").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in out
