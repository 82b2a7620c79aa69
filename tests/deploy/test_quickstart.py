"""docs/quickstart.md played for real: a coordinator and two sites on loopback, every command of the
document run in its order as a separate process (``ichfed``, ``flower-superlink``, the kits'
``start-supernode.sh``, ``flwr``), the only changes being host names, ports and folders.

A wrong flag, a missing step (an unregistered key, a kit without its certificate, a site too small
for its default split) or a run that does not finish fails the test. Two commands are not run
as written: ``ichfed bootstrap`` is checked against the CLI's parser, then replaced by the session's
tiny bundle signed with the coordinator's key by ``ichfed bundle sign`` (training takes minutes);
``ichfed site check`` says NOT READY for the tiny test sites and the test applies the fix it names,
as the document tells a site to.

The Flower App is ``git archive HEAD`` of this repository, as the document makes it: uncommitted
changes to client/ or server/ are not in it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ichfed.cli import build_parser
from tests.deploy.harness import BIN, Deployment, free_port, port_open
from tests.deploy.quickstart_doc import REPO, blocks, commands, substitute

pytestmark = pytest.mark.slow

SITES = ("charite", "site-b")
CASES = 14  # too few for the default fine_tune_fraction 0.2: site check must name the fix


class Quickstart:
    """Runs the document's commands for one coordinator and the sites, keeping each one's folder."""

    def __init__(self, root: Path, tiny_bundle) -> None:
        self.root = root
        self.coord = root / "srv-ichfed"
        self.coord.mkdir()
        self.port = free_port()
        self.tiny_bundle = tiny_bundle
        self.dep = Deployment(root, self.coord / "pki" / "ca.crt", self.coord / "pki" / "server.pem",
                              self.coord / "pki" / "server.key", env={"PYTHONPATH": str(REPO)})
        self.subs = [("/srv/ichfed", str(self.coord)), ("~/ichfed", str(REPO)),
                     ("fl.example.org:9093", f"localhost:{self.port}"), ("fl.example.org", "localhost"),
                     ("--port 9093", f"--port {self.port}"), ("--host 0.0.0.0", "--host 127.0.0.1")]
        self.outputs: dict[str, list[str]] = {}
        self.cwd: dict[str, Path] = {"coordinator": root}  # a machine's shell keeps its folder between blocks

    # -- one command -----------------------------------------------------------------------
    def run(self, cmd: str, cwd: Path, who: str) -> tuple[Path, str]:
        """Run one command of the document as ``who``; returns the new working folder and its output."""
        argv = shlex.split(cmd, comments=True)
        if argv[0] == "cd":
            return (cwd / argv[1]).resolve(), ""
        if argv[:2] == ["ichfed", "bootstrap"]:
            return cwd, self._bootstrap(argv, cwd)
        if argv[0] == "flower-superlink":
            self.dep._start("superlink", [str(BIN / argv[0]), *argv[1:]], cwd=cwd)
            self.dep.port = self.port
            self.dep.wait(lambda: port_open(self.port), 120, "the SuperLink to listen", "superlink")
            return cwd, ""
        if argv[0] == "./start-supernode.sh":
            home = self.root / f"flwr-home-{who}"
            home.mkdir(exist_ok=True)
            self.dep._start(who, [str(cwd / argv[0]), *argv[1:]], cwd=cwd,
                            env={"FLWR_HOME": str(home), "SUPERNODE_PORT": str(free_port())})
            return cwd, ""
        if argv[0] == "flwr":
            r = self.dep.flwr(*argv[1:], cwd=cwd, timeout=1200 if argv[1] == "run" else 120,
                              name=f"{who}-flwr-{argv[1]}")
            assert r.returncode == 0, f"{cmd}\n{r.stdout[-5000:]}"
            return cwd, r.stdout
        if argv[:3] == ["ichfed", "site", "check"]:
            return cwd, self._site_check(cmd, cwd)
        return cwd, self.shell(cmd, cwd)

    def shell(self, cmd: str, cwd: Path, ok: tuple[int, ...] = (0,)) -> str:
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=self.dep.env, capture_output=True, text=True, encoding="utf-8",
                           timeout=600)
        assert r.returncode in ok, f"{cmd} (in {cwd}) exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    def _bootstrap(self, argv: list[str], cwd: Path) -> str:
        args = build_parser().parse_args(argv[1:])  # a wrong flag in the document fails here
        assert args.key, "the quick start must sign the reference bundle with the coordinator's key (--key)"
        shutil.copytree(self.tiny_bundle.path, cwd / args.out)
        return self.shell(f"ichfed bundle sign {shlex.quote(args.out)} --key {shlex.quote(args.key)}", cwd)

    def _site_check(self, cmd: str, cwd: Path) -> str:
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=self.dep.env, capture_output=True, text=True, encoding="utf-8",
                           timeout=600)
        if r.returncode == 1:  # the document: do what NOT READY names, then run it again
            m = re.search(r"fix: raise fine_tune_fraction to ([0-9.]+)", r.stdout)
            assert "NOT READY" in r.stdout and m, r.stdout
            config = cwd / shlex.split(cmd)[-1]
            text = config.read_text(encoding="utf-8")
            config.write_text(re.sub(r"(?m)^fine_tune_fraction = .*$", f"fine_tune_fraction = {m.group(1)}", text),
                              encoding="utf-8")
            self.outputs.setdefault("fixes", []).append(m.group(1))
            return self.shell(cmd, cwd)
        assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r.stdout

    # -- the document ------------------------------------------------------------------------
    def play(self) -> None:
        from simulations.cohort import write_cohort

        for role, body in blocks():
            if role == "flwr-config":
                (self.dep.flwr_home / "config.toml").write_text(substitute(body, self.subs), encoding="utf-8")
            elif role == "coordinator":
                self._block(body, "coordinator")
            elif role == "site":
                for i, site in enumerate(SITES):
                    data = self.root / "data" / site
                    if not data.exists():
                        write_cohort("charite-like", CASES, 200 + i, data, scale="ci")
                    if site not in self.cwd:  # the kit arrives on the site's machine over a secure channel
                        self.cwd[site] = self.root / f"machine-{site}"
                        shutil.copytree(self.coord / "kits" / site, self.cwd[site] / site, symlinks=True)
                    subs = [("charite", site), ("/data/ich-site", str(data))]
                    self._block(substitute(body, subs), site)
            else:
                raise AssertionError(f"docs/quickstart.md: unknown block role {role!r}")

    def _block(self, body: str, who: str) -> None:
        for cmd in commands(substitute(body, self.subs)):
            self.cwd[who], out = self.run(cmd, self.cwd[who], who)
            self.outputs.setdefault(who, []).append(out)


def _fingerprints(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("  ")]


def test_quickstart_for_a_coordinator_and_two_sites(tmp_path, tiny_bundle):
    qs = Quickstart(tmp_path, tiny_bundle)
    t0 = time.monotonic()
    try:
        qs.play()
        coordinator = qs.outputs["coordinator"]
        # Each site saw the same fingerprints the coordinator read out.
        theirs = _fingerprints(next(o for o in coordinator if "bundle-signing key" in o))
        assert len(theirs) == 2
        for site in SITES:
            outs = qs.outputs[site]
            assert _fingerprints(next(o for o in outs if "bundle-signing key" in o)) == theirs
            preflight = next(o for o in outs if "node key" in o)
            assert "tls         ok" in preflight and "node key    ok" in preflight and "\nready" in preflight
        assert len(qs.outputs["fixes"]) == len(SITES)  # both tiny sites needed the named fix
        status = coordinator[-1]
        assert "status    finished" in status, status
        from server.run_status import locate_run, report_file

        report = json.loads(report_file(locate_run(qs.coord / "server"), "report.json").read_text(encoding="utf-8"))
        assert sorted(report["run"]["sites"]) == list(SITES)
        assert all(s["status"] == "ok" for s in report["final"]["sites"])
    finally:
        qs.dep.stop_and_check()
    print(f"quick start played in {time.monotonic() - t0:.0f} s")
