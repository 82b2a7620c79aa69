"""The classifier's training curves: per-epoch history as JSON and as a PNG (bootstrap's report)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from shared.plumbing.atomic import atomic_path, write_json


def save_history(history: list[dict[str, Any]], json_path: str | Path) -> None:
    """Write the per-epoch history as JSON, atomically."""
    write_json(json_path, {"history": history})


def plot_history(history: list[dict[str, Any]], png_path: str | Path) -> None:
    """Plot train/validation loss and validation AUC per epoch to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]

    def series(key: str) -> list[float]:
        return [math.nan if h.get(key) is None else h[key] for h in history]

    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, series("train_loss"), label="train")
    ax_loss.plot(epochs, series("val_loss"), label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("NLL loss")
    ax_loss.legend()
    ax_auc.plot(epochs, series("val_auc"), color="tab:green")
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation AUC")
    ax_auc.set_ylim(0.0, 1.0)
    fig.tight_layout()
    try:
        with atomic_path(png_path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
