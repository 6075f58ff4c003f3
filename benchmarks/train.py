"""Training throughput of this pipeline next to the guide's own code, same data and machine: a table.

    .venv/bin/python benchmarks/train.py --data-dir ../shared/data --preset guide --steps 20
    .venv/bin/python benchmarks/train.py --synthetic --preset smoke   # no TensorFlow, no data: synthetic.py

encoderflow: builds (or reuses) the shards for the preset, then times pretraining and
fine-tuning steps after warm-up (the warm-up pays for XLA compilation, reported separately).
Fine-tuning feeds length buckets as finetune.py does, so a step's cost depends on its bucket:
the fine-tune step is the mean over ``--finetune-steps`` shuffled batches.

guide: ``../shared/peers/seed_guide.py --stage pretrain`` run twice, with few and with more
steps (``--guide-steps``); its reported pretrain and fine-tune seconds include compilation and a
full validation pass, which the difference between the two runs cancels:
``s/step = (t(long) - t(short)) / (steps(long) - steps(short))``. The guide always pads SST-2 to
128 tokens, so its per-step cost is the same for every batch.

Pretraining text is WikiText `test` (the offline folder has no train split).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from peer import run_guide

from encoderflow import runtime
from encoderflow.config import PRESETS

runtime.use_jax()


def time_fit(model, ds, warm_steps: int, steps: int) -> tuple[float, float]:
    """Seconds for ``warm_steps`` (compilation included), then for ``steps`` more."""
    t0 = time.perf_counter()
    model.fit(ds, steps_per_epoch=warm_steps, epochs=1, verbose=0)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return warm, time.perf_counter() - t0


def guide_run(data_dir: Path, pretrain_steps: int, finetune_steps: int) -> dict:
    return run_guide(
        data_dir,
        "pretrain",
        "--pretrain-epochs",
        "1",
        "--pretrain-steps",
        str(pretrain_steps),
        "--finetune-epochs",
        "1",
        "--finetune-steps",
        str(finetune_steps),
    )[0]


def guide_rates(data_dir: Path, short: tuple[int, int], long: tuple[int, int]) -> dict:
    """Seconds per pretraining and fine-tuning step of the guide's code, by difference."""
    a, b = guide_run(data_dir, *short), guide_run(data_dir, *long)
    return {
        "pretrain_step_s": (b["pretrain_s"] - a["pretrain_s"]) / (long[0] - short[0]),
        "finetune_step_s": (b["finetune_s"] - a["finetune_s"]) / (long[1] - short[1]),
        "pretrain_first_s": a["pretrain_s"],
        "finetune_first_s": a["finetune_s"],
    }


