"""Runs the guide's own code (``../shared/peers/seed_guide.py``) on the offline data for the benchmarks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[2] / "shared" / "peers" / "seed_guide.py"


def run_guide(data_dir: Path, stage: str, *extra: str, log_path: Path | None = None) -> tuple[dict, float]:
    """``seed_guide.py --stage STAGE`` on wiki.test.raw / wiki.valid.raw / SST-2 under ``data_dir``.

    Returns its ``SEED_RESULT`` dict and the wall seconds of the whole process. Its GPU is hidden
    (TensorFlow and JAX both on the CPU, as this pipeline's are on a CPU machine).
    """
    cmd = [
        sys.executable,
        str(GUIDE),
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
