"""`ichfed ingest` (not yet available)."""

from shared.errors import IchfedError


def register(sub) -> None:
    p = sub.add_parser("ingest", help="(not yet available)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise IchfedError("'ichfed ingest' is not yet available in this version")
