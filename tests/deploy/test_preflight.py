"""`ichfed site preflight` against a real SuperLink (TLS, SuperNode authentication) on loopback, and
a site kit's start script bringing its SuperNode online (issue 22 item 5).

No bundle and no run: the preflight only connects, and the SuperNode only registers itself online.
"""

from __future__ import annotations

import pytest

from client.site_kit import write_kit
from ichfed.cli import main
from shared.security.pki import init_pki
from tests.deploy.harness import Deployment, free_port
from tests.deploy.test_site_onboarding import _ct

pytestmark = pytest.mark.slow


def _data(folder, n=30):
    """A site folder of ``n`` small labelled CT volumes (half neoplastic): enough for the default split."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        _ct(folder / "images" / f"c{i:02d}.nii.gz", i)
        rows.append(f"c{i:02d},{'neoplastic' if i % 2 else 'non-neoplastic'}")
    (folder / "cases.csv").write_text("case_id,label\n" + "\n".join(rows) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    pki = init_pki(root / "pki", "localhost", ["charite", "rogue"])
    dep = Deployment(root, pki.ca_cert, pki.server_cert, pki.server_key)
    try:
        port = dep.start_superlink()
        r = dep.flwr("supernode", "register", str(pki.nodes[0].public_key), "tls", name="register")
        assert r.returncode == 0 and "registered successfully" in r.stdout, r.stdout
        kits = {}
        for site in ("charite", "rogue"):
            kits[site] = write_kit(pki.root, site, f"localhost:{port}", root / "kits").folder
            _data(kits[site] / "data")
        yield dep, kits, root
    finally:
        dep.stop_and_check()


def test_registered_site_is_ready_and_left_offline(link, capsys):
    dep, kits, _ = link
    assert main(["site", "preflight", str(kits["charite"] / "site.toml"), "--headers-only"]) == 0
    out = capsys.readouterr().out
    assert "tls         ok: TLS" in out and "certificate verified for localhost" in out
    assert "node key    ok: key registered: the SuperLink knows this site as node" in out
    assert out.rstrip().endswith("ready")
    assert dep.online_nodes() == 0  # activated and deactivated at once: no SuperNode pretends to be there


def test_unregistered_key_wrong_ca_and_no_superlink_are_not_ready(link, capsys, tmp_path):
    dep, kits, _ = link
    assert main(["site", "preflight", str(kits["rogue"] / "site.toml"), "--headers-only"]) == 1
    out = capsys.readouterr().out
    assert "node key    FAILED: the SuperLink refused this site's key: it is not registered" in out
    assert "NOT READY: registered:" in out

    other = init_pki(tmp_path / "other", "localhost")
    assert main(["site", "preflight", str(kits["charite"] / "site.toml"), "--headers-only",
                 "--root-certificates", str(other.ca_cert)]) == 1
    out = capsys.readouterr().out
    assert "tls         FAILED: TLS handshake failed: certificate verify failed" in out
    assert "node key    FAILED: not tried" in out

    assert main(["site", "preflight", str(kits["charite"] / "site.toml"), "--headers-only",
                 "--superlink", f"localhost:{free_port()}"]) == 1
    assert "tls         FAILED: cannot reach localhost:" in capsys.readouterr().out


def test_kit_start_script_brings_the_supernode_online(link, capsys):
    dep, kits, root = link
    home = root / "flwr-home-charite"
    home.mkdir(exist_ok=True)
    dep._start("charite", [str(kits["charite"] / "start-supernode.sh")], cwd=kits["charite"],
               env={"FLWR_HOME": str(home), "SUPERNODE_PORT": str(free_port())})
    dep.wait(lambda: dep.online_nodes() == 1, 120, "the kit's SuperNode online", "charite", interval=2)
    # With its SuperNode online the key cannot be activated a second time: preflight says so.
    assert main(["site", "preflight", str(kits["charite"] / "site.toml"), "--headers-only"]) == 1
    assert "a SuperNode with this key is online already" in capsys.readouterr().out
