"""`ichfed pki` (not yet available)."""

from shared.errors import IchfedError


def register(sub) -> None:
    p = sub.add_parser("pki", help="(not yet available)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise IchfedError("'ichfed pki' is not yet available in this version")
