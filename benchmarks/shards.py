"""Shard build and read rates next to the guide's on-the-fly preprocessing rate: prints a table.

    .venv/bin/python benchmarks/shards.py --data-dir ../shared/data [--pool 2]

Guide preset data config (seq 128, 32 predictions), dupe_factor 1, pretraining on WikiText
`test` and validating on `valid` (the offline folder has no train split). In one run:

* guide: ``seed_guide.py --stage preprocess`` (``../shared/peers/``, or ``ENCODERFLOW_GUIDE_SCRIPT``)
  as a subprocess (tokenize + mask in tf.data, batches of 128), its ``SEED_RESULT`` line parsed for
  ``preprocess_seq_per_s``;
* build: every shard (train and valid) built in this process one after another, sequences
  written per second of wall time; "cold" includes building and tracing the tokenizer (once
  per process), "warm" is a build into a fresh home with it cached, comparable to the
  guide's rate, which excludes its tokenizer set-up and map tracing. Guide and warm build
  run ``--repeats`` times, alternating; medians reported, [min-max] beside them;
* build, packed: the packed sequence mode (every token kept), with the tokens each mode keeps;
* build, pool: the same into a fresh home with a spawn pool (worker start-up included);
* read: ``make_dataset`` batches of 128 over the train shards, one warm-up epoch then
  ``--epochs`` timed ones, each epoch a fresh ``make_dataset(epoch=e)``; and the same epochs
  through ``pretrain.train_batches``, the single pipeline training iterates.

Targets (the issue): build >= 2x the guide's rate; read >= 50,000 seq/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from encoderflow import runtime

runtime.use_jax()
# Also for the guide's subprocess, which inherits this environment.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from peer import TEXT_MEMBERS, GuideMissing, guide_script, offline_folder_problem, run_guide  # noqa: E402


def _inputs(data_dir: Path):
    from encoderflow import layout

    def files(root, members):
        return {
            m: {"path": str(root / m), "bytes": (root / m).stat().st_size, "sha256": layout.sha256_file(root / m)}
            for m in members
        }

    wt = files(data_dir, ["wikitext-103-raw/wiki.test.raw", "wikitext-103-raw/wiki.valid.raw"])
    vocab = files(data_dir, ["bert_vocab_uncased.txt"])
    return (
        {"dataset": "wikitext", "root": str(data_dir), "files": wt},
        {"dataset": "vocab", "root": str(data_dir), "files": vocab},
    )


def _build_one(args):
    shard, cfg_dict, vocab_path, vocab_sha256 = args
    from encoderflow.config import from_overrides
    from encoderflow.data import shards

    cfg = from_overrides(cfg_dict["preset"], cfg_dict["overrides"])
    return shards.build_shard(shard, cfg, vocab_path, vocab_sha256)


def _build(cfg, cfg_dict, inputs, home: Path, pool: int):
    from encoderflow.data import shards

    os.environ["ENCODERFLOW_HOME"] = str(home)
    p = shards.plan(cfg, *inputs)
    jobs = [(s, cfg_dict, p["vocab_path"], p["vocab_sha256"]) for s in p["shards"]]
    t0 = time.monotonic()
    if pool > 1:
        import multiprocessing as mp

        # spawn: TensorFlow is already initialised in this process, and forking it is unsafe.
        with mp.get_context("spawn").Pool(pool) as workers:
            infos = workers.map(_build_one, jobs, chunksize=1)
    else:
        infos = [_build_one(j) for j in jobs]
    seconds = time.monotonic() - t0
    sealed = shards.seal(p, cfg)
    return sealed, sum(i["records"] for i in infos), seconds


def _guide(data_dir: Path, batches: int) -> dict:
    return run_guide(data_dir, "preprocess", "--preprocess-batches", str(batches))[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, the data folder and the guide's script checked before any work (one line, exit 2)."""
    ap = argparse.ArgumentParser(
        prog="shards.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=3, help="timed read epochs after one warm-up (>= 1)")
    ap.add_argument("--pool", type=int, default=0, help="also build with a spawn pool of this size")
    ap.add_argument("--guide-batches", type=int, default=15, help="batches the guide preprocesses (>= 1)")
    ap.add_argument("--repeats", type=int, default=3, help="guide and warm-build runs; medians reported (>= 1)")
    args = ap.parse_args(argv)
    for name in ("epochs", "guide_batches", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.pool < 0:
        ap.error(f"--pool {args.pool}: must be >= 0 (0 or 1: no pool)")
    args.data_dir = args.data_dir.expanduser().resolve()
    if problem := offline_folder_problem(args.data_dir, TEXT_MEMBERS):
        ap.error(problem)
    try:
        guide_script()
    except GuideMissing as exc:
        ap.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Every shard set lands in a home of its own, removed at the end: they serve this run's timing only.
    tmp = Path(tempfile.mkdtemp(prefix="encoderflow-bench-shards-"))
    try:
        return measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args, tmp: Path) -> int:
    data_dir = args.data_dir

    from encoderflow.config import from_overrides
    from encoderflow.data import shards

    runtime.tensorflow()
    overrides = {"data.pretrain_split": "test", "data.validation_split": "valid", "data.dupe_factor": 1}
    cfg = from_overrides("guide", overrides)
    cfg_dict = {"preset": "guide", "overrides": overrides}
    inputs = _inputs(data_dir)
    rows = []

    # This VM's timings swing by 1.5x from one run to the next: each side is run --repeats
    # times, alternating, and the median rate is reported.
    guide_rates, warm_rates = [], []
    sealed, n, s = _build(cfg, cfg_dict, inputs, tmp / "seq", 1)
    cold = (f"build, sequential, cold ({sealed['num_shards']} shards)", n, n / s)
    for r in range(args.repeats):
        guide = _guide(data_dir, args.guide_batches)
        guide_rates.append(guide["preprocess_seq_per_s"])
        # With the tokenizer already built and traced (~2 s once per process), as the guide's
        # rate excludes building its tokenizer and tracing its map function.
        sealed, n, s = _build(cfg, cfg_dict, inputs, tmp / f"seq-warm-{r}", 1)
        warm_rates.append(n / s)
    guide_rate = statistics.median(guide_rates)

    def spread(rates):
        return f" [{min(rates):,.0f}-{max(rates):,.0f}]" if len(rates) > 1 else ""

    rows.append(
        (f"guide preprocess (tf.data tokenize+mask){spread(guide_rates)}", guide["preprocess_seqs"], guide_rate)
    )
    rows.append(cold)
    rows.append((f"build, sequential, warm{spread(warm_rates)}", n, statistics.median(warm_rates)))
    if args.pool > 1:
        _, n, s = _build(cfg, cfg_dict, inputs, tmp / "pool", args.pool)
        rows.append((f"build, spawn pool of {args.pool}", n, n / s))

    # Packed mode keeps every token of the text (no line filter, no truncation): how much more.
    packed_over = {**overrides, "data.sequence_mode": "packed"}
    packed, pn, ps = _build(
        from_overrides("guide", packed_over), {"preset": "guide", "overrides": packed_over}, inputs, tmp / "packed", 1
    )
    rows.append(("build, packed mode (incl. its untruncated tokenizer trace)", pn, pn / ps))

    def epoch(e):
        count = 0
        for f, _, _ in shards.make_dataset(sealed["manifest"], cfg, "train", 128, epoch=e):
            count += int(f["token_ids"].shape[0])
        return count

    epoch(0)  # warm-up: file cache, tf.data graph tracing
    t0 = time.monotonic()
    n = sum(epoch(e) for e in range(1, 1 + args.epochs))
    rows.append((f"read, make_dataset per epoch ({args.epochs} epochs)", n, n / (time.monotonic() - t0)))

    # What pretrain iterates: one pipeline over all epochs, so per-epoch set-up overlaps reading.
    from encoderflow.train.pretrain import train_batches

    run_cfg = from_overrides("guide", {**overrides, "pretrain.epochs": 1 + args.epochs})
    ds, steps = train_batches(sealed["manifest"], run_cfg)
    it = iter(ds)
    for _ in range(steps):  # warm-up epoch
        next(it)
    t0 = time.monotonic()
    n = sum(int(f["token_ids"].shape[0]) for f, _, _ in it)
    rows.append((f"read, train_batches ({args.epochs} epochs)", n, n / (time.monotonic() - t0)))

    # Steady state, as on a corpus whose epoch is far longer than tf.data's start-up (WikiText-103
    # train): one copy read round and round, after a warm-up that fills the shuffle buffer.
    it = iter(shards.make_dataset(sealed["manifest"], cfg, "train", 128, epoch=0, repeat=True))
    for _ in range(30):
        next(it)
    t0 = time.monotonic()
    n = sum(int(next(it)[0]["token_ids"].shape[0]) for _ in range(300))
    rows.append(("read, make_dataset steady state (300 batches)", n, n / (time.monotonic() - t0)))

    print(
        f"\nhost: {platform.node()} {os.cpu_count()} cpus; text: wiki.test.raw (train), "
        f"{sealed['totals']['train']['records']} train sequences"
    )
    print(f"{'stage':<58} {'seqs':>8} {'seq/s':>10} {'x guide':>8}")
    for name, count, rate in rows:
        print(f"{name:<58} {count:>8} {rate:>10.0f} {rate / guide_rate:>8.2f}")
    line_t, packed_t = sealed["totals"]["train"], packed["totals"]["train"]
    print(
        f"\ntokens kept from wiki.test.raw: line mode {line_t['tokens']:,} in {line_t['records']:,} sequences "
        f"({100 * line_t['tokens'] / packed_t['tokens']:.1f}%); packed mode {packed_t['tokens']:,} in "
        f"{packed_t['records']:,} sequences (every token)"
    )
    build_rate = statistics.median(warm_rates)
    read_rate = max(r[2] for r in rows if r[0].startswith("read"))
    print("timings on a shared, loaded machine: noisy; compare rates within one run only")
    print(
        f"\ntarget build >= 2x guide: {'met' if build_rate >= 2 * guide_rate else 'NOT met'} "
        f"({build_rate / guide_rate:.2f}x); target read >= 50,000 seq/s: "
        f"{'met' if read_rate >= 50_000 else 'NOT met'} ({read_rate:.0f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
