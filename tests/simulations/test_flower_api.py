"""Issue 23: simulations run through Flower's public ``flwr.simulation.run_simulation`` (no private
``_run_simulation``), and its entry-point deprecation banner stays out of the console and the log."""

from __future__ import annotations

import ast
import inspect
import logging
from pathlib import Path

from simulations import flower_sim

REPO = Path(__file__).resolve().parents[2]


def test_no_module_calls_a_private_flower_function():
    for path in sorted((REPO / "simulations").glob("*.py")) + sorted((REPO / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flwr"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(REPO)} imports {private} from {node.module}"
    assert "run_simulation(server_app=" in inspect.getsource(flower_sim.run_apps)


def test_the_entry_point_banner_is_dropped_and_other_flower_records_kept(caplog):
    from flwr.supercore.logger import log as flower_log
    from flwr.supercore.logger import warn_deprecated_feature

    notice = flower_sim._FlowerEntryPointNotice()
    logger = logging.getLogger("flwr")
    logger.addFilter(notice)
    caplog.set_level(logging.DEBUG)
    try:
        # Flower's own call, word for word as flwr.simulation.run_simulation makes it.
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed in a future "
                                "version of Flower. Please use `flwr run` in the CLI instead to run your simulation.")
        warn_deprecated_feature("Some other feature")
        flower_log(logging.INFO, "[ROUND 1/2]")
    finally:
        logger.removeFilter(notice)
    flower = [r.getMessage() for r in caplog.records if r.name == "flwr"]
    assert not any("`run_simulation`" in m for m in flower)
    assert any("Some other feature" in m for m in flower) and "[ROUND 1/2]" in flower
    assert any(r.name == "simulations.flower_sim" and r.levelno == logging.DEBUG for r in caplog.records)
