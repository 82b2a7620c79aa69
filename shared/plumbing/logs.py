"""One logging setup for every ichfed process: a short console, a full log file.

The console (stderr) shows warnings and errors from ichfed itself and errors from libraries;
results are printed by the commands and progress is a ``tqdm`` bar (``shared.plumbing.progress``).
Everything else (Flower's strategy banner, alembic's plugin lines, Ray's and other libraries'
``warnings``, per-case details) goes to a log file in the run folder, whose path is printed
once. ``verbose`` brings INFO of every logger back to the console, ``debug`` DEBUG.

A condition that repeats case after case (a lesion cut off by the crop, say) is logged with
:func:`tally` at DEBUG (the file keeps each occurrence) and summarised once by
:func:`flush_tallies` ("lesion reaches beyond the 32x32x20 crop: 37 of 120 cases").
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
from pathlib import Path

LOG_NAME = "ichfed.log"
# Our own packages: their warnings reach the console; libraries' only from ERROR up.
OWN_PACKAGES = ("ichfed", "shared", "client", "server", "simulations", "benchmarks", "__main__")
_FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
_MARK = "_ichfed_handler"  # attribute marking the handlers this module installed

log = logging.getLogger(__name__)


class _ConsoleFilter(logging.Filter):
    """WARNING+ from ichfed's packages, ERROR+ from libraries (unless verbose)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if record.name == "py.warnings":
            return False  # library warnings (Ray's FutureWarning, ...) are for the file
        if getattr(record, "console", False):
            return True  # a summary meant for the console (flush_tallies)
        own = record.name.split(".", 1)[0] in OWN_PACKAGES
        return record.levelno >= (logging.WARNING if own else logging.ERROR)


def _remove_ours(root: logging.Logger) -> None:
    for h in list(root.handlers):
        # Ours, or a plain basicConfig console; test harnesses' capture handlers stay.
        if getattr(h, _MARK, False) or type(h) is logging.StreamHandler:
            root.removeHandler(h)
            if getattr(h, _MARK, False) and isinstance(h, logging.FileHandler):
                h.close()


def quiet_flower() -> None:
    """Drop Flower's own console handler: its records then reach the console (or the file)
    once, through the root logger, instead of twice (Flower's handler and ours)."""
    try:
        from flwr.supercore.logger import FLOWER_LOGGER, ConsoleHandler
    except ImportError:  # Flower not installed: nothing to quiet
        return
    for h in list(FLOWER_LOGGER.handlers):
        if isinstance(h, ConsoleHandler):
            FLOWER_LOGGER.removeHandler(h)
    FLOWER_LOGGER.propagate = True


def setup(log_dir: str | Path | None = None, *, verbose: bool = False, debug: bool = False,
          quiet: bool = False, name: str = LOG_NAME) -> Path | None:
    """Configure the root logger for this process; returns the log file's path (or None).

    Parameters
    ----------
    log_dir : folder of the log file (created); None keeps everything on the console.
    verbose : INFO of every logger on the console too (``-v``).
    debug : DEBUG on the console and in the file (``--debug``).
    quiet : only errors on the console.
    """
    root = logging.getLogger()
    _remove_ours(root)
    _take_tallies()  # counts from before this run's set-up belong to no summary of it
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    setattr(console, _MARK, True)
    if quiet:
        console.setLevel(logging.ERROR)
    console.addFilter(_ConsoleFilter(verbose or debug or log_dir is None))
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if not (verbose or debug)
                                           else "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    path = None
    if log_dir is not None:
        path = Path(log_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path, encoding="utf-8")
        setattr(fh, _MARK, True)
        fh.setFormatter(logging.Formatter(_FILE_FORMAT))
        root.addHandler(fh)
        logging.getLogger("ichfed").info("=== %s", " ".join(sys.argv))  # where one run's lines begin
    # Library warnings (Ray's FutureWarning, ...) into the file. Off then on: a second set-up in
    # one process (tests, a notebook) must re-install the hook if someone replaced showwarning since.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    # alembic (pulled in by Flower's link state) logs its plugin set-up at INFO: file only, and
    # only with --debug.
    logging.getLogger("alembic").setLevel(logging.DEBUG if debug else logging.WARNING)
    if "flwr" in sys.modules:  # otherwise the simulation runner quiets it once it is loaded
        quiet_flower()
    return path


# -- repeated case-level conditions ---------------------------------------------------------

_tallies: dict[str, list[int]] = collections.OrderedDict()
_lock = threading.Lock()


def tally(logger: logging.Logger, condition: str, hit: bool, detail: str = "") -> None:
    """Count one case for ``condition`` (``hit`` when it holds); a hit is logged at DEBUG.

    The count is reported once by :func:`flush_tallies` instead of one INFO line per case.
    """
    with _lock:
        counts = _tallies.setdefault(condition, [0, 0])
        counts[0] += int(bool(hit))
        counts[1] += 1
    if hit:
        logger.debug("%s%s", condition, f" ({detail})" if detail else "")


def _take_tallies() -> dict[str, tuple[int, int]]:
    """The counts since the last take, ``{condition: (hits, cases)}``; resets them."""
    with _lock:
        counts = {k: (v[0], v[1]) for k, v in _tallies.items()}
        _tallies.clear()
    return counts


def flush_tallies(logger: logging.Logger | None = None, prefix: str = "",
                  console: bool = True) -> dict[str, tuple[int, int]]:
    """Log one line per condition that held at least once ("COND: k of n cases") and reset.

    ``console`` lets the line through to a non-verbose console (a site's summary stays in its
    file: a hundred simulated sites would otherwise print a hundred). Returns
    ``{condition: (hits, cases)}`` of what was counted since the last flush.
    """
    counts = _take_tallies()
    logger = logger or log
    for condition, (hits, total) in counts.items():
        if hits:
            logger.info("%s%s: %d of %d cases", prefix, condition, hits, total, extra={"console": console})
    return counts


# -- the site side ------------------------------------------------------------------------------

SITE_LOG_NAME = "site.log"


def setup_worker() -> None:
    """A process that serves sites (a SuperNode's ClientApp, a simulation's Ray actor): its
    console gets only warnings and errors, once (Flower's duplicate handler removed); the
    details go to each site's file (:func:`site_file`). Idempotent."""
    root = logging.getLogger()
    if any(getattr(h, _MARK, False) for h in root.handlers):
        return
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if type(h) is logging.StreamHandler:
            root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    setattr(console, _MARK, True)
    console.addFilter(_ConsoleFilter(False))
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    logging.captureWarnings(True)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    quiet_flower()


class site_file:  # noqa: N801 - used as a context manager, named for what it gives
    """While active, every record of this process also goes to ``<state_dir>/site.log``; on
    exit the repeated case-level conditions counted meanwhile are summarised there once."""

    def __init__(self, state_dir: str | Path, site: str) -> None:
        self.path = Path(state_dir) / SITE_LOG_NAME
        self.site = site
        self.handler: logging.Handler | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        logging.getLogger().addHandler(self.handler)
        return self.path

    def __exit__(self, *exc) -> None:
        flush_tallies(log, prefix=f"site {self.site}: ", console=False)
        root = logging.getLogger()
        if self.handler is not None:
            root.removeHandler(self.handler)
            self.handler.close()
