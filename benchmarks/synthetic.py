"""Pretraining throughput on random token batches: no TensorFlow, no shards, no data folder.

    .venv/bin/python benchmarks/train.py --synthetic --preset smoke
    python3 benchmarks/train.py --synthetic --preset guide --precision float32,mixed_bfloat16 \\
        --batch-size 128,1024 --loss-run 300 --out OUTDIR

Builds the real pretraining model (``encoderflow.model.build_encoder`` + ``build_pretraining_model``),
compiles it with ``encoderflow.train.pretrain.compile_mlm`` and feeds it numpy batches shaped
exactly like ``encoderflow.data.shards.make_dataset``'s: ``({"token_ids", "mask_positions"},
mask_ids, mask_weights)``, int32 / int32 / int32 / float32, masked by the shards' own
``mask_batch`` (so mask positions are distinct, ascending, 0-padded with weight 0).

Each (precision, batch size) cell times ``fit`` (with the callbacks pretraining runs it with, no
backup written) and the same model's bare jitted train step
(Keras 3 JAX stateless API: ``stateless_call`` + ``stateless_compute_loss`` + the optimizer's
``stateless_apply`` in one ``jax.jit``, state donated): warm-up steps first (the first one pays
for XLA compilation, reported on its own), then ``--repeats`` runs of ``--steps`` steps each,
fit's and the bare step's alternating, each closed by ``block_until_ready``; the median run gives
ms/step. ``fit/bare`` is fit's overhead. ``fit`` runs only whole calls of
``pretrain.steps_per_execution`` (16) steps, so ``--steps`` and fit's warm-up round up to whole
calls (the bare step times the same rounded count); the table's header says what ran.

With more than one unit of work (cells, the loss run) each runs in its own Python process, so
the device's ``peak_bytes_in_use`` (a process-lifetime maximum) belongs to that cell alone.

``--loss-run N`` trains a fresh model N steps (rounded up to tens; at least 20, so there is a first
and a last loss to compare) at mixed_bfloat16 and the first ``--batch-size`` on the same kind of
batches and records the loss every 10 steps (fit's running mean over those 10 steps); it passes
when every recorded loss is finite and the last is below the first by at least ``--min-drop``. A
failed loss run makes the exit status 1.

``--mlm-loss`` swaps in a lever's loss (``mlm_loss``). For the ones that take the head's features
(``chunked``, ``fused``: ``benchmarks/head_loss.py``) each cell also measures, on its device, how
far their loss and gradients land from the whole logits through Keras's loss; beyond
``AGREEMENT_TOLERANCE`` the cell fails and so does the exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from encoderflow.config import PRECISIONS, PRESETS, ConfigError  # plain dataclasses: imports no ML library

# Peak dense (no sparsity) matmul FLOP/s by device kind and math mode. H100 SXM figures from the
# NVIDIA datasheet; the H200 is the same chip at the same clocks (more, faster memory).
PEAK_FLOPS = {
    "H100 SXM": {"bfloat16": 989e12, "tf32": 494e12, "float32": 67e12},
    "H100 PCIe": {"bfloat16": 756e12, "tf32": 378e12, "float32": 51e12},
    "H200": {"bfloat16": 989e12, "tf32": 494e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},
}

COLUMNS = (
    "device",
    "platform",
    "n",
    "precision",
    "batch",
    "first call s",
    "fit ms/step",
    "bare ms/step",
    "fit/bare",
    "seq/s",
    "GFLOP/seq",
    "TFLOP/s",
    "util",
    "peak mem",
)


# The loss run records one loss per this many steps and compares the first with the last: it needs two.
LOSS_EVERY = 10
MIN_LOSS_RUN = 2 * LOSS_EVERY


def columns(spe: int | None) -> tuple[str, ...]:
    """:data:`COLUMNS` as a table shows them: fit's first call, timed whole, runs ``spe`` steps beside
    the compilation (``steps_per_execution``), and its header says so."""
    first = "first call s" if spe is None else f"first call s (compile + {spe} steps)"
    return tuple(first if c == "first call s" else c for c in COLUMNS)


def planned_steps(steps: int, warmup: int, spe: int) -> dict[str, int]:
    """The steps a cell runs. ``fit`` runs whole calls of ``spe`` (steps_per_execution) steps only, so
    ``steps`` rounds up to whole calls (the bare step times that count too, to compare like with
    like), and so does fit's warm-up: its first call (one step asked, ``spe`` run, compilation
    included), then ``warmup - 1`` more, rounded up; the bare step warms up ``warmup`` steps exactly."""
    calls = math.ceil(steps / spe)
    return {
        "timed": calls * spe,
        "fit_first": spe,
        "fit_warmup": spe + (math.ceil((warmup - 1) / spe) * spe if warmup > 1 else 0),
        "bare_warmup": warmup,
    }


def peak_entry(device_kind: str) -> dict | None:
    """The :data:`PEAK_FLOPS` row for a ``jax.Device.device_kind`` (e.g. 'NVIDIA H100 80GB HBM3')."""
    kind = device_kind.upper()
    if "H200" in kind:
        return PEAK_FLOPS["H200"]
    if "H100" in kind:
        return PEAK_FLOPS["H100 PCIe" if "PCIE" in kind else "H100 SXM"]
    if "A100" in kind:
        return PEAK_FLOPS["A100"]
    return None  # CPUs and unknown accelerators: no utilisation


def peak_flops(device_kind: str, platform_name: str, policy: str) -> float | None:
    """Peak for the policy's matmul dtype: bf16 for ``mixed_bfloat16``; for ``float32``, TF32,
    because JAX's default matmul precision on NVIDIA GPUs runs float32 dots on TF32 tensor cores."""
    entry = peak_entry(device_kind) if platform_name == "gpu" else None
    if entry is None:
        return None
    if "bfloat16" in policy:
        return entry["bfloat16"]
    if "float16" in policy:
        return entry["bfloat16"]  # same tensor-core rate as bf16
    return entry["tf32"]


