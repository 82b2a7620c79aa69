"""A site kit: one folder per site with everything a hospital needs to join (``ichfed site kit``).

The coordinator writes it from its PKI folder (``ichfed pki init``) and hands it to the site over
a secure channel (it may hold the site's SuperNode private key). A kit holds:

==================================  ==================================================================
``site.toml``                       the site config; paths relative to the kit (``data/``, ``state/``)
``ca.crt``                          the CA certificate the SuperNode checks the SuperLink against
``bundle_signing_key.pub.pem``      the coordinator's bundle-signing public key (the site trusts only
                                    bundles it signed)
``FINGERPRINTS.txt``                the fingerprints of both, to compare over the phone
``state/keys/<site>[.pub]``         the SuperNode key pair, when the coordinator made it (else the
                                    site puts its own there: ``ichfed site init --state-dir state``)
``supernode.env``                   SuperLink address, certificate, key, config and local port
``start-supernode.sh``              starts ``flower-supernode`` with those settings
``ichfed-supernode-<site>.service`` a systemd unit running the script
``README.md``                       the site's steps, in order
==================================  ==================================================================

``supernode.env`` holds ``KEY=value`` lines without quotes (a systemd ``EnvironmentFile`` and a
shell file at once); relative paths in it are relative to the kit. ``ichfed site preflight``
reads it too.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

from shared.plumbing.atomic import write_text
from shared.plumbing.errors import IchfedError

ENV_NAME = "supernode.env"
START_SCRIPT = "start-supernode.sh"
CONFIG_NAME = "site.toml"
ENV_KEYS = ("SUPERLINK", "ROOT_CERTIFICATES", "NODE_KEY", "SITE_CONFIG", "SUPERNODE_PORT")
_PLAIN = re.compile(r"^[A-Za-z0-9_./:@+-]+$")  # a value a shell and systemd read the same way
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")


@dataclasses.dataclass(frozen=True)
class SiteKit:
    """What ``write_kit`` wrote for one site."""

    site: str
    folder: Path
    fingerprints: dict[str, str]  # file name in the kit -> fingerprint
    has_private_key: bool


def write_kit(pki_dir: str | Path, site: str, superlink: str, out_dir: str | Path, *,
              install_dir: str | None = None, venv: str = "/opt/ichfed/.venv", port: int = 9094,
              force: bool = False) -> SiteKit:
    """Write ``out_dir/<site>/``, the kit of ``site`` (see the module doc).

    ``install_dir`` is where the site will put the kit (the systemd unit needs absolute paths;
    default ``/opt/ichfed/<site>``); ``venv`` the virtual environment holding ichfed there.
    """
    from shared.security.fingerprint import fingerprint_file
    from shared.security.pki import PkiLayout, check_site_name

    check_site_name(site, "--sites")
    check_superlink(superlink)
    layout = PkiLayout.at(pki_dir, (site,))
    node = layout.nodes[0]
    for need, how in ((layout.ca_cert, "ichfed pki init"), (layout.signing_public_key, "ichfed pki init"),
                      (node.public_key, f"ichfed pki init --sites {site}, or save the .pub the site sent there")):
        if not need.is_file():
            raise IchfedError(f"{need}: not found (make it with: {how})")
    folder = Path(out_dir) / site
    if folder.exists() and not force:
        raise IchfedError(f"{folder}: already exists (pass --force to replace the kit)")
    install = install_dir or f"/opt/ichfed/{site}"
    for what, value in (("--install-dir", install), ("--venv", venv)):
        if not value.startswith("/") or not _PLAIN.match(value):
            raise IchfedError(f"{what}: must be an absolute path of letters, digits and ./_-, got {value!r}")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(layout.ca_cert, folder / "ca.crt")
    shutil.copyfile(layout.signing_public_key, folder / layout.signing_public_key.name)
    keys = folder / "state" / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(node.public_key, keys / f"{site}.pub")
    has_private = node.private_key.is_file()
    if has_private:
        from shared.plumbing.atomic import write_private_bytes

        write_private_bytes(keys / site, node.private_key.read_bytes())
    _write_config(folder, site, layout.signing_public_key.name)
    fingerprints = {name: fingerprint_file(folder / name).fingerprint
                    for name in ("ca.crt", layout.signing_public_key.name, f"state/keys/{site}.pub")}
    _write_texts(folder, site, superlink, port, install, venv, fingerprints, has_private)
    return SiteKit(site=site, folder=folder, fingerprints=fingerprints, has_private_key=has_private)


def check_superlink(address: str) -> str:
    """``host:port`` of the SuperLink, or a one-line error."""
    m = _ADDRESS.match(address or "")
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise IchfedError(f"--superlink: must be HOST:PORT (e.g. fl.example.org:9093), got {address!r}")
    return address


def read_env(path: str | Path) -> dict[str, str]:
    """The ``KEY=value`` lines of a kit's ``supernode.env`` (comments and blank lines skipped)."""
    p = Path(path)
    out = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            raise IchfedError(f"{p}: line {n}: expected KEY=value, got {line!r}")
        out[key] = value
    return out


def _write_config(folder: Path, site: str, public_key: str) -> None:
    from .site_config import SiteConfig, load_site_config, write_site_config

    # Relative paths: the kit can be moved; load_site_config resolves them against the TOML's folder.
    cfg = SiteConfig(name=site, data_dir=Path("data"), state_dir=Path("state"), public_key=Path(public_key))
    write_site_config(cfg, folder / CONFIG_NAME)
    load_site_config(folder / CONFIG_NAME)  # what we wrote must read back


def _write_texts(folder: Path, site: str, superlink: str, port: int, install: str, venv: str,
                 fingerprints: dict[str, str], has_private: bool) -> None:
    from . import site_kit_texts as texts

    env = {"SUPERLINK": superlink, "ROOT_CERTIFICATES": "ca.crt", "NODE_KEY": f"state/keys/{site}",
           "SITE_CONFIG": CONFIG_NAME, "SUPERNODE_PORT": str(port)}
    write_text(folder / ENV_NAME, texts.env_file(env))
    write_text(folder / START_SCRIPT, texts.start_script(site))
    (folder / START_SCRIPT).chmod(0o755)
    write_text(folder / f"ichfed-supernode-{site}.service", texts.systemd_unit(site, install, venv))
    write_text(folder / "FINGERPRINTS.txt", texts.fingerprints(site, fingerprints))
    write_text(folder / "README.md", texts.readme(site, superlink, install, has_private))
