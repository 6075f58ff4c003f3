"""Runs the guide's own code (``seed_guide.py``) on the offline data for the benchmarks.

The script is ``../shared/peers/seed_guide.py`` beside this checkout, or the file named by
``ENCODERFLOW_GUIDE_SCRIPT``. Call :func:`guide_script` before any timing work: a missing script
must stop a benchmark before it spends minutes on its own side.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

GUIDE_ENV = "ENCODERFLOW_GUIDE_SCRIPT"
DEFAULT_GUIDE = Path(__file__).resolve().parents[2] / "shared" / "peers" / "seed_guide.py"

# The guide's constants that decide how much work a step does, by their names in seed_guide.py.
SETUP_CONSTANTS = {
    "pretrain_batch": "PRETRAINING_BATCH_SIZE",
    "finetune_batch": "FINETUNING_BATCH_SIZE",
    "seq_length": "SEQ_LENGTH",
    "predictions_per_seq": "PREDICTIONS_PER_SEQ",
    "num_layers": "NUM_LAYERS",
    "model_dim": "MODEL_DIM",
    "intermediate_dim": "INTERMEDIATE_DIM",
    "num_heads": "NUM_HEADS",
}


class GuideMissing(Exception):
    """The guide's script is not where it is looked for: the message names the path and the knob."""

    def __init__(self, path: Path):
        super().__init__(
            f"the guide's script {path} does not exist; set {GUIDE_ENV} to the path of seed_guide.py "
            "(default: ../shared/peers/seed_guide.py beside this checkout)"
        )


def guide_script() -> Path:
    """The guide's script, checked to exist (raises :class:`GuideMissing` otherwise)."""
    path = Path(os.environ.get(GUIDE_ENV) or DEFAULT_GUIDE).expanduser().resolve()
    if not path.is_file():
        raise GuideMissing(path)
    return path


def guide_setup(path: Path | None = None) -> dict[str, int | None]:
    """The guide's batch sizes and model shape as its script sets them (``None`` where it does not
    say): what a benchmark compares its own configuration with before setting the two side by side."""
    text = (path or guide_script()).read_text()
    found = {}
    for key, name in SETUP_CONSTANTS.items():
        m = re.search(rf"^{name}\s*=\s*(\d+)\s*$", text, re.M)
        found[key] = int(m.group(1)) if m else None
    return found


def run_guide(data_dir: Path, stage: str, *extra: str, log_path: Path | None = None) -> tuple[dict, float]:
    """``seed_guide.py --stage STAGE`` on wiki.test.raw / wiki.valid.raw / SST-2 under ``data_dir``.

    Returns its ``SEED_RESULT`` dict and the wall seconds of the whole process. Its GPU is hidden
    (TensorFlow and JAX both on the CPU, as this pipeline's are on a CPU machine).
    """
    cmd = [
        sys.executable,
        str(guide_script()),
        "--stage",
        stage,
        "--wiki-train",
        str(data_dir / "wikitext-103-raw/wiki.test.raw"),
        "--wiki-valid",
        str(data_dir / "wikitext-103-raw/wiki.valid.raw"),
        "--sst-dir",
        str(data_dir / "SST-2"),
        "--vocab",
        str(data_dir / "bert_vocab_uncased.txt"),
        *extra,
    ]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    seconds = time.monotonic() - t0
    if log_path is not None:
        log_path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    m = re.search(r"^SEED_RESULT (\{.*\})$", proc.stdout, re.M)
    if proc.returncode != 0 or not m:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"seed_guide.py --stage {stage} failed (exit {proc.returncode})")
    return json.loads(m.group(1)), seconds


def offline_folder_problem(data_dir: Path, members: tuple[str, ...]) -> str | None:
    """Why ``data_dir`` cannot serve as the offline folder for these files, in one line, or ``None``.

    The benchmarks never download: the pipeline's own message offers that way out, which they lack."""
    if not data_dir.is_dir():
        what = "is not a folder" if data_dir.exists() else "does not exist"
        return f"--data-dir {data_dir} {what}; point it at the offline data folder (e.g. ../shared/data)"
    missing = [m for m in members if not (data_dir / m).is_file()]
    if missing:
        return (
            f"--data-dir {data_dir} lacks {', '.join(missing)}; point it at the offline data folder, laid out as "
            "the archives extract (e.g. ../shared/data)"
        )
    return None


# What the benchmarks read from the offline folder: the pretraining text and vocabulary (shards.py),
# and SST-2 whole, as the pipeline's dataset check asks (train.py, the guide's code).
TEXT_MEMBERS = ("wikitext-103-raw/wiki.test.raw", "wikitext-103-raw/wiki.valid.raw", "bert_vocab_uncased.txt")
OFFLINE_MEMBERS = (*TEXT_MEMBERS, "SST-2/train.tsv", "SST-2/dev.tsv", "SST-2/test.tsv")