def train_flops_per_sequence(cfg, vocab_size: int) -> float:
    """Model FLOPs of one training step per sequence (matmuls only, the usual MFU convention).

    Forward, with d = model_dim, f = intermediate_dim, s = seq_length, L = num_layers,
    p = predictions_per_seq, V = vocab size, and 2 FLOPs per multiply-add:

    * per layer, the dense layers on every token: Q, K, V and output projections 4*d*d, the
      feed-forward network 2*d*f, so 2 * (4*d*d + 2*d*f) * s;
    * per layer, attention: scores Q.K^T (s*s*d multiply-adds) and the weighted sum of values
      (s*s*d again), so 2 * 2 * s*s*d;
    * the MLM head on the p masked positions only: its dense d*d transform and the vocabulary
      projection tied to the token embedding d*V, so 2 * (d*d + d*V) * p.

    Embedding lookups, LayerNorm, softmax, dropout and the optimizer are not matmuls and are left
    out. Training = forward + backward = 3 x forward (the backward pass takes two matmuls per
    forward one: gradients with respect to the inputs and to the weights).
    """
    d, f, layers = cfg.model.model_dim, cfg.model.intermediate_dim, cfg.model.num_layers
    s, p = cfg.data.seq_length, cfg.data.predictions_per_seq
    per_layer = 2 * (4 * d * d + 2 * d * f) * s + 2 * 2 * s * s * d
    head = 2 * (d * d + d * vocab_size) * p
    return 3.0 * (layers * per_layer + head)


def special_ids(vocab_size: int) -> dict[str, int]:
    """The BERT uncased vocabulary's special ids (what the real shards use) when it fits, else 0..4.

    Returns the ids plus ``first_word``: real WordPiece text never yields BERT's ``[unused*]``
    ids (1-99, 104-998), so synthetic words are drawn from ``first_word`` up.
    """
    if vocab_size >= 2000:
        return {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "first_word": 999}
    if vocab_size < 16:
        raise SystemExit(f"--vocab-size {vocab_size}: too small for the special tokens plus words")
    return {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "first_word": 5}


