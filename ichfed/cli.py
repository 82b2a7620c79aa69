"""The ``ichfed`` command: argument parsing and wiring only.

Each subcommand lives in ``ichfed/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking
the parsed args and returning an exit code. Heavy imports (torch, nnU-Net, Flower)
happen inside those callables so that ``ichfed --help`` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

from shared.plumbing import logs, progress
from shared.plumbing.errors import IchfedError
from shared.plumbing.logs import flush_tallies

from . import __version__

# Order here is the order in `ichfed --help`.
COMMANDS = ["ingest", "cohort", "bootstrap", "predict", "bundle", "site", "federate", "simulate", "stats", "pki", "reader",
            "demo"]
# Commands that can work for minutes: off a terminal they print a progress line at least every 30 s
# (shared.plumbing.progress.heartbeat). The reader serves until stopped: no heartbeat there.
LONG_COMMANDS = {"ingest", "cohort", "bootstrap", "predict", "site", "simulate", "stats", "demo"}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="ichfed",
        description="Federated fine-tuning of an end-to-end neoplastic vs non-neoplastic ICH classifier.",
    )
    parser.add_argument("--version", action="version", version=f"ichfed {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the log (Flower, Ray, per-case details) on the console, not only in the "
                        "run folder's log file")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on the console")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ichfed.commands.{name}").register(sub)
    return parser


def _tolerate_narrow_consoles() -> None:
    # Results hold "±" and "—"; a console whose locale is plain ASCII must show them escaped rather
    # than end the run with UnicodeEncodeError after the work is done. Files are always UTF-8.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # `ichfed ... | head` closed our stdout: stop quietly, like any Unix filter. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a filter stopped by a closed pipe


def _main(argv: list[str] | None) -> int:
    _tolerate_narrow_consoles()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help/--version printed: flush here, where a closed pipe is handled
        sys.stdout.flush()
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _setup_logging(args)
        with progress.heartbeat(args.command) if args.command in LONG_COMMANDS else contextlib.nullcontext():
            code = int(args.func(args) or 0)
        flush_tallies()  # repeated case-level conditions, once each
        sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's shutdown
        return code
    except IchfedError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _log_dir(args) -> Path | None:
    """The run folder of commands that have one (simulate, stats, demo: --out; bootstrap: its work folder)."""
    if args.command in ("simulate", "stats", "demo"):
        return Path(args.out)
    if args.command == "bootstrap":
        return Path(args.work) if args.work else Path(args.out).parent / f"{Path(args.out).name}-work"
    return None


def _setup_logging(args) -> Path | None:
    """Console: progress, results, warnings; everything else in the run folder's log file (returned).

    The file is named first, on stdout: a job's log shows where to look before anything else, and
    stderr keeps its contract of one ``error:`` line for bad input.
    """
    progress.set_quiet(args.quiet)
    log_file = logs.setup(_log_dir(args), verbose=args.verbose, debug=args.debug, quiet=args.quiet)
    if log_file is not None and not args.quiet:
        print(f"log: {log_file}", flush=True)
    return log_file


if __name__ == "__main__":
    sys.exit(main())
