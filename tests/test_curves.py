"""The training-curves figure is a real PNG, written atomically, one panel per trained stage."""

from __future__ import annotations

import numpy as np

from encoderflow import curves

DPI, PANEL_INCHES, HEIGHT_INCHES = 110, 5, 3.6


def _curve_pixels(img: np.ndarray) -> np.ndarray:
    """Where matplotlib's first two cycle colours (C0 blue, C1 orange) were drawn: the curves."""
    rgb = img[..., :3]
    c0 = np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=-1) < 0.1
    c1 = np.abs(rgb - np.array([0xFF, 0x7F, 0x0E]) / 255).max(axis=-1) < 0.1
    return c0 | c1


def test_plot_draws_one_panel_per_trained_stage(tmp_path):
    import matplotlib.image

    hist = {
        "pretrain": {"loss": [9.0, 8.0], "val_sparse_categorical_accuracy": [0.05, 0.07]},
        "finetune": {"loss": [0.6, 0.5], "accuracy": [0.7, 0.8], "val_accuracy": [0.72, 0.75]},
        "baseline": {},  # not trained in this run: no panel
    }
    path = curves.plot(hist, tmp_path / "run" / "curves.png", title="smoke")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temp file left beside it
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (round(HEIGHT_INCHES * DPI), 2 * PANEL_INCHES * DPI)
    # Both panels hold drawn curves, not just axes.
    drawn = _curve_pixels(img)
    half = img.shape[1] // 2
    assert drawn[:, :half].sum() > 100 and drawn[:, half:].sum() > 100


def test_plot_of_no_history_is_one_empty_panel(tmp_path):
    import matplotlib.image

    img = matplotlib.image.imread(curves.plot({"baseline": {}}, tmp_path / "curves.png"))
    assert img.shape[:2] == (round(HEIGHT_INCHES * DPI), PANEL_INCHES * DPI)
    assert _curve_pixels(img).sum() == 0