def make_batches(cfg, vocab_size: int, batch_size: int, count: int, seed: int) -> list[tuple]:
    """``count`` distinct batches in the structure and dtypes ``make_dataset`` yields.

    Words follow a Zipf law (frequency ~ 1/rank, like text), so a model can learn something from
    them and the loss run has a loss to lower. Lengths: half the rows fill the sequence (long
    lines, truncated), the rest are 1/4 to full length, 0-padded, as lines of the guide's data are.
    Masking is the shards' own ``mask_batch`` (80% [MASK], 10% random, 10% kept).
    """
    import numpy as np

    from encoderflow.data.shards import mask_batch

    d = cfg.data
    ids = special_ids(vocab_size)
    rng = np.random.default_rng(seed)
    words = np.arange(ids["first_word"], vocab_size)
    prob = 1.0 / np.arange(1, len(words) + 1)
    prob /= prob.sum()
    out = []
    for _ in range(count):
        tokens = rng.choice(words, size=(batch_size, d.seq_length), p=prob)
        lengths = np.where(
            rng.random(batch_size) < 0.5,
            d.seq_length,
            rng.integers(max(1, d.seq_length // 4), d.seq_length + 1, batch_size),
        )
        tokens[np.arange(d.seq_length)[None, :] >= lengths[:, None]] = ids["[PAD]"]
        ex = mask_batch(
            tokens,
            rng,
            vocab_size=vocab_size,
            mask_id=ids["[MASK]"],
            unselectable_ids=(ids["[PAD]"], ids["[CLS]"], ids["[SEP]"]),
            mask_rate=d.mask_rate,
            predictions_per_seq=d.predictions_per_seq,
        )
        features = {
            "token_ids": ex["token_ids"].astype(np.int32),
            "mask_positions": ex["mask_positions"].astype(np.int32),
        }
        out.append((features, ex["mask_ids"].astype(np.int32), ex["mask_weights"].astype(np.float32)))
    return out


def cycle(batches):
    """An endless generator over the pool, for ``fit``."""
    while True:
        yield from batches


MLM_LOSSES = ("keras", "logsumexp", "chunked", "fused")
# Losses that take the head's features, not logits (benchmarks/head_loss.py).
HEAD_LOSSES = ("chunked", "fused")


def mlm_loss(name: str, mlm=None):
    """The loss a cell compiles with (``--mlm-loss``); ``None`` is the pipeline's own.

    ``keras`` (the pipeline's): ``SparseCategoricalCrossentropy(from_logits=True)``, which on JAX
    takes the ``log_softmax`` of the float32 logits and sums it against a one-hot of the labels.
    ``logsumexp``: the same value and gradient as optax's integer-label cross-entropy,
    ``logsumexp(logits) - logits[label]``, with no log-probability or one-hot tensor the size of the
    logits (4,096 x 30,522 per guide step, ~40% of the H100 step with them); issue 12's next GPU run
    times it. ``chunked`` and ``fused``: ``head_loss.LinearCrossEntropy`` on the features of
    ``head_loss.build_pretraining_model`` (``mlm``), the logits never whole. All are
    ``keras.losses.Loss``, so the float32 cast, the mask weights and the ``sum_over_batch_size``
    reduction are Keras's own.
    """
    if name not in MLM_LOSSES:
        raise ValueError(f"--mlm-loss {name!r}: expected one of {', '.join(MLM_LOSSES)}")
    if name == "keras":
        return None
    from encoderflow import runtime

    keras = runtime.keras()
    ops = keras.ops
    if name in HEAD_LOSSES:
        if mlm is None:
            raise ValueError(f"--mlm-loss {name} needs the model of head_loss.build_pretraining_model")
        import head_loss

        return head_loss.LinearCrossEntropy.for_model(mlm, name)

    class LogSumExpCrossEntropy(keras.losses.Loss):
        """Sparse cross-entropy from logits, per position: ``logsumexp(logits) - logits[label]``."""

        def call(self, y_true, y_pred):
            labels = ops.expand_dims(ops.cast(y_true, "int32"), -1)  # Loss.__call__ made them float
            picked = ops.squeeze(ops.take_along_axis(y_pred, labels, axis=-1), -1)
            return ops.logsumexp(y_pred, axis=-1) - picked

    return LogSumExpCrossEntropy(name="logsumexp_cross_entropy")


def build(cfg, vocab_size: int, precision: str, total_steps: int, loss: str = "keras"):
    """Dtype policy, model and compile exactly as ``encoderflow.train.pretrain.pretrain`` does
    (the loss swapped for ``--mlm-loss``'s when that is not ``keras``; ``chunked`` and ``fused``
    also swap the head, see ``head_loss.build_pretraining_model``, and drop the accuracy metric,
    which needs the logits)."""
    from encoderflow import model as models
    from encoderflow import runtime
    from encoderflow.train.pretrain import compile_mlm

    keras = runtime.keras()
    keras.utils.set_random_seed(cfg.data.seed)
    policy = runtime.set_dtype_policy(precision)
    pad_id = special_ids(vocab_size)["[PAD]"]
    encoder = models.build_encoder(cfg.model, vocab_size, cfg.data.seq_length, pad_id)
    if loss in HEAD_LOSSES:
        import head_loss

        mlm = head_loss.build_pretraining_model(encoder, cfg.data.predictions_per_seq)
    else:
        mlm = models.build_pretraining_model(encoder, cfg.data.predictions_per_seq)
    # The pipeline's compile, with the configured steps per call (pretrain lowers it to divide its
    # epoch; a synthetic stream has no epoch to divide).
    compile_mlm(
        mlm,
        cfg.pretrain,
        total_steps=total_steps,
        steps_per_execution=cfg.pretrain.steps_per_execution,
        loss=mlm_loss(loss, mlm),
        weighted_metrics=() if loss in HEAD_LOSSES else None,
    )
    return mlm, policy


def sync(mlm) -> None:
    import jax

    jax.block_until_ready([v.value for v in mlm.trainable_variables])


def pipeline_callbacks(batch_size: int) -> list:
    """The callbacks pretraining's ``fit`` runs every call, as it runs them: a callback that made Keras
    read each call's logs on fit's thread would cost the device a wait per call, and a fit timed
    without them would not show it. No backup is written: the table times steps, not HDF5 files."""
    from encoderflow.train.callbacks import EpochLogger, StepBackup

    class Unwritten(StepBackup):
        def save(self):
            return None

    return [
        Unwritten(tempfile.mkdtemp(prefix="encoderflow-bench-"), steps_per_epoch=10**12),
        EpochLogger("pretrain", batch_size, log_every_seconds=3600),
    ]


def fit_runner(mlm, batches):
    """``run(n)``: seconds for ``n`` steps of ``fit`` (one call) with pretraining's callbacks, device
    work finished."""
    spe = max(1, int(getattr(mlm, "steps_per_execution", 1) or 1))
    callbacks = pipeline_callbacks(len(batches[0][1]))

    def run(n: int) -> float:
        n = math.ceil(n / spe) * spe  # whole executions only: no second, shorter program
        t0 = time.perf_counter()
        mlm.fit(cycle(batches), steps_per_epoch=n, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
        sync(mlm)
        return time.perf_counter() - t0

    return run, spe


def bare_step(mlm):
    """The same training step without ``fit``: Keras 3's stateless JAX API in one ``jax.jit``.

    Loss (the compiled one, via ``stateless_compute_loss``), gradients, the optimizer's
    ``stateless_apply``; no metric updates, callbacks or data adapter. The state tuple is
    donated, so its buffers are reused in place as ``fit``'s are.
    """
    import jax

    def loss_fn(trainable, non_trainable, metrics_vars, x, y, sample_weight):
        y_pred, non_trainable = mlm.stateless_call(trainable, non_trainable, x, training=True)
        loss, (_, non_trainable, _) = mlm.stateless_compute_loss(
            trainable, non_trainable, metrics_vars, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight
        )
        return loss, non_trainable

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, metrics_vars, data):
        trainable, non_trainable, optimizer_vars = state
        x, y, sample_weight = data
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, metrics_vars, x, y, sample_weight)
        trainable, optimizer_vars = mlm.optimizer.stateless_apply(optimizer_vars, grads, trainable)
        return loss, (trainable, non_trainable, optimizer_vars)

    return jax.jit(step, donate_argnums=0)


def step_state(mlm, leaf):
    """:func:`bare_step`'s ``state`` and ``metrics_vars`` arguments: ``leaf`` of each variable's
    value (a copy to train, a shape to compile for), the optimizer built first."""
    if not mlm.optimizer.built:
        mlm.optimizer.build(mlm.trainable_variables)
    state = tuple(
        [leaf(v.value) for v in vs]
        for vs in (mlm.trainable_variables, mlm.non_trainable_variables, mlm.optimizer.variables)
    )
    return state, [leaf(v.value) for v in mlm.metrics_variables]


def bare_runner(mlm, batches):
    """``run(n)``: seconds for ``n`` calls of :func:`bare_step`, device work finished.

    The step gets the same host (numpy) batches as ``fit``, so both pay the same transfers. It
    trains copies of the model's state: the donated buffers are not the model's own.
    """
    import jax
    import jax.numpy as jnp

    state, metrics_vars = step_state(mlm, jnp.copy)
    step = bare_step(mlm)
    i = 0
    last = {}

    def run(n: int) -> float:
        nonlocal state, i
        t0 = time.perf_counter()
        for _ in range(n):
            loss, state = step(state, metrics_vars, batches[i % len(batches)])
            i += 1
        jax.block_until_ready((loss, state))
        last["loss"] = loss
        return time.perf_counter() - t0

    return run, last


def time_both(mlm, batches, warmup: int, steps: int, repeats: int) -> dict:
    """Compile and warm up ``fit``, time it once and read the memory peak; then the bare step
    likewise; then the remaining runs alternate bare, fit, so that both see the same machine
    (a shared CPU's load drifts). The first step of each pays for its compilation."""
    fit, spe = fit_runner(mlm, batches)
    steps = planned_steps(steps, warmup, spe)["timed"]
    compile_s = fit(1)
    if warmup > 1:
        fit(warmup - 1)
    fit_runs = [fit(steps) / steps]
    mem = peak_memory()  # fit's peak: read before the bare step copies the state
    bare, last = bare_runner(mlm, batches)
    bare_compile_s = bare(1)
    if warmup > 1:
        bare(warmup - 1)
    bare_runs = []
    for r in range(repeats):
        bare_runs.append(bare(steps) / steps)
        if r + 1 < repeats:
            fit_runs.append(fit(steps) / steps)
    return {
        "compile_s": compile_s,
        "bare_compile_s": bare_compile_s,
        "fit_runs": fit_runs,
        "bare_runs": bare_runs,
        "peak_bytes": mem,
        "steps_per_execution": spe,
        "bare_last_loss": float(last["loss"]),
    }


def device_facts() -> dict:
    import jax

    dev = jax.devices()[0]
    return {"device": dev.device_kind, "platform": dev.platform, "n": jax.device_count()}


def peak_memory() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def run_cell(spec: dict) -> dict:
    """One (precision, batch size) row of the table."""
    cfg = config(spec)
    vocab = spec["vocab_size"]
    batch = spec["batch_size"]
    total = spec["warmup"] + spec["repeats"] * spec["steps"] + 1
    mlm, policy = build(cfg, vocab, spec["precision"], total_steps=2 * total, loss=spec["mlm_loss"])
    batches = make_batches(cfg, vocab, batch, spec["pool"], cfg.data.seed)
    facts = device_facts()
    t = time_both(mlm, batches, spec["warmup"], spec["steps"], spec["repeats"])
    fit_runs, bare_runs = t["fit_runs"], t["bare_runs"]
    fit_s, bare_s = statistics.median(fit_runs), statistics.median(bare_runs)
    flops = train_flops_per_sequence(cfg, vocab)
    achieved = flops * batch / fit_s
    peak = peak_flops(facts["device"], facts["platform"], policy)
    return {
        **facts,
        "precision": policy,
        "batch": batch,
        "compile_s": t["compile_s"],
        "bare_compile_s": t["bare_compile_s"],
        "fit_ms": 1000 * fit_s,
        "bare_ms": 1000 * bare_s,
        "fit_runs_ms": [1000 * t for t in fit_runs],
        "bare_runs_ms": [1000 * t for t in bare_runs],
        "fit_over_bare": fit_s / bare_s,
        "seq_per_s": batch / fit_s,
        "flops_per_seq": flops,
        "tflops": achieved / 1e12,
        "peak_flops": peak,
        "util": None if peak is None else achieved / peak,
        "bare_util": None if peak is None else flops * batch / bare_s / peak,
        "peak_bytes": t["peak_bytes"],
        "steps_per_execution": t["steps_per_execution"],
        "bare_last_loss": t["bare_last_loss"],
        "parameters": int(mlm.count_params()),
        "agreement": head_agreement(mlm, spec["mlm_loss"], batches[0]),
    }


# A head loss farther than this from the whole logits (relative, loss or any gradient) fails its
# cell: bfloat16 rounding accounts for ~1e-2 (tests/test_benchmarks.py), a wrong kernel for ~1.
AGREEMENT_TOLERANCE = 5e-2


def head_agreement(mlm, loss: str, batch) -> dict | None:
    """For a head loss, how far it lands from the whole logits on this device (a GPU kernel that
    is fast but wrong must say so beside its timing, and fail); ``None`` for the others."""
    if loss not in HEAD_LOSSES:
        return None
    import head_loss

    return head_loss.model_agreement(mlm, loss, batch)


def run_loss(spec: dict) -> dict:
    """A fresh model trained ``loss_run`` steps at mixed_bfloat16; loss every :data:`LOSS_EVERY` steps."""
    cfg = config(spec)
    vocab = spec["vocab_size"]
    steps = math.ceil(spec["loss_run"] / LOSS_EVERY) * LOSS_EVERY
    if steps < MIN_LOSS_RUN:  # parse_args refuses it; a unit spec written by hand must not pass as a check
        raise ValueError(f"loss run of {spec['loss_run']} steps: needs >= {MIN_LOSS_RUN} (two recorded losses)")
    batch = spec["batch_size"]
    mlm, policy = build(cfg, vocab, "mixed_bfloat16", total_steps=steps, loss=spec["mlm_loss"])
    batches = make_batches(cfg, vocab, batch, spec["pool"], cfg.data.seed + 1)
    t0 = time.perf_counter()
    history = mlm.fit(cycle(batches), steps_per_epoch=LOSS_EVERY, epochs=steps // LOSS_EVERY, verbose=0, shuffle=False)
    seconds = time.perf_counter() - t0
    losses = [float(v) for v in history.history["loss"]]
    first, last = losses[0], losses[-1]
    finite = all(math.isfinite(v) for v in losses)
    fell = finite and last < first * (1 - spec["min_drop"])
    return {
        **device_facts(),
        "precision": policy,
        "batch": batch,
        "steps": steps,
        "seconds": seconds,
        "every_10_steps": losses,
        "first": first,
        "last": last,
        "min_drop": spec["min_drop"],
        "finite": finite,
        "fell": fell,
        "passed": bool(fell),
    }


def config(spec: dict):
    from encoderflow.config import from_overrides, parse_set

    return from_overrides(spec["preset"], parse_set(spec["set"]))


def run_unit(spec: dict) -> dict:
    try:
        return run_loss(spec) if spec["kind"] == "loss" else run_cell(spec)
    except Exception as exc:  # noqa: BLE001 - one failed cell (e.g. out of memory) must not hide the rest
        import traceback

        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300], **spec}


