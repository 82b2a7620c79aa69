"""The text files of a site kit (``client.site_kit``): settings, start script, systemd unit, README."""

from __future__ import annotations


def env_file(env: dict[str, str]) -> str:
    """``supernode.env``: plain ``KEY=value`` lines (a shell and systemd read them alike)."""
    head = ("# Settings of this site's Flower SuperNode, written by `ichfed site kit`.\n"
            "# Read by start-supernode.sh and `ichfed site preflight`. Relative paths are relative to this\n"
            "# folder. No quotes and no spaces: edit a value in place.\n")
    return head + "".join(f"{k}={v}\n" for k, v in env.items())


def start_script(site: str) -> str:
    """``start-supernode.sh``: ``flower-supernode`` with the kit's settings; extra arguments pass through."""
    return f"""#!/bin/sh
# Start the Flower SuperNode of site {site} (written by `ichfed site kit`).
# Settings: supernode.env beside this script. SUPERNODE_PORT set in the environment wins (two
# SuperNodes on one host need two ports). Extra arguments go to flower-supernode (e.g. --max-retries 5).
set -eu
KIT=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
port_from_environment=${{SUPERNODE_PORT:-}}
. "$KIT/supernode.env"
SUPERNODE_PORT=${{port_from_environment:-$SUPERNODE_PORT}}
in_kit() {{ case "$1" in /*) printf '%s\\n' "$1" ;; *) printf '%s\\n' "$KIT/$1" ;; esac; }}
# The ClientApp prints "±" and "—"; a plain ASCII console must not stop it.
export PYTHONIOENCODING=${{PYTHONIOENCODING:-utf-8}}
exec flower-supernode \\
  --superlink "$SUPERLINK" \\
  --root-certificates "$(in_kit "$ROOT_CERTIFICATES")" \\
  --auth-supernode-private-key "$(in_kit "$NODE_KEY")" \\
  --node-config "site-config='$(in_kit "$SITE_CONFIG")'" \\
  --port "$SUPERNODE_PORT" \\
  "$@"
"""


def systemd_unit(site: str, install: str, venv: str) -> str:
    """``ichfed-supernode-<site>.service``: the start script under systemd, restarted on failure."""
    return f"""# systemd unit of the ichfed SuperNode of site {site} (written by `ichfed site kit`).
# Install: copy the kit to {install}, then
#   sudo useradd --system --home {install} ichfed && sudo chown -R ichfed: {install}
#   sudo cp {install}/ichfed-supernode-{site}.service /etc/systemd/system/
#   sudo systemctl daemon-reload && sudo systemctl enable --now ichfed-supernode-{site}
# Logs: journalctl -u ichfed-supernode-{site} -f
[Unit]
Description=ichfed SuperNode of site {site} (Flower)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=ichfed
WorkingDirectory={install}
Environment=PATH={venv}/bin:/usr/local/bin:/usr/bin:/bin
Environment=PYTHONIOENCODING=utf-8
# Threads for torch and BLAS; CPUQuota/MemoryMax cap what the site's training may take.
Environment=OMP_NUM_THREADS=4
#CPUQuota=400%
#MemoryMax=8G
ExecStart={install}/start-supernode.sh
Restart=on-failure
RestartSec=30
# Flower's children (flwr-clientapp) outlive their parent: stop the whole control group.
KillMode=control-group
TimeoutStopSec=60

[Install]
WantedBy=multi-user.target
"""


def fingerprints(site: str, found: dict[str, str]) -> str:
    """``FINGERPRINTS.txt``: what to compare with the coordinator over another channel."""
    lines = [f"Fingerprints of the files in the kit of site {site}.",
             "Compare them with what the coordinator reads to you over the phone (or sends by letter)",
             "before you start the SuperNode: `ichfed pki fingerprint FILE` prints them again.", ""]
    lines += [f"{name}\n  {fp}" for name, fp in found.items()]
    return "\n".join(lines) + "\n"


def readme(site: str, superlink: str, install: str, has_private: bool) -> str:
    """``README.md``: the site's steps, in order."""
    key = ("`state/keys/{0}` is this site's SuperNode private key: keep the kit readable by the ichfed "
           "user only.".format(site) if has_private else
           "The coordinator holds only your SuperNode *public* key: put your private key (from `ichfed site "
           f"init --name {site} ... --state-dir state`) at `state/keys/{site}`.")
    return f"""# ichfed site kit: {site}

The coordinator's SuperLink: `{superlink}`. {key}

1. Check the fingerprints of `ca.crt` and `bundle_signing_key.pub.pem` against what the coordinator
   reads to you (`FINGERPRINTS.txt`, or `ichfed pki fingerprint ca.crt bundle_signing_key.pub.pem`).
2. Put your site folder (`cases.csv`, `images/`, `masks/`) at `data/`, or point `data_dir` in
   `site.toml` at it (e.g. `ln -s /data/ich-site data`).
3. `ichfed site check site.toml`: reads every case and computes the split a run will use; it says
   NOT READY with the fix when the site is too small (e.g. raise `fine_tune_fraction` in `site.toml`).
4. `ichfed site preflight site.toml`: reaches the SuperLink over TLS with this site's key and runs
   the check; exit 0 means ready.
5. Start the SuperNode: `./start-supernode.sh`, or under systemd with
   `ichfed-supernode-{site}.service` (install steps in the unit file; copy the kit to `{install}`).

Nothing leaves this site but head weights and aggregate counts (docs/federation.md).
"""
