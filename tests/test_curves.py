"""The training-curves figure is a real PNG, written atomically, one panel per trained stage."""

from __future__ import annotations

from encoderflow import curves


def test_plot_writes_a_png(tmp_path):
    hist = {
        "pretrain": {"loss": [9.0, 8.0], "val_sparse_categorical_accuracy": [0.05, 0.07]},
        "finetune": {"loss": [0.6], "accuracy": [0.7], "val_accuracy": [0.72]},
        "baseline": {},
    }
    path = curves.plot(hist, tmp_path / "run" / "curves.png", title="smoke")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temp file left beside it
