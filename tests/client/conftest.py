"""Fixtures for the site-side tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """A ClientApp called in-process sets its worker's logging up (``shared.plumbing.logs.setup_worker``:
    root handlers, level, captured warnings); put the root logger back so later tests see pytest's."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)
