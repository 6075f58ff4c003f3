"""Training throughput of this pipeline at a preset, on the offline data: prints a table.

    .venv/bin/python benchmarks/train.py --data-dir ../shared/data --preset guide --steps 20

Builds (or reuses) the shards for the preset, then times pretraining and fine-tuning steps after
one warm-up step each (the warm-up pays for XLA compilation and is reported separately).
Pretraining text is WikiText `test` (the offline folder has no train split).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")


def time_fit(model, ds, warm_steps: int, steps: int) -> tuple[float, float]:
    """Seconds for ``warm_steps`` (compilation included), then for ``steps`` more."""
    t0 = time.perf_counter()
    model.fit(ds, steps_per_epoch=warm_steps, epochs=1, verbose=0)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return warm, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--preset", default="guide", choices=["guide", "smoke"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    os.environ.setdefault("ENCODERFLOW_HOME", tempfile.mkdtemp(prefix="encoderflow-bench-"))

    import jax
    import keras
    import numpy as np

    from encoderflow import model as models
    from encoderflow import steps
    from encoderflow.data import shards, sources
    from encoderflow.data.sst2 import bucketed_token_dataset, read_split, token_dataset
    from encoderflow.data.tokenizer import make_tokenizer

    params = {"preset": args.preset, "overrides": ["data.pretrain_split=test", *args.set]}
    cfg = steps.config_from_params(params)
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
    mlm.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.AdamW(p.learning_rate),
                weighted_metrics=["sparse_categorical_accuracy"], jit_compile=True)
    ds = shards.make_dataset(sealed["manifest"], cfg, "train", p.batch_size, repeat=True)
    pre_warm, pre_s = time_fit(mlm, ds, 1, args.steps)

    vocab_path = vocab["files"]["bert_vocab_uncased.txt"]["path"]
    x, y = read_split(sst2["files"]["SST-2/train.tsv"]["path"])
    if cfg.model.padding_mask:  # what finetune.py does: length buckets
        ft = bucketed_token_dataset(x, y, make_tokenizer(vocab_path, None), f.batch_size, cfg.data.seq_length,
                                    shuffle_seed=0).repeat()
    else:
        ft = token_dataset(x, y, make_tokenizer(vocab_path, cfg.data.seq_length), f.batch_size,
                           shuffle_seed=0).repeat()
    clf = models.build_classifier(encoder, masked_pooling=cfg.model.padding_mask)
    clf.compile(loss="binary_crossentropy", optimizer=keras.optimizers.AdamW(f.learning_rate), metrics=["accuracy"],
                jit_compile=True)
    # Length buckets compile once per width: warm up long enough to meet them all.
    ft_warm, ft_s = time_fit(clf, ft, 30 if cfg.model.padding_mask else 1, args.steps)
    ft_epoch_steps = int(np.ceil(len(x) / f.batch_size))

    print(f"\nencoderflow training benchmark: preset {args.preset}, {jax.devices()[0].platform} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), jax {jax.__version__}, "
          f"{args.steps} timed steps; pretraining text wiki.test.raw")
    rows = [
        ("shard build (all shards)", f"{build_s:.1f} s", f"{manifest['totals']['train']['records'] / build_s:,.0f} seq/s"),
        ("pretrain warm-up (1 step, compile)", f"{pre_warm:.1f} s", ""),
        (f"pretrain step (batch {p.batch_size})", f"{1000 * pre_s / args.steps:.0f} ms",
         f"{args.steps * p.batch_size / pre_s:,.0f} seq/s"),
        ("finetune warm-up (compile)", f"{ft_warm:.1f} s", "30 steps" if cfg.model.padding_mask else "1 step"),
        (f"finetune step (batch {f.batch_size})", f"{1000 * ft_s / args.steps:.0f} ms",
         f"{args.steps * f.batch_size / ft_s:,.0f} seq/s"),
        ("finetune epoch (estimated)", f"{ft_epoch_steps * ft_s / args.steps / 60:.1f} min", f"{ft_epoch_steps} steps"),
    ]
    print(f"{'measure':<30} {'time':>10} {'rate':>16}")
    for name, t, r in rows:
        print(f"{name:<30} {t:>10} {r:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