def spawn(spec: dict) -> dict:
    """:func:`run_unit` in a fresh Python process (its own device memory peak, policy, caches)."""
    with tempfile.TemporaryDirectory(prefix="encoderflow-synth-") as tmp:
        out = Path(tmp) / "unit.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--unit", json.dumps(spec), "--unit-out", str(out)]
        proc = subprocess.run(cmd)
        if out.exists():
            return json.loads(out.read_text())
        return {"error": f"unit process exited {proc.returncode} without a result", **spec}


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def cell_row(r: dict) -> list[str]:
    if "error" in r:
        return [
            r.get("device", "-"),
            r.get("platform", "-"),
            str(r.get("n", "-")),
            r["precision"],
            str(r["batch_size"]),
            f"FAILED: {r['error']}",
        ] + [""] * (len(COLUMNS) - 6)
    return [
        r["device"],
        r["platform"],
        str(r["n"]),
        r["precision"],
        str(r["batch"]),
        f"{r['compile_s']:.1f}",
        f"{r['fit_ms']:.2f}",
        f"{r['bare_ms']:.2f}",
        f"{r['fit_over_bare']:.2f}x",
        f"{r['seq_per_s']:,.0f}",
        f"{r['flops_per_seq'] / 1e9:.3f}",
        f"{r['tflops']:.2f}",
        _fmt(None if r["util"] is None else 100 * r["util"], ".1f") + ("%" if r["util"] is not None else ""),
        _fmt(None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30, ".2f") + (" GiB" if r["peak_bytes"] else ""),
    ]


