"""Masked-LM pretraining of the encoder from sealed TFRecord shards (Keras 3, JAX backend)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from encoderflow import layout
from encoderflow.config import Config

log = logging.getLogger(__name__)

# Keras's BackupAndRestore bookkeeping file; its "epoch" is where a resumed fit starts.
BACKUP_METADATA = "training_metadata.json"


def resume_point(backup_dir: str | os.PathLike) -> tuple[int, int]:
    """Where a fit resuming from ``backup_dir`` starts: ``(epoch, steps of it already done)``.

    ``(0, 0)`` for a fresh start. The training dataset must be built before ``fit`` starts, and
    Keras skips finished epochs without consuming data, so the data for the resumed epoch has to
    be first in the dataset.
    """
    backup_dir = Path(backup_dir)
    meta = backup_dir / BACKUP_METADATA
    if not (backup_dir / "latest.weights.h5").exists() or not meta.exists():
        return 0, 0
    saved = layout.read_json(meta)
    return int(saved["epoch"]), int(saved.get("steps_done", 0))


def resume_epoch(backup_dir: str | os.PathLike) -> int:
    """The epoch a ``BackupAndRestore`` fit will resume at (0 for a fresh start)."""
    return resume_point(backup_dir)[0]


def step_backup(backup_dir: str | os.PathLike, every_steps: int, steps_done: int = 0, keep: bool = False):
    """``keras.callbacks.BackupAndRestore`` that saves at every epoch end and every ``every_steps``
    steps, and records how many steps of the epoch the saved state has seen (``steps_done``).

    Keras's own int ``save_freq`` saves no epoch ends, and after a restore it records epoch 0
    until the first epoch ends; this subclass fixes both. Keras restores the weights and the
    optimizer and restarts the saved epoch from its first batch; :func:`pretrain` instead feeds
    only that epoch's remaining batches (:func:`resume_point`), so no batch is trained twice.
    ``double_checkpoint`` keeps the previous save for a process killed while writing.

    Args:
        steps_done: steps of the first epoch that ran before this fit (a mid-epoch resume).
        keep: keep the backup when training ends (the catch-up fit, whose state the next fit
            restores).
    """
    import keras

    class StepBackup(keras.callbacks.BackupAndRestore):
        def __init__(self):
            super().__init__(str(backup_dir), save_freq=every_steps or "epoch", double_checkpoint=True,
                             delete_checkpoint=not keep)
            self._offset = self._steps_done = steps_done

        def on_epoch_begin(self, epoch, logs=None):
            self._current_epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            self._steps_done = self._offset + batch + 1
            super().on_train_batch_end(batch, logs)

        def on_epoch_end(self, epoch, logs=None):
            self._offset = self._steps_done = 0
            super().on_epoch_end(epoch, logs)  # _current_epoch = epoch + 1; saves in "epoch" mode
            if self.save_freq != "epoch":
                self._save_model()

        def _save_model(self):
            super()._save_model()
            # Written after the weights: a kill in between trains at most every_steps steps twice.
            layout.write_json(Path(self.backup_dir) / BACKUP_METADATA,
                              {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                               "steps_done": self._steps_done})

    return StepBackup()


def train_batches(manifest_path: str | os.PathLike, cfg: Config, initial_epoch: int = 0):
    """One dataset for the whole run: epoch ``e`` is copy ``e % dupe_factor``, from ``initial_epoch`` on.

    Returns ``(dataset, steps_per_epoch)``. Each epoch contributes exactly ``steps_per_epoch``
    batches (a full pass over its copy when ``pretrain.steps_per_epoch`` is 0, otherwise that many,
    repeating within the copy), so fit's persistent iterator crosses into the next copy exactly
    at the epoch boundary.
    """
    from encoderflow.data.shards import copy_records, load_manifest, make_dataset
    from encoderflow.data.tokenizer import cpu_only_tensorflow

    tf = cpu_only_tensorflow()
    p = cfg.pretrain
    manifest = load_manifest(manifest_path, cfg)
    if not 0 <= initial_epoch < p.epochs:
        raise ValueError(f"initial_epoch must be in [0, {p.epochs}), got {initial_epoch}")
    steps = p.steps_per_epoch or math.ceil(copy_records(manifest) / p.batch_size)
    ds = None
    for epoch in range(initial_epoch, p.epochs):
        one = epoch_batches(manifest_path, cfg, epoch, steps)
        ds = one if ds is None else ds.concatenate(one)
    # A copy short of records would shift every later epoch onto the wrong copy; fail instead.
    return ds.apply(tf.data.experimental.assert_cardinality((p.epochs - initial_epoch) * steps)), steps


def epoch_batches(manifest_path: str | os.PathLike, cfg: Config, epoch: int, steps: int, skip: int = 0):
    """Epoch ``epoch``'s ``steps`` batches (copy ``epoch % dupe_factor``), less the first ``skip``."""
    from encoderflow.data.shards import make_dataset

    p = cfg.pretrain
    return make_dataset(manifest_path, cfg, "train", p.batch_size, shuffle=True, repeat=bool(p.steps_per_epoch),
                        epoch=epoch).take(steps).skip(skip)


