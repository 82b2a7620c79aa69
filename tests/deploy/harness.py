"""A real Flower deployment on loopback: SuperLink with TLS and SuperNode authentication,
SuperNodes, and the ``flwr`` CLI with its own FLWR_HOME.

Every process is started in its own session (process group) and the whole group is killed at
teardown, because Flower's children (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``) outlive their parent here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Deployment:
    """Processes of one loopback federation, all stopped by ``stop()``."""

    def __init__(self, root: Path, ca_cert: Path, server_cert: Path, server_key: Path, env: dict | None = None):
        self.root = root
        self.ca_cert = ca_cert
        self.server_cert = server_cert
        self.server_key = server_key
        self.flwr_home = root / "flwr-home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(
            {
                "FLWR_HOME": str(self.flwr_home),
                "PATH": f"{BIN}{os.pathsep}{self.env.get('PATH', '')}",
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
                # colour codes would only make the logs harder to search
                "NO_COLOR": "1",
                "TERM": "dumb",
                # `flwr run --stream` prints the ServerApp's log ("±", "—") through rich; on an ASCII
                # locale it stops with UnicodeEncodeError (docs/deployment.md says the same to users)
                "PYTHONIOENCODING": "utf-8",
            }
        )
        self.env.update(env or {})
        self.procs: dict[str, subprocess.Popen] = {}
        self._log_threads: dict[str, threading.Thread] = {}
        self.port: int | None = None
        self.t0 = time.monotonic()

    # -- processes ----------------------------------------------------------------------------

    def _start(self, name: str, argv: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            argv, cwd=cwd or self.root, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        # Flower's logs carry no time; stamp each line with seconds since the deployment started,
        # so a slow phase can be found in the logs of a failed run.
        t = threading.Thread(target=self._copy_log, args=(proc, self.logs / f"{name}.log"), daemon=True)
        t.start()
        self._log_threads[name] = t
        self.procs[name] = proc
        return proc

    def _copy_log(self, proc: subprocess.Popen, path: Path) -> None:
        with open(path, "wb") as out:
            for line in proc.stdout:
                out.write(f"[{time.monotonic() - self.t0:7.1f}s] ".encode() + line)
                out.flush()

    def log(self, name: str, stamps: bool = True) -> str:
        """The output of process ``name`` so far (with or without the time stamps)."""
        p = self.logs / f"{name}.log"
        text = p.read_text(errors="replace", encoding="utf-8") if p.exists() else ""
        return text if stamps else re.sub(r"(?m)^\[\s*[0-9.]+s\] ", "", text)

    def start_superlink(self, timeout: float = 120) -> int:
        """Start ``flower-superlink`` with TLS and SuperNode auth; return its port once it listens."""
        self.port = free_port()
        self._start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile", str(self.ca_cert),
                "--ssl-certfile", str(self.server_cert),
                "--ssl-keyfile", str(self.server_key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--database", str(self.root / "superlink.db"),
                "--host", "127.0.0.1",
                "--port", str(self.port),
            ],
        )
        self.wait(lambda: port_open(self.port), timeout, "SuperLink to listen", "superlink")
        self.write_connection()
        return self.port

    def write_connection(self, name: str = "tls") -> None:
        """``$FLWR_HOME/config.toml`` with a TLS connection to our SuperLink."""
        (self.flwr_home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{name}"\n\n'
            f"[superlink.{name}]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.ca_cert}"\n', encoding="utf-8")

    def start_supernode(self, name: str, private_key: Path, node_config: str, max_retries: int | None = None,
                        cwd: Path | None = None) -> subprocess.Popen:
        """Start ``flower-supernode`` authenticating with ``private_key``."""
        argv = [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.ca_cert),
            "--auth-supernode-private-key", str(private_key),
            "--node-config", node_config,
            "--port", str(free_port()),
        ]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries), "--max-wait-time", "60"]
        # Each site installs the FAB into its own Flower home, as on separate machines.
        home = self.root / f"flwr-home-{name}"
        home.mkdir(exist_ok=True)
        return self._start(name, argv, cwd=cwd, env={"FLWR_HOME": str(home)})

    def register_and_start_sites(self, site_configs: dict[str, Path], state_root: Path) -> None:
        """Register each site's node key (``<state_root>/<site>/keys/<site>.pub``, as ``ichfed site
        init`` writes it) with the SuperLink, then start its SuperNode with its site config."""
        for name in site_configs:
            r = self.flwr("supernode", "register", str(state_root / name / "keys" / f"{name}.pub"), "tls",
                          name=f"register-{name}")
            assert r.returncode == 0 and "registered successfully" in r.stdout, r.stdout[-2000:]
        for name, cfg in site_configs.items():
            self.start_supernode(name, state_root / name / "keys" / name, f"site-config='{cfg}'")

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink lists as online (0 while it cannot answer)."""
        r = self.flwr("supernode", "list", "tls", "--format", "json", name="list")
        try:
            nodes = json.loads(r.stdout[r.stdout.index("{"):])["nodes"]
        except (ValueError, KeyError):
            return 0
        return sum(1 for n in nodes if n.get("status") == "online")

    def stop_and_check(self) -> None:
        """Stop every process and fail if any process group survived."""
        self.stop()
        survivors = {name: self.group_alive(name) for name in self.procs}
        assert not any(survivors.values()), f"processes survived teardown: {survivors}"

    def flwr(self, *args: str, timeout: float = 120, cwd: Path | None = None, name: str | None = None
             ) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against our FLWR_HOME (in its own process group, killed on timeout)."""
        tag = name or "flwr-" + "-".join(a for a in args[:2] if re.fullmatch(r"[a-z]+", a))
        proc = self._start(tag, [str(BIN / "flwr"), *args], cwd=cwd)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            raise AssertionError(f"flwr {' '.join(args)} timed out after {timeout}s:\n{self.log(tag)[-4000:]}")
        self._log_threads[tag].join(timeout=10)  # the whole output is in the log file before we read it
        return subprocess.CompletedProcess(proc.args, proc.returncode, self.log(tag, stamps=False), "")

    def wait(self, ok, timeout: float, what: str, log_name: str | None = None, interval: float = 0.5) -> None:
        """Poll ``ok()`` until true; fail with the tail of a log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            if log_name and self.procs.get(log_name) is not None and self.procs[log_name].poll() is not None:
                if ok():
                    return
                raise AssertionError(f"{log_name} exited ({self.procs[log_name].returncode}) while waiting for {what}:\n"
                                     f"{self.log(log_name)[-4000:]}")
            time.sleep(interval)
        tail = self.log(log_name)[-4000:] if log_name else ""
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")

    def _kill(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # The group may still hold children even after the leader exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop(self) -> None:
        """Kill every process group we started (SuperNodes first, SuperLink last)."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            self._kill(self.procs[name])

    def group_alive(self, name: str) -> list[int]:
        """PIDs of the group ``name`` that still run (zombies, already dead, are not counted)."""
        pgid = self.procs[name].pid
        alive = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text(encoding="utf-8")
            except OSError:
                continue
            # Fields after the parenthesised command: state, ppid, pgrp, ...
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(d.name))
        return alive