def agrees(cell: dict) -> bool:
    """A cell without a head loss agrees; one with it, when it is within AGREEMENT_TOLERANCE."""
    return not cell.get("agreement") or max(cell["agreement"].values()) <= AGREEMENT_TOLERANCE


def markdown(header: str, cells: list[dict], loss: dict | None, spe: int | None = None, loss_note: str = "") -> str:
    """The tables as markdown. ``spe``: fit's steps per call (what its first call ran beside the
    compilation); ``loss_note``: where the loss run's batch size came from."""
    lines = [header, ""]
    if cells:
        lines += ["| " + " | ".join(columns(spe)) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cell_row(r)) + " |" for r in cells]
        first = "fit's first call" + ("" if spe is None else f", {spe} steps (steps_per_execution)")
        lines += [
            "",
            f"ms/step: median of the timed runs; first call s: {first} with XLA compilation, timed whole; "
            "fit/bare: fit's step over the bare jitted step's; TFLOP/s and util from fit's step and "
            "model FLOPs (3 x forward matmuls); util against the dense bf16 peak for mixed_bfloat16, "
            "TF32 for float32 (JAX's default f32 matmul precision on GPU); peak mem: "
            "peak_bytes_in_use of device 0 during fit.",
        ]
        for r in cells:
            if r.get("agreement"):
                a = r["agreement"]
                lines.append(
                    f"{r['precision']} batch {r['batch']}: this loss against the whole logits through Keras's "
                    f"loss, same weights and batch, relative difference: loss {a['loss']:.1e}; gradients: "
                    f"features {a['features']:.1e}, embedding {a['embedding']:.1e}, bias {a['bias']:.1e} -> "
                    + ("PASS" if agrees(r) else "FAIL")
                    + f" (all <= {AGREEMENT_TOLERANCE:g})."
                )
    if loss is not None:
        lines.append("")
        if "error" in loss:
            lines.append(f"loss run: FAILED: {loss['error']}")
        else:
            trace = ", ".join(f"{v:.3f}" for v in loss["every_10_steps"])
            lines += [
                f"loss run ({loss['precision']}, batch {loss['batch']}{loss_note}, {loss['steps']} steps, "
                f"{loss['seconds']:.1f}s): first {loss['first']:.4f}, last {loss['last']:.4f} -> "
                f"{'PASS' if loss['passed'] else 'FAIL'} (finite: {loss['finite']}, fell by "
                f">= {100 * loss['min_drop']:g}%: {loss['fell']})",
                f"loss every {LOSS_EVERY} steps (mean of those {LOSS_EVERY}): {trace}",
            ]
    return "\n".join(lines) + "\n"


