"""`ichfed simulate --ray-address`: 3 ci sites on a Ray head started here, and what a newcomer sees.

The Ray head is a real `ray start --head --block` (a free port, a private temp folder so no other
Ray user on this machine picks it up), stopped by its process group afterwards even when the test
fails. The same run checks the console: a handful of lines, no Flower line twice, no deprecation
banner; the details are in OUT/ichfed.log, the events in OUT/server/events.jsonl and each site's
state folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """(address, temp dir) of a Ray head with 2 CPUs; stopped by PID (its process group) afterwards."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's unix sockets live under it
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
           "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
           f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
           f"--ray-client-server-port={_free_port()}", f"--min-worker-port={_free_port()}",
           "--max-worker-port=0"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, encoding="utf-8")
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}: {head.stdout.read()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail("the Ray head did not open its port within 180 s")
            time.sleep(1.0)
        time.sleep(3.0)  # the GCS answers before the raylet has registered the node
        yield address, temp
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp, ignore_errors=True)


def test_simulate_on_a_ray_cluster_with_a_readable_console(tiny_bundle, ray_head, tmp_path):
    address, temp = ray_head
    out = tmp_path / "sim"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ichfed"), "simulate", "--sites", "3", "--rounds", "2", "--cases-per-site", "12",
           "--fine-tune-fraction", "0.5", "--local-epochs", "3", "--bundle", str(tiny_bundle.path),
           "--pubkey", str(tiny_bundle.public_key), "--out", str(out), "--ray-address", address]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1100, encoding="utf-8")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # It ran on that cluster: the head's session logs name the sites' actors.
    sessions = list(Path(temp).glob("session_*/logs"))
    assert sessions and any("ClientAppActor" in p.name
                            or "ClientAppActor" in p.read_text(encoding="utf-8", errors="ignore")
                            for s in sessions for p in s.glob("worker-*.out")), "no ClientApp actor on the head"

    console = [line for line in proc.stderr.splitlines() if line.strip()]
    # Timestamped progress lines come every 30 s (how many depends on the machine's speed); the
    # rest of the console must stay a handful of lines.
    other = [line for line in console if not re.search(r"\[\d\d:\d\d:\d\d\] ", line)]
    assert len(other) <= 3, "\n".join(console)
    assert proc.stdout.splitlines()[0] == f"log: {out / 'ichfed.log'}"  # named once, first
    assert proc.stdout.count("log: ") == 1
    assert not any("DEPRECATED" in line or "deprecated feature" in line for line in console)
    assert not any("alembic" in line or "FutureWarning" in line for line in console)
    assert "Federated" in proc.stdout  # the four-arm table is the result

    log_text = (out / "ichfed.log").read_text(encoding="utf-8")
    flower = [line.split(": ", 1)[1] for line in log_text.splitlines() if " INFO flwr: " in line]
    assert "[ROUND 1/2]" in flower and "[ROUND 2/2]" in flower
    rounds = Counter(line for line in flower if line.startswith("[ROUND"))
    assert set(rounds.values()) == {1}, rounds  # each Flower record once, not twice
    assert "DEPRECATED FEATURE" not in log_text

    from server.run_folder import latest_run

    events = [json.loads(line)
              for line in (latest_run(out / "server") / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    finished = [e for e in events if e["event"] == "round_finished"]
    assert [e["round"] for e in finished] == [1, 2]
    assert all(e["train"] == {"expected": 3, "answered": 3, "refused": 0, "missing": 0} for e in finished)
    assert all(e["head_bytes_sent"] > 0 and e["update_norm_max"] > 0 for e in finished)
    assert (out / "report" / "rounds.png").stat().st_size > 1000

    for i in (1, 2, 3):
        site_log = out / "sites" / f"site-{i}" / "state" / "events.jsonl"
        site_events = [json.loads(line) for line in site_log.read_text(encoding="utf-8").splitlines()]
        stages = [e["stage"] for e in site_events if e["event"] == "stage_finished"]
        assert stages.count("train") == 2 and "query.final" in stages, stages
        assert (out / "sites" / f"site-{i}" / "state" / "site.log").stat().st_size > 0
