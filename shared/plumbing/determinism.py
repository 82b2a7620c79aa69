"""Bit-for-bit reproducible training on one machine: deterministic kernels and a fixed thread count.

Seeding alone is not enough. Three bootstraps of the demo profile with seed 0 gave test AUCs of
0.77, 0.44 and 0.67 (issue 13): with a few hundred crops, the rounding differences of
nondeterministic kernels and of a different number of CPU threads (reductions are split per
thread) grow over the epochs into different models. ``deterministic_training`` pins both for the
duration of a training run and restores the caller's settings afterwards.

On CUDA a few backward kernels (3D max-pooling among them) have no deterministic version; torch
then only warns, and GPU runs are reproducible up to those kernels. cuBLAS needs
``CUBLAS_WORKSPACE_CONFIG`` set before its first use, so it is set here if the caller has not.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

log = logging.getLogger(__name__)

# Training threads: the same number on every run of a machine (not "whatever is free"), and no
# more than 8, past which CPU convolutions of this size stop getting faster.
MAX_TRAIN_THREADS = 8


def train_threads() -> int:
    """The fixed torch thread count for training on this machine: ``ICHFED_TRAIN_THREADS`` or min(8, CPUs)."""
    from shared.plumbing.errors import IchfedError

    value = os.environ.get("ICHFED_TRAIN_THREADS")
    if value is None:
        return max(1, min(MAX_TRAIN_THREADS, os.cpu_count() or 1))
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise IchfedError(f"ICHFED_TRAIN_THREADS: must be a positive integer, got {value!r}")
    return n


@contextlib.contextmanager
def deterministic_training(num_threads: int | None = None) -> Iterator[int]:
    """Deterministic torch kernels and ``num_threads`` (default ``train_threads()``) inside the block.

    Yields the thread count used. The previous settings are restored on exit.
    """
    import torch

    n = int(num_threads or train_threads())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
    torch.set_num_threads(n)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    log.debug("deterministic training with %d threads", n)
    try:
        yield n
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.set_num_threads(before[2])
        torch.backends.cudnn.benchmark = before[3]
        torch.backends.cudnn.deterministic = before[4]