def fused_note() -> str:
    """The fused kernels' blocks, and whether they ran as kernels at all, for the table's header."""
    import head_loss
    import jax

    blocks = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(head_loss.FUSED).items())
    note = f"fused blocks {blocks}; "
    if jax.default_backend() != "gpu":
        note += "Pallas's interpreter runs the fused kernels here (no GPU): their timing means nothing; "
    return note


def _list(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in str(item).split(",") if v.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The arguments, each checked before any work: a bad one is one line (argparse's) and exit 2.

    Adds ``precisions`` and ``batches``, the comma lists unfolded (defaults filled in)."""
    ap = argparse.ArgumentParser(
        prog="train.py --synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--synthetic", action="store_true", help="this mode (accepted for train.py's dispatch)")
    ap.add_argument("--preset", default="guide", choices=sorted(PRESETS))
    ap.add_argument(
        "--precision",
        action="append",
        default=[],
        help=f"{' | '.join(PRECISIONS)} (repeatable or comma list; default auto)",
    )
    ap.add_argument(
        "--batch-size",
        action="append",
        default=[],
        help="repeatable or comma list (default pretrain.batch_size); the loss run takes the first",
    )
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (rounded up to steps_per_execution)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the median is reported")
    ap.add_argument("--pool", type=int, default=8, help="distinct random batches, cycled")
    ap.add_argument("--vocab-size", type=int, default=30522, help="default: BERT uncased")
    ap.add_argument(
        "--mlm-loss",
        default="keras",
        choices=MLM_LOSSES,
        help="keras: the pipeline's loss; the others: levers (see mlm_loss)",
    )
    ap.add_argument("--out", help="write synthetic.md and synthetic.json into this folder")
    ap.add_argument(
        "--loss-run",
        type=int,
        default=0,
        metavar="N",
        help=f"also train N steps (>= {MIN_LOSS_RUN}; 0: none) at mixed_bfloat16 and the first --batch-size",
    )
    ap.add_argument("--min-drop", type=float, default=0.01, help="loss run: relative fall required (0.01 = 1%%)")
    ap.add_argument("--only-loss-run", action="store_true", help="skip the throughput table")
    ap.add_argument("--in-process", action="store_true", help="run every unit in this process")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--unit", help=argparse.SUPPRESS)
    ap.add_argument("--unit-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("steps", "warmup", "repeats", "pool"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.vocab_size < 16:
        ap.error(f"--vocab-size {args.vocab_size}: must be >= 16 (the special tokens plus words)")
    args.precisions = _list(args.precision) or ["auto"]
    if bad := [p for p in args.precisions if p not in PRECISIONS]:
        ap.error(f"--precision {','.join(bad)}: expected one or more of {', '.join(PRECISIONS)}")
    try:
        cfg = config({"preset": args.preset, "set": args.set})
    except ConfigError as exc:
        ap.error(f"--set {' '.join(args.set)}: {exc}")
    batches = _list(args.batch_size)
    if bad := [b for b in batches if not b.isdigit() or int(b) < 1]:
        ap.error(f"--batch-size {','.join(bad)}: expected whole numbers >= 1, e.g. 128 or 128,1024")
    args.batches = [int(b) for b in batches] or [cfg.pretrain.batch_size]
    if args.loss_run < 0 or 0 < args.loss_run < MIN_LOSS_RUN:
        ap.error(
            f"--loss-run {args.loss_run}: the loss run records one loss per {LOSS_EVERY} steps and compares the first "
            f"with the last: give >= {MIN_LOSS_RUN} steps, or 0 for no loss run"
        )
    if args.only_loss_run and not args.loss_run:
        ap.error(f"--only-loss-run without --loss-run N (N >= {MIN_LOSS_RUN}) would run nothing: add --loss-run")
    if not 0 <= args.min_drop < 1:
        ap.error(f"--min-drop {args.min_drop}: a relative fall, >= 0 and < 1 (0.01 = 1%)")
    return args


def block_tensorflow() -> None:
    """Make ``import tensorflow`` fail in this process (and its unit processes): this mode must
    run where TensorFlow is not installed, so it must not quietly use it where it is."""
    if os.environ.get("ENCODERFLOW_BENCH_ALLOW_TF") != "1":
        sys.modules.setdefault("tensorflow", None)


def header_text(args, cfg) -> str:
    """The table's first line: the model, and the steps each cell actually runs (after rounding)."""
    import jax
    import keras
    import keras_hub

    m, d = cfg.model, cfg.data
    spe = cfg.pretrain.steps_per_execution
    return (
        f"synthetic pretraining benchmark: preset {args.preset}"
        + (f" ({', '.join(args.set)})" if args.set else "")
        + f"; model {m.num_layers} layers, dim {m.model_dim}, ffn {m.intermediate_dim}, {m.num_heads} heads; "
        f"seq {d.seq_length}, {d.predictions_per_seq} predictions/seq, vocab {args.vocab_size}; "
        + ("" if args.mlm_loss == "keras" else f"loss {args.mlm_loss} (not the pipeline's); ")
        + ("fit without the accuracy metric (no logits); " if args.mlm_loss in HEAD_LOSSES else "")
        + (fused_note() if args.mlm_loss == "fused" else "")
        + (steps_note(args.steps, args.warmup, args.repeats, spe) + "; " if not args.only_loss_run else "")
        + f"python {platform.python_version()}, "
        f"jax {jax.__version__}, keras {keras.__version__}, keras-hub {keras_hub.__version__}"
        + ("" if "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None else "; TensorFlow WAS imported")
    )


def steps_note(steps: int, warmup: int, repeats: int, spe: int) -> str:
    """What a cell runs, in words, the rounding to whole calls of ``spe`` steps said where it happened."""
    plan = planned_steps(steps, warmup, spe)
    rounded = []
    if plan["timed"] != steps:
        rounded.append(f"--steps {steps}")
    if plan["fit_warmup"] != warmup:
        rounded.append(f"fit's warm-up of {warmup}")
    return (
        f"warm-up: fit {plan['fit_warmup']} steps (its first call compiles), bare step {plan['bare_warmup']}; "
        f"timed: {repeats} x {plan['timed']} steps each for fit and the bare step"
        + (
            f" ({' and '.join(rounded)} rounded up to whole calls of steps_per_execution={spe}: fit runs no "
            "shorter call)"
            if rounded
            else ""
        )
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # A unit process says nothing: the process that started it says it once.
        if "--unit" not in argv:
            print("train.py --synthetic: interrupted (Ctrl-C); no table written", file=sys.stderr)
        return INTERRUPTED_EXIT


# A shell's code for a command ended by SIGINT.
INTERRUPTED_EXIT = 130


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    block_tensorflow()
    from encoderflow import runtime

    runtime.use_jax()
    if args.unit:  # a unit process started by spawn()
        result = run_unit(json.loads(args.unit))
        Path(args.unit_out).write_text(json.dumps(result))
        return 0

    cfg = config({"preset": args.preset, "set": args.set})
    base = {
        "preset": args.preset,
        "set": args.set,
        "vocab_size": args.vocab_size,
        "mlm_loss": args.mlm_loss,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "pool": args.pool,
    }
    units = []
    if not args.only_loss_run:
        units += [
            {**base, "kind": "cell", "precision": p, "batch_size": b} for p in args.precisions for b in args.batches
        ]
    loss_note = ""
    if args.loss_run:
        units.append(
            {
                **base,
                "kind": "loss",
                "precision": "mixed_bfloat16",
                "batch_size": args.batches[0],
                "loss_run": args.loss_run,
                "min_drop": args.min_drop,
            }
        )
        if len(args.batches) > 1:
            loss_note = f", the first of --batch-size {','.join(map(str, args.batches))}"
    isolate = len(units) > 1 and not args.in_process
    results = []
    for unit in units:
        what = f"{unit['precision']} batch {unit['batch_size']}" + (" loss run" if unit["kind"] == "loss" else "")
        print(f"synthetic: {what} ...", flush=True)
        results.append(spawn(unit) if isolate else run_unit(unit))
    cells = [r for r, u in zip(results, units) if u["kind"] == "cell"]
    loss = next((r for r, u in zip(results, units) if u["kind"] == "loss"), None)

    header = header_text(args, cfg)
    text = markdown(header, cells, loss, spe=cfg.pretrain.steps_per_execution, loss_note=loss_note)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "synthetic.md").write_text(text)
        payload = {"header": header, "args": vars(args), "cells": cells, "loss_run": loss}
        (out / "synthetic.json").write_text(json.dumps(payload, indent=2) + "\n")
    print()
    print(text, end="")
    failed = (
        any("error" in r for r in results)
        or not all(agrees(r) for r in cells)
        or (loss is not None and not loss.get("passed"))
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