def main() -> int:
    if "--synthetic" in sys.argv[1:]:  # random batches, no TensorFlow, no data folder: synthetic.py
        from synthetic import main as synthetic_main

        return synthetic_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--preset", default="guide", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=20, help="timed pretraining steps")
    ap.add_argument("--finetune-steps", type=int, default=200, help="timed fine-tuning steps")
    ap.add_argument(
        "--guide-steps",
        default="2,8:10,110",
        help="seed_guide.py step counts 'pretrain_short,pretrain_long:finetune_short,finetune_long'",
    )
    ap.add_argument("--no-guide", action="store_true", help="skip the guide's runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    os.environ.setdefault("ENCODERFLOW_HOME", tempfile.mkdtemp(prefix="encoderflow-bench-"))

    import jax
    import numpy as np

    from encoderflow import model as models
    from encoderflow import steps
    from encoderflow.config import from_params
    from encoderflow.data import shards, sources
    from encoderflow.data.sst2 import bucketed_token_dataset, read_split, token_dataset
    from encoderflow.data.tokenizer import make_tokenizer
    from encoderflow.results import SST2_TRAIN, file_path, only_file
    from encoderflow.train.finetune import compile_classifier
    from encoderflow.train.pretrain import compile_mlm

    params = {"preset": args.preset, "overrides": ["data.pretrain_split=test", *args.set]}
    cfg = from_params(params)
    wiki = sources.get_dataset("wikitext", "test", "valid", data_dir=args.data_dir)
    vocab = sources.get_dataset("vocab", data_dir=args.data_dir)
    sst2 = sources.get_dataset("sst2", data_dir=args.data_dir)
    planned = steps.plan_shards(wiki, vocab, params)
    t0 = time.perf_counter()
    for shard in planned:
        steps.build_shard(shard, params)
    build_s = time.perf_counter() - t0
    sealed = steps.seal_shards(planned, params)
    manifest = shards.load_manifest(sealed["manifest"], cfg)

    p, f = cfg.pretrain, cfg.finetune
    encoder = models.build_encoder(cfg.model, manifest["vocab_size"], manifest["seq_length"])
    mlm = models.build_pretraining_model(encoder, manifest["predictions_per_seq"])
    compile_mlm(mlm, p, total_steps=args.steps + 1)
    ds = shards.make_dataset(sealed["manifest"], cfg, "train", p.batch_size, repeat=True)
    pre_warm, pre_s = time_fit(mlm, ds, 1, args.steps)

    vocab_path = only_file(vocab)["path"]
    x, y = read_split(file_path(sst2, SST2_TRAIN))
    if cfg.length_buckets():  # what finetune.py does
        ft = bucketed_token_dataset(
            x, y, make_tokenizer(vocab_path, None), f.batch_size, cfg.data.seq_length, shuffle_seed=0
        ).repeat()
    else:
        ft = token_dataset(x, y, make_tokenizer(vocab_path, cfg.data.seq_length), f.batch_size, shuffle_seed=0).repeat()
    clf = models.build_classifier(encoder, masked_pooling=cfg.pooling() == "real_tokens")
    compile_classifier(clf, f, total_steps=30 + args.finetune_steps)
    # Length buckets compile once per width: warm up long enough to meet them all.
    ft_warm, ft_s = time_fit(clf, ft, 30 if cfg.length_buckets() else 1, args.finetune_steps)
    ft_epoch_steps = int(np.ceil(len(x) / f.batch_size))

    ours = {"pretrain_step_s": pre_s / args.steps, "finetune_step_s": ft_s / args.finetune_steps}
    guide = None
    if not args.no_guide:
        (ps, pl), (fs, fl) = [tuple(int(v) for v in part.split(",")) for part in args.guide_steps.split(":")]
        guide = guide_rates(Path(args.data_dir).resolve(), (ps, fs), (pl, fl))

    print(
        f"\ntraining benchmark: preset {args.preset}, {jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), jax {jax.__version__}; "
        f"pretraining text wiki.test.raw; SST-2 train {len(x):,} sentences = {ft_epoch_steps} steps of "
        f"{f.batch_size}"
    )
    print(
        f"encoderflow: shards built in {build_s:.1f}s ({manifest['totals']['train']['records'] / build_s:,.0f} "
        f"seq/s); compile: pretrain {pre_warm:.1f}s (1 step), fine-tune {ft_warm:.1f}s "
        f"({30 if cfg.length_buckets() else 1} steps, every bucket width)"
    )
    print(
        f"timed: encoderflow {args.steps} pretraining / {args.finetune_steps} fine-tuning steps"
        + ("" if guide is None else f"; guide by difference of runs with {args.guide_steps} steps")
    )
    print(f"{'measure':<34} {'encoderflow':>14} {'guide':>14} {'speed-up':>9}")

    def row(name, mine, theirs, fmt, better_low=True):
        ratio = "" if theirs is None else f"{(theirs / mine if better_low else mine / theirs):.2f}x"
        print(f"{name:<34} {fmt(mine):>14} {'' if theirs is None else fmt(theirs):>14} {ratio:>9}")

    g = guide or {}
    row(
        f"pretrain step (batch {p.batch_size})",
        ours["pretrain_step_s"],
        g.get("pretrain_step_s"),
        lambda v: f"{1000 * v:,.0f} ms",
    )
    row(
        "pretrain throughput",
        p.batch_size / ours["pretrain_step_s"],
        p.batch_size / g["pretrain_step_s"] if guide else None,
        lambda v: f"{v:,.1f} seq/s",
        better_low=False,
    )
    row(
        f"fine-tune step (batch {f.batch_size})",
        ours["finetune_step_s"],
        g.get("finetune_step_s"),
        lambda v: f"{1000 * v:,.0f} ms",
    )
    row(
        "fine-tune epoch (steps x step)",
        ft_epoch_steps * ours["finetune_step_s"],
        ft_epoch_steps * g["finetune_step_s"] if guide else None,
        lambda v: f"{v / 60:.1f} min",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
