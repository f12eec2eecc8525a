"""Figures of a run: its training curves and its confusion matrix (matplotlib, no pyplot, so the
caller's backend is left alone). `nin.files` writes them as PNG files or bytes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def figure(width: float, height: float, dpi: int = 120) -> tuple[Any, Any]:
    """A new Figure and its one Axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    return fig, fig.subplots()


def curves_figure(history: list[dict[str, Any]], title: str = "") -> Any:
    """The chapter's Animator as a still: loss, train acc and val/test acc per epoch."""
    fig, ax = figure(5, 3.5)
    epochs = [row["epoch"] for row in history]
    keys = [k for k in ("loss", "train_acc", "val_acc", "test_acc") if k in history[0]]
    for key, style in zip(keys, ("-", "--", "-.", ":"), strict=False):
        values = [row[key] for row in history]
        ax.plot(epochs, values, style, marker="o", label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, max(epochs) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    return fig


def confusion_figure(confusion: torch.Tensor, classes: tuple[str, ...]) -> Any:
    """The confusion matrix as a heat map with counts (rows: true class, columns: predicted)."""
    counts = confusion.numpy()
    n = len(classes)
    fig, ax = figure(1.5 + 0.55 * n, 1.2 + 0.5 * n, dpi=110)
    # Row-normalised colours, so rare and common classes read alike; the numbers are counts.
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return fig
