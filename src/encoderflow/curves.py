"""One training-curves figure per run: pretraining, fine-tuning and baseline, train vs validation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from encoderflow import layout


def plot(histories: dict[str, dict[str, list[float]]], path: str | os.PathLike, title: str = "") -> Path:
    """Write a PNG with one panel per stage (loss and accuracy on twin axes); atomic."""
    import matplotlib

    matplotlib.use("Agg")  # task workers have no display
    import matplotlib.pyplot as plt

    stages = [s for s, h in histories.items() if h]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        hist: dict[str, Any] = histories[stage]
        acc_ax = ax.twinx()
        for key, values in sorted(hist.items()):
            epochs = range(1, len(values) + 1)
            target, style = (acc_ax, "-") if "accuracy" in key else (ax, "--")
            target.plot(epochs, values, style, marker="o", markersize=3, label=key)
        ax.set_title(stage)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (dashed)")
        acc_ax.set_ylabel("accuracy (solid)")
        lines = ax.get_legend_handles_labels()
        acc_lines = acc_ax.get_legend_handles_labels()
        ax.legend(lines[0] + acc_lines[0], lines[1] + acc_lines[1], fontsize=7, loc="center right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with layout.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
