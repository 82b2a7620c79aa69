"""Options shared by the commands that load a bundle (``ichfed predict``, ``ichfed reader``).

A command module never imports another command; what two of them share lives here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


def add_bundle_args(p) -> None:
    """Options every command that loads a bundle shares."""
    p.add_argument("--bundle", help="model bundle directory or .tar (default with --site-config: the site's active "
                   "model, the bundle it adopted)")
    p.add_argument("--pubkey", help="coordinator's Ed25519 public key that must have signed the bundle")
    p.add_argument(
        "--site-config",
        help="site config TOML: its public key verifies the bundle and its locally calibrated threshold is used",
    )
    p.add_argument(
        "--allow-unsigned", action="store_true", help="development only: accept a bundle without a valid signature"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (default: auto)")


def load_predictor(args):
    """The ``Predictor`` the parsed options name (``client.site_predictor.open_predictor``)."""
    from client.site_predictor import open_predictor

    mirroring = {"auto": None, "on": True, "off": False}[getattr(args, "mirroring", "auto")]
    return open_predictor(args.bundle, pubkey=args.pubkey, site_config=getattr(args, "site_config", None),
                          allow_unsigned=args.allow_unsigned, device=args.device, use_mirroring=mirroring,
                          tile_step_size=getattr(args, "tile_step_size", 0.5))


def default_public_key(bundle: str) -> Path:
    """The development public key ``ichfed bootstrap`` writes beside a bundle, if it is there."""
    from shared.security.keys import PUBLIC_KEY_NAME

    b = Path(bundle).resolve()
    candidate = b.parent / f"{b.name}-keys" / PUBLIC_KEY_NAME
    if not candidate.is_file():
        raise IchfedError(f"--pubkey: not given and no development key at {candidate}")
    log.info("verifying the bundle with %s", candidate)
    return candidate