def epoch_guard(first_epoch: int):
    """A callback that stops fit if Keras starts at another epoch than the dataset was built for."""
    import keras

    class EpochGuard(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.started = False

        def on_epoch_begin(self, epoch, logs=None):
            if not self.started and epoch != first_epoch:
                raise RuntimeError(f"pretrain: fit started at epoch {epoch} but the data was built from epoch "
                                   f"{first_epoch}; delete the backup folder to start over")
            self.started = True

    return EpochGuard()


def data_parallel(batch_size: int) -> int:
    """Shard each batch over every local device (``keras.distribution.DataParallel``) when there is
    more than one; the same code runs unchanged on one. Returns the device count."""
    import jax
    import keras

    devices = jax.devices()
    if len(devices) > 1:
        if batch_size % len(devices):
            from encoderflow.errors import EncoderflowError
            raise EncoderflowError(f"pretrain.batch_size={batch_size} must be a multiple of the {len(devices)} "
                                   "local devices for data-parallel training")
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return len(devices)


def dtype_policy(precision: str, platform: str | None = None) -> str:
    """``auto``: bfloat16 compute where the accelerator has it, float32 on a CPU."""
    if precision != "auto":
        return precision
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "mixed_bfloat16" if platform in ("gpu", "cuda", "rocm", "tpu") else "float32"


def learning_rate(p, total_steps: int):
    """The guide's constant rate, or linear warm-up then cosine decay over ``total_steps``."""
    if p.lr_schedule == "constant":
        return p.learning_rate
    import keras

    warmup = max(1, int(round(p.warmup_ratio * total_steps)))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, total_steps - warmup), alpha=0.0,
        warmup_target=p.learning_rate, warmup_steps=warmup)


