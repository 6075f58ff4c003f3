"""Fine-tune one saved encoder on SST-2 with config overrides; print the dev accuracy.

    .venv/bin/python benchmarks/finetune.py ENCODER.keras OUT_DIR [key=value ...]
    PRESET=recipe .venv/bin/python benchmarks/finetune.py ENCODER.keras OUT_DIR finetune.learning_rate=2e-4

The quality benchmark's fine-tuning stage alone (``finetune.epochs=1`` on the offline folder's SST-2
train, dev accuracy), for factors that change fine-tuning only: pretraining is deterministic, so
fine-tuning the encoder an OQB run wrote gives that run's row with the factor changed (fine-tuning
it unchanged reproduces the run's accuracy exactly). ``ENCODER`` ``random`` builds the preset's
encoder at its seeded initialisation. ``DATA_DIR`` (default ``../shared/data``) is the offline folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from encoderflow.config import from_overrides, parse_set
from encoderflow.data.sources import get_dataset
from encoderflow.errors import EncoderflowError
from encoderflow.results import only_file


class Refused(Exception):
    """A bad argument or setting, said in one line before any work."""


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    try:
        return run(argv)
    except (Refused, EncoderflowError) as exc:
        print(f"finetune.py: {exc}", file=sys.stderr)
        return 2


def run(argv: list[str]) -> int:
    encoder, out, sets = argv[0], Path(argv[1]), argv[2:]
    if encoder != "random" and not Path(encoder).is_file():
        raise Refused(f"encoder {encoder}: no such file; pass a saved encoder (.keras) or 'random'")
    data_dir = os.environ.get("DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    if not Path(data_dir).is_dir():
        raise Refused(f"DATA_DIR {data_dir}: no such folder; set DATA_DIR to the offline data folder")
    preset = os.environ.get("PRESET", "guide")
    try:
        cfg = from_overrides(preset, parse_set(["finetune.epochs=1", *sets]))
    except EncoderflowError as exc:
        raise Refused(f"PRESET={preset} with {' '.join(sets) or 'no overrides'}: {exc}") from None
    sst2 = get_dataset("sst2", data_dir=data_dir)
    vocab_path = only_file(get_dataset("vocab", data_dir=data_dir))["path"]
    if encoder == "random":
        from encoderflow import model as models
        from encoderflow import runtime

        runtime.keras().utils.set_random_seed(cfg.data.seed)
        built = models.build_encoder(cfg.model, sum(1 for _ in open(vocab_path)), cfg.data.seq_length)
        out.mkdir(parents=True, exist_ok=True)
        built.save(out / "random.keras")
        encoder = str(out / "random.keras")
    from encoderflow.train.finetune import finetune

    t0 = time.monotonic()
    result = finetune(cfg, encoder, sst2, vocab_path, out)
    row = {"encoder": argv[0], "preset": cfg.preset, "sets": sets, "sst2": result["val_accuracy"]}
    print(json.dumps({**row, "seconds": round(time.monotonic() - t0)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
