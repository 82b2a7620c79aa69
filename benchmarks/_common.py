"""Helpers shared by the benchmark scripts (run as `python benchmarks/bench_*.py`)."""

from __future__ import annotations

import platform


def device_info(requested: str) -> dict:
    """Which device a benchmark ran on, for its JSON result."""
    import torch

    from shared.plumbing.device import pick_device

    dev = pick_device(requested)
    return {
        "requested": requested,
        "used": dev.type,
        "name": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