def read_history(path: Path) -> dict[str, list[float]]:
    """Per-epoch metrics from CSVLogger; an epoch logged twice (re-run after a crash) keeps its last row."""
    import csv

    if not path.exists():
        return {}
    rows: dict[int, dict[str, str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[int(row.pop("epoch"))] = row
    keys = sorted({k for row in rows.values() for k in row})
    return {k: [float(rows[e][k]) for e in sorted(rows) if rows[e].get(k) not in (None, "")] for k in keys}


def pretrain(cfg: Config, manifest_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train the guide's encoder + tied MLM head; write ``encoder.keras`` atomically.

    An interrupted attempt resumes from ``backup/`` (``keras.callbacks.BackupAndRestore``); a
    finished one with the same inputs and config is reused as is.
    """
    out_dir = Path(out_dir)
    manifest_path = Path(manifest_path)
    # How often to back up does not change what is trained: not part of the key.
    trained = {k: v for k, v in cfg.to_dict()["pretrain"].items() if k != "backup_every_steps"}
    key = layout.sha256_json({"model": cfg.to_dict()["model"], "pretrain": trained,
                              "manifest": layout.sha256_file(manifest_path), "seed": cfg.data.seed})
    if (done := layout.reusable(out_dir / "result.json", key)) is not None and Path(done["encoder"]).exists():
        log.info("pretrain: reusing %s", done["encoder"])
        return done

    from encoderflow.data.shards import copy_records, load_manifest, make_dataset

    manifest = load_manifest(manifest_path, cfg)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    from encoderflow import model as models
    from encoderflow.train.callbacks import EpochLogger

    p = cfg.pretrain
    keras.utils.set_random_seed(cfg.data.seed)
    policy = dtype_policy(p.precision)
    keras.config.set_dtype_policy(policy)
    devices = data_parallel(p.batch_size)
    backup = out_dir / "backup"
    resume_at, steps_done = resume_point(backup)
    steps = p.steps_per_epoch or math.ceil(copy_records(manifest) / p.batch_size)
    # Mid-epoch backup: that epoch's remaining batches first, in a fit of their own (Keras
    # cannot shorten one epoch of a fit), then whole epochs.
    catch_up = 0 < steps_done < steps and resume_at < p.epochs
    # A backup saved after the last epoch (killed before it was deleted) resumes past the end:
    # Keras then runs no epoch and reads no data, so any valid start will do.
    initial_epoch = resume_at + 1 if catch_up else min(resume_at, p.epochs - 1)
    pad_id = manifest["special_ids"]["[PAD]"]
    encoder = models.build_encoder(cfg.model, manifest["vocab_size"], manifest["seq_length"], pad_id)
    mlm = models.build_pretraining_model(encoder, manifest["predictions_per_seq"])
    mlm.compile(
        loss="sparse_categorical_crossentropy",
        optimizer=keras.optimizers.AdamW(learning_rate(p, total_steps=steps * p.epochs)),
        weighted_metrics=["sparse_categorical_accuracy"],
        jit_compile=True,
    )
    log.info("pretrain: dtype policy %s (precision=%s), learning rate %s, %d device(s)", policy, p.precision,
             p.lr_schedule, devices)
    from encoderflow.data.tokenizer import cpu_only_tensorflow

    tf = cpu_only_tensorflow()
    # Declared length: Keras warns "input ran out of data" each epoch on an unknown-length set.
    val_batches = math.ceil(manifest["totals"]["valid"]["records"] / p.batch_size)
    if p.validation_steps:
        val_batches = min(val_batches, p.validation_steps)
    val_ds = make_dataset(manifest_path, cfg, "valid", p.batch_size, shuffle=False).take(val_batches)
    val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(val_batches))
    log.info("pretrain: %d parameters, %d train records (%s), batch %d, %d epochs from epoch %d, %d steps/epoch",
             mlm.count_params(), manifest["totals"]["train"]["records"], manifest_path, p.batch_size, p.epochs,
             initial_epoch, steps)

    out_dir.mkdir(parents=True, exist_ok=True)
    epoch_logger = EpochLogger("pretrain", p.batch_size)
    history_csv = str(out_dir / "history.csv")
    t0 = time.monotonic()
    history = None
    if catch_up:
        log.info("pretrain: resuming epoch %d at step %d of %d (backup in %s)", resume_at + 1, steps_done + 1,
                 steps, backup)
        rest = epoch_batches(manifest_path, cfg, resume_at, steps, skip=steps_done)
        rest = rest.apply(tf.data.experimental.assert_cardinality(steps - steps_done))
        history = mlm.fit(
            rest, validation_data=val_ds, epochs=resume_at + 1, steps_per_epoch=steps - steps_done,
            initial_epoch=resume_at, verbose=0, shuffle=False,
            # keep: the next fit restores the epoch-end state this one saves.
            callbacks=[step_backup(backup, p.backup_every_steps, steps_done, keep=True), epoch_guard(resume_at),
                       keras.callbacks.CSVLogger(history_csv, append=True), epoch_logger],
        )
    if initial_epoch < p.epochs:
        train_ds, _ = train_batches(manifest_path, cfg, initial_epoch)
        history = mlm.fit(
            train_ds, validation_data=val_ds, epochs=p.epochs, steps_per_epoch=steps, initial_epoch=initial_epoch,
            verbose=0, shuffle=False,
            # The guard runs after BackupAndRestore has set the epoch Keras resumes at.
            callbacks=[step_backup(backup, p.backup_every_steps), epoch_guard(initial_epoch),
                       # Survives a retry, unlike History: the curves cover every attempt's epochs.
                       keras.callbacks.CSVLogger(history_csv, append=initial_epoch > 0 or catch_up),
                       epoch_logger],
        )
    elif backup.exists():  # the catch-up fit ran the last epoch and kept its backup
        shutil.rmtree(backup)
    hist = read_history(out_dir / "history.csv") or (
        {k: [float(v) for v in vs] for k, vs in history.history.items()} if history else {})
    if not hist.get("loss"):
        from encoderflow.errors import EncoderflowError
        raise EncoderflowError(f"pretrain: no epoch was recorded in {out_dir}; delete {backup} and retry")
    final_loss = hist["loss"][-1]
    if not math.isfinite(final_loss):
        from encoderflow.train.callbacks import NonFiniteLoss
        raise NonFiniteLoss(f"pretrain: final loss {final_loss}; the encoder is not saved")

    encoder_path = out_dir / "encoder.keras"
    with layout.atomic_path(encoder_path, suffix=".keras") as tmp:
        encoder.save(tmp)
    result = {
        "key": key,
        "encoder": str(encoder_path),
        "encoder_sha256": layout.sha256_file(encoder_path),
        "manifest": str(manifest_path),
        "parameters": int(encoder.count_params()),
        "val_mlm_accuracy": hist.get("val_sparse_categorical_accuracy", [float("nan")])[-1],
        "val_loss": hist.get("val_loss", [float("nan")])[-1],
        "loss": final_loss,
        "first_step_loss": epoch_logger.first_loss,
        "devices": devices,
        "history": hist,
        "seconds": round(time.monotonic() - t0, 1),
    }
    layout.write_json(out_dir / "result.json", result)
    log.info("pretrain: wrote %s (%s bytes, sha256 %s); val MLM accuracy %.4f", encoder_path,
             f"{encoder_path.stat().st_size:,}", result["encoder_sha256"], result["val_mlm_accuracy"])
    return result
