"""Onboarding a hospital site: a validated site config and the site's SuperNode key pair (``ichfed site init``)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SiteInit:
    """What ``init_site`` wrote."""

    config_path: Path
    private_key: Path
    public_key: Path
    new_key: bool


def node_key_paths(state_dir: Path, name: str) -> tuple[Path, Path]:
    """Where a site's SuperNode key pair lives: ``<state_dir>/keys/<name>`` and ``.pub``."""
    return state_dir / "keys" / name, state_dir / "keys" / f"{name}.pub"


def init_site(
    name: str,
    data_dir: Path,
    out: Path | None = None,
    state_dir: Path | None = None,
    public_key: Path | None = None,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    new_key: bool = False,
) -> SiteInit:
    """Write a validated site config and make (or keep) the site's SuperNode key pair.

    Paths are stored absolute so the SuperNode can be started from any folder. An existing
    key pair is kept by default because the coordinator has registered its public half.
    """
    from shared.plumbing.config import from_dict
    from shared.security.pki import check_site_name, write_node_keypair

    from .site_config import SiteConfig, load_site_config, write_site_config

    check_site_name(name, "--name")
    data = Path(data_dir).resolve()
    if not data.is_dir():
        raise IchfedError(f"--data: {data} is not a folder")
    if not (data / "cases.csv").is_file():
        raise IchfedError(f"--data: {data / 'cases.csv'} not found (a site folder holds cases.csv, images/, masks/)")
    if public_key is not None:
        from shared.security.keys import load_public_key

        load_public_key(public_key)  # a wrong file is caught now, not at the first federated round
    state = (Path(state_dir) if state_dir is not None else Path(".ichfed") / "sites" / name).resolve()
    config_path = Path(out) if out is not None else Path("site_configs") / f"{name}.toml"
    if config_path.exists() and not force:
        raise IchfedError(f"{config_path}: already exists (pass --force to replace it)")
    raw = {"name": name, "data_dir": str(data), "state_dir": str(state), "device": device, **(overrides or {})}
    if public_key is not None:
        raw["public_key"] = str(Path(public_key).resolve())
    cfg = from_dict(SiteConfig, raw, source="ichfed site init")
    private, public = node_key_paths(state, name)
    made = False
    if new_key or not private.exists() or not public.exists():
        write_node_keypair(private, public, force=True)
        made = True
    else:
        from shared.security.pki import load_node_public_key

        load_node_public_key(public)
        log.info("keeping existing SuperNode key %s", private)
    write_site_config(cfg, config_path)
    load_site_config(config_path)  # what we wrote must read back
    return SiteInit(config_path=config_path.resolve(), private_key=private, public_key=public, new_key=made)
