"""Training throughput of this pipeline next to the guide's own code, same data and machine: a table.

    .venv/bin/python benchmarks/train.py --data-dir ../shared/data --preset guide --steps 20
    .venv/bin/python benchmarks/train.py --synthetic --preset smoke   # no TensorFlow, no data: synthetic.py

encoderflow: builds (or reuses) the shards for the preset, then times pretraining and
fine-tuning steps after warm-up (the warm-up pays for XLA compilation, reported separately).
Fine-tuning feeds length buckets as finetune.py does, so a step's cost depends on its bucket:
the fine-tune step is the mean over ``--finetune-steps`` shuffled batches.

guide: ``seed_guide.py --stage pretrain`` (``../shared/peers/``, or ``ENCODERFLOW_GUIDE_SCRIPT``)
run twice, with few and with more steps (``--guide-steps``); its reported pretrain and fine-tune
seconds include compilation and a full validation pass, which the difference between the two runs
cancels:
``s/step = (t(long) - t(short)) / (steps(long) - steps(short))``. The guide always pads SST-2 to
128 tokens, so its per-step cost is the same for every batch. The guide's side is always its own
model at its own batch sizes (3 layers, 128 / 32): against any other preset, or a ``--set`` that
changes a batch or the model, the table says the sides are not comparable and gives no speed-up.

Pretraining text is WikiText `test` (the offline folder has no train split).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from peer import OFFLINE_MEMBERS, GuideMissing, guide_script, guide_setup, offline_folder_problem, run_guide

from encoderflow import runtime
from encoderflow.config import PRESETS, ConfigError, from_params
from encoderflow.errors import EncoderflowError

runtime.use_jax()

# Fewer timed steps than this on a side and a per-step figure is mostly start-up and jitter.
MIN_TIMED_STEPS = 5

# What a step's work depends on, as (our config's section, key) and the guide script's name for it.
SHAPES = {
    "pretrain_batch": ("pretrain", "batch_size", "pretraining batch"),
    "finetune_batch": ("finetune", "batch_size", "fine-tuning batch"),
    "seq_length": ("data", "seq_length", "sequence length"),
    "predictions_per_seq": ("data", "predictions_per_seq", "predictions per sequence"),
    "num_layers": ("model", "num_layers", "layers"),
    "model_dim": ("model", "model_dim", "model dim"),
    "intermediate_dim": ("model", "intermediate_dim", "ffn dim"),
    "num_heads": ("model", "num_heads", "heads"),
}


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


def parse_guide_steps(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``'ps,pl:fs,fl'`` into ((pretrain short, long), (fine-tune short, long)); ValueError naming the fault.

    The guide reads a step count of 0 as a whole epoch, so every count is >= 1, and each long run
    must be longer than its short one for the difference to time anything."""
    try:
        pre, ft = [tuple(int(v) for v in part.split(",")) for part in text.split(":")]
        if len(pre) != 2 or len(ft) != 2:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"--guide-steps {text!r}: expected 'pretrain_short,pretrain_long:finetune_short,finetune_long', "
            "e.g. 2,8:10,110"
        ) from None
    for what, (short, long) in (("pretrain", pre), ("finetune", ft)):
        if short < 1 or long <= short:
            raise ValueError(
                f"--guide-steps {text!r}: {what} counts {short},{long} must be >= 1 with the second larger "
                "(the guide's step time is their difference), e.g. 2,8:10,110"
            )
    return pre, ft


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The data mode's arguments, each checked before any work: a bad one is one line and exit 2."""
    ap = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", required=True, help="the offline data folder (this benchmark never downloads)")
    ap.add_argument("--preset", default="guide", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=20, help="timed pretraining steps (>= 1)")
    ap.add_argument("--finetune-steps", type=int, default=200, help="timed fine-tuning steps (>= 1)")
    ap.add_argument(
        "--guide-steps",
        default="2,8:10,110",
        help="seed_guide.py step counts 'pretrain_short,pretrain_long:finetune_short,finetune_long'",
    )
    ap.add_argument("--no-guide", action="store_true", help="skip the guide's runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    for name in ("steps", "finetune_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1 (steps to time)")
    try:
        args.guide_plan = parse_guide_steps(args.guide_steps)
    except ValueError as exc:
        ap.error(str(exc))
    args.data_dir = Path(args.data_dir).expanduser().resolve()
    if problem := offline_folder_problem(args.data_dir, OFFLINE_MEMBERS):
        ap.error(problem)
    try:
        args.cfg = from_params(params(args))
    except ConfigError as exc:
        ap.error(f"--preset {args.preset} with --set {args.set}: {exc}")
    if not args.no_guide:
        try:
            args.guide_script = guide_script()
        except GuideMissing as exc:
            ap.error(f"{exc}; or pass --no-guide")
    return args


def params(args) -> dict:
    return {"preset": args.preset, "overrides": ["data.pretrain_split=test", *args.set]}


def differences(cfg, setup: dict) -> list[str]:
    """Why a step of this config and one of the guide's code do different work ([] when they do the same)."""
    out = [] if cfg.preset == "guide" else [f"preset {cfg.preset}, not guide"]
    for key, (section, name, label) in SHAPES.items():
        ours, theirs = getattr(getattr(cfg, section), name), setup.get(key)
        if ours != theirs:
            out.append(f"{label} {ours} against the guide's {'unknown' if theirs is None else theirs}")
    return out


def build_line(built: int, reused: int, records: int, seconds: float) -> str:
    """How the shards came about: a rate only over the shards this run wrote (train and valid)."""
    if not built:
        return f"shards reused ({reused} already built, {seconds:.1f}s to check them)"
    rate = f"{built} built in {seconds:.1f}s, {records:,} train+valid sequences ({records / seconds:,.0f} seq/s)"
    return f"shards: {rate}" + (f"; {reused} reused" if reused else "")


def table(cfg, ours: dict, guide: dict | None, setup: dict, timed: dict, sentences: int) -> list[str]:
    """The comparison's lines.

    Args:
        ours, guide: seconds per pretraining and fine-tuning step (``pretrain_step_s``, ``finetune_step_s``).
        setup: the guide's batch sizes and model (:func:`peer.guide_setup`).
        timed: timed steps behind each figure, ``{"encoderflow": (pretrain, finetune), "guide": (...)}``.
        sentences: SST-2 train sentences, for an epoch of fine-tuning at each side's own batch.
    """
    lines = []
    p_batch, f_batch = cfg.pretrain.batch_size, cfg.finetune.batch_size
    g_pre, g_ft = setup.get("pretrain_batch"), setup.get("finetune_batch")
    apart = differences(cfg, setup) if guide else []
    if apart:
        lines.append(
            "NOT COMPARABLE: the guide runs its own model at its own batch sizes, encoderflow differs ("
            + "; ".join(apart)
            + "): each column stands alone, no speed-up is given; use --preset guide to compare"
        )
    flags = {("encoderflow", 0): "--steps", ("encoderflow", 1): "--finetune-steps"}
    few = {
        f"{side} {what} {n}": flags.get((side, i), "--guide-steps")
        for side, counts in timed.items()
        for i, (what, n) in enumerate(zip(("pretraining", "fine-tuning"), counts))
        if n < MIN_TIMED_STEPS and (side == "encoderflow" or guide)
    }
    if few:
        lines.append(
            f"few timed steps ({', '.join(few)}; fewer than {MIN_TIMED_STEPS}): the per-step figures are noise; "
            f"raise {' and '.join(dict.fromkeys(few.values()))}"
        )
    lines.append(f"{'measure':<40} {'encoderflow':>14} {'guide':>14} {'speed-up':>9}")

    def row(name, mine, theirs, fmt, better_low=True):
        if theirs is None or not mine or not theirs:
            ratio = ""
        elif apart:
            ratio = "n/c"
        else:
            ratio = f"{(theirs / mine if better_low else mine / theirs):.2f}x"
        lines.append(f"{name:<40} {fmt(mine):>14} {'' if theirs is None else fmt(theirs):>14} {ratio:>9}")

    def batches(ours_batch, theirs):
        return f"batch {ours_batch}" if not guide or theirs == ours_batch else f"batch {ours_batch} / guide {theirs}"

    g = guide or {}
    ms = lambda v: f"{1000 * v:,.0f} ms"  # noqa: E731
    row(f"pretrain step ({batches(p_batch, g_pre)})", ours["pretrain_step_s"], g.get("pretrain_step_s"), ms)
    row(
        "pretrain throughput",
        p_batch / ours["pretrain_step_s"],
        g_pre / g["pretrain_step_s"] if guide and g_pre else None,
        lambda v: f"{v:,.1f} seq/s",
        better_low=False,
    )
    row(f"fine-tune step ({batches(f_batch, g_ft)})", ours["finetune_step_s"], g.get("finetune_step_s"), ms)
    row(
        "fine-tune epoch (steps x step)",
        math.ceil(sentences / f_batch) * ours["finetune_step_s"],
        math.ceil(sentences / g_ft) * g["finetune_step_s"] if guide and g_ft else None,
        lambda v: f"{v / 60:.1f} min",
    )
    return lines


def run(args) -> int:
    import jax

    from encoderflow import model as models
    from encoderflow import steps
    from encoderflow.data import shards, sources
    from encoderflow.data.sst2 import bucketed_token_dataset, read_split, token_dataset
    from encoderflow.data.tokenizer import make_tokenizer
    from encoderflow.results import SST2_TRAIN, file_path, only_file
    from encoderflow.train.finetune import compile_classifier
    from encoderflow.train.pretrain import compile_mlm

    cfg = args.cfg
    wiki = sources.get_dataset("wikitext", "test", "valid", data_dir=str(args.data_dir))
    vocab = sources.get_dataset("vocab", data_dir=str(args.data_dir))
    sst2 = sources.get_dataset("sst2", data_dir=str(args.data_dir))
    planned = steps.plan_shards(wiki, vocab, params(args))

    def stat(path):
        # A shard reused is the same file before and after; one (re)built is a new file renamed into place.
        st = os.stat(path) if os.path.exists(path) else None
        return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)

    t0 = time.perf_counter()
    built = reused = records = 0
    for shard in planned:
        before = stat(shard["file"])
        info = steps.build_shard(shard, params(args))
        if before is not None and before == stat(shard["file"]):
            reused += 1
        else:
            built += 1
            records += info["records"]
    build_s = time.perf_counter() - t0
    sealed = steps.seal_shards(planned, params(args))
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

    ours = {"pretrain_step_s": pre_s / args.steps, "finetune_step_s": ft_s / args.finetune_steps}
    guide = None
    (ps, pl), (fs, fl) = args.guide_plan
    if not args.no_guide:
        guide = guide_rates(args.data_dir, (ps, fs), (pl, fl))

    print(
        f"\ntraining benchmark: preset {args.preset}, {jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), jax {jax.__version__}; "
        f"pretraining text wiki.test.raw; SST-2 train {len(x):,} sentences = {math.ceil(len(x) / f.batch_size)} "
        f"steps of {f.batch_size}"
    )
    print(
        f"encoderflow: {build_line(built, reused, records, build_s)}; compile: pretrain {pre_warm:.1f}s (1 step), "
        f"fine-tune {ft_warm:.1f}s ({30 if cfg.length_buckets() else 1} steps, every bucket width)"
    )
    print(
        f"timed: encoderflow {args.steps} pretraining / {args.finetune_steps} fine-tuning steps"
        + ("" if guide is None else f"; guide by difference of runs with {args.guide_steps} steps")
    )
    setup = guide_setup(args.guide_script) if guide else {}
    timed = {"encoderflow": (args.steps, args.finetune_steps), "guide": (pl - ps, fl - fs)}
    print("\n".join(table(cfg, ours, guide, setup, timed, len(x))))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--synthetic" in argv:  # random batches, no TensorFlow, no data folder: synthetic.py
        from synthetic import main as synthetic_main

        return synthetic_main(argv)
    args = parse_args(argv)
    # A home of its own only when none is given: its shards serve this run alone, so they go with it.
    own_home = None
    if not os.environ.get("ENCODERFLOW_HOME"):
        own_home = os.environ["ENCODERFLOW_HOME"] = tempfile.mkdtemp(prefix="encoderflow-bench-")
    try:
        return run(args)
    except EncoderflowError as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 2
    finally:
        if own_home:
            shutil.rmtree(own_home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
