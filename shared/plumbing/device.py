"""The one place that decides between CUDA and CPU."""

from __future__ import annotations

from shared.plumbing.errors import IchfedError


def pick_device(preference: str = "auto"):
    """Return a ``torch.device``: ``auto`` picks CUDA when present, else CPU.

    ``cuda`` when no GPU is present is a user error, not a silent fallback.
    """
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise IchfedError("device: 'cuda' was requested but no CUDA GPU is available")
        return torch.device("cuda")
    raise IchfedError(f"device: must be 'auto', 'cpu' or 'cuda', got {preference!r}")
