"""Masked-LM pretraining of the encoder from sealed TFRecord shards (Keras 3, JAX backend)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from encoderflow import config, layout, runtime
from encoderflow.config import Config

log = logging.getLogger(__name__)

# The MLM head's metric as Keras names it: compile, evaluate and the history's val_ column.
MLM_ACCURACY = "sparse_categorical_accuracy"

# Pretraining settings that change when the host looks, not what is trained (declared trains=False).
HOUSEKEEPING = tuple(k.name for k in config.section_knobs(config.PretrainConfig) if not k.trains)
# Steps timed after the first (compiling) one for the time estimate.
ESTIMATE_STEPS = 10
# In the backup folder: the key of the training its backups belong to.
BACKUP_KEY = "KEY"
# ... and the code hash it was taken by: another run folder resumes a backup only under the same code.
BACKUP_CODE = "CODE"


def steps_per_execution(wanted: int, steps_per_epoch: int) -> int:
    """The largest count <= ``wanted`` that divides the epoch.

    A call into the compiled step runs this many steps; callbacks see only its ends. Dividing the
    epoch keeps every epoch end at the end of a call (Keras's last call of an epoch would run on into
    the next epoch's data). Backups are taken between calls, at the first call boundary at or after
    each ``pretrain.backup_every_steps``, so a resume starts on a call boundary whatever the interval.
    """
    return max(d for d in range(1, max(1, min(wanted, steps_per_epoch)) + 1) if steps_per_epoch % d == 0)


def epoch_steps(manifest: dict[str, Any], p, whole_batches: bool = False) -> int:
    """Steps per epoch: ``pretrain.steps_per_epoch``, or one pass over a copy of the train records.

    Args:
        whole_batches: drop a copy's last, short batch (data-parallel training splits every batch
            evenly over the devices, so a short one cannot run).
    """
    from encoderflow.data.shards import copy_records

    return p.steps_per_epoch or batches(copy_records(manifest), p.batch_size, whole_batches)


def batches(records: int, batch_size: int, whole_batches: bool = False) -> int:
    """Batches of ``batch_size`` in ``records``: the last, short one counted unless ``whole_batches``."""
    return records // batch_size if whole_batches else math.ceil(records / batch_size)


def train_batches(
    manifest_path: str | os.PathLike, cfg: Config, initial_epoch: int = 0, skip: int = 0, whole_batches: bool = False
):
    """One dataset for the whole run: epoch ``e`` is copy ``e % dupe_factor``, from ``initial_epoch`` on.

    Returns ``(dataset, steps_per_epoch)``. Each epoch contributes exactly ``steps_per_epoch``
    batches (a full pass over its copy when ``pretrain.steps_per_epoch`` is 0, otherwise that many,
    repeating within the copy), so fit's persistent iterator crosses into the next copy exactly
    at the epoch boundary.

    Args:
        initial_epoch: the first epoch served.
        skip: batches of ``initial_epoch`` already trained (a mid-epoch resume); they are left out.
        whole_batches: every batch holds ``pretrain.batch_size`` records (see :func:`epoch_steps`).
    """
    from encoderflow.data.shards import load_manifest, make_dataset

    tf = runtime.tensorflow()
    p = cfg.pretrain
    manifest = load_manifest(manifest_path, cfg)
    if not 0 <= initial_epoch < p.epochs:
        raise ValueError(f"initial_epoch must be in [0, {p.epochs}), got {initial_epoch}")
    steps = epoch_steps(manifest, p, whole_batches)
    if not 0 <= skip < steps:
        raise ValueError(f"skip must be in [0, {steps}), got {skip}")
    ds = None
    for epoch in range(initial_epoch, p.epochs):
        one = make_dataset(
            manifest_path,
            cfg,
            "train",
            p.batch_size,
            shuffle=True,
            repeat=bool(p.steps_per_epoch),
            epoch=epoch,
            drop_remainder=whole_batches,
        ).take(steps)
        ds = one if ds is None else ds.concatenate(one)
    # A copy short of records would shift every later epoch onto the wrong copy; fail instead.
    ds = ds.skip(skip).apply(tf.data.experimental.assert_cardinality((p.epochs - initial_epoch) * steps - skip))
    return ds, steps


@contextlib.contextmanager
def data_parallel(batch_size: int) -> Iterator[int]:
    """Shard each batch over every local device (``keras.distribution.DataParallel``) while the
    block runs, when there is more than one; the same code runs unchanged on one. Yields the
    device count.

    The distribution is Keras's global state: scoped, it ends with pretraining and never reaches
    fine-tuning or scoring in the same process (``make run`` runs every task in one).
    """
    keras = runtime.keras()
    import jax

    devices = jax.devices()
    if len(devices) == 1:
        yield 1
        return
    if batch_size % len(devices):
        from encoderflow.errors import EncoderflowError

        raise EncoderflowError(
            f"pretrain.batch_size={batch_size} must be a multiple of the {len(devices)} "
            "local devices for data-parallel training"
        )
    with keras.distribution.DataParallel(devices=devices).scope():
        yield len(devices)


def compile_mlm(mlm, p, total_steps: int, steps_per_execution: int = 1, loss=None, weighted_metrics=None) -> None:
    """The guide's compile: AdamW, cross-entropy and accuracy weighted over the masked positions.

    The head returns logits and the loss applies the softmax itself (``from_logits=True``): one
    softmax less, and Keras computes the loss in float32 even under a bfloat16 policy.

    Args:
        mlm: the model from :func:`encoderflow.model.build_pretraining_model`.
        p: the ``pretrain`` config section.
        total_steps: steps of the whole run (the ``warmup_cosine`` schedule spans them).
        steps_per_execution: steps per call into the compiled step (see :func:`steps_per_execution`).
        loss: another Keras loss with the same meaning, for ``benchmarks/synthetic.py --mlm-loss``
            to time a lever; the pipeline keeps the default.
        weighted_metrics: other metrics than the accuracy (``()``: none), for a lever whose
            model returns no logits; the pipeline keeps the default.
    """
    from encoderflow.train.optim import adamw

    keras = runtime.keras()
    mlm.compile(
        steps_per_execution=steps_per_execution,
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=adamw(p, total_steps=total_steps),
        weighted_metrics=[MLM_ACCURACY] if weighted_metrics is None else list(weighted_metrics),
        jit_compile=True,
    )


def read_history(path: Path) -> dict[str, list[float]]:
    """Per-epoch metrics from CSVLogger; an epoch logged twice (re-run after a crash) keeps its last row."""
    import csv

    if not path.exists():
        return {}
    rows: dict[int, dict[str, str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:  # a row two writers interleaved, or a killed write ran into the next: not an epoch's
                if None in row or None in row.values():
                    raise ValueError("fields beyond or short of the header")
                epoch = int(row.pop("epoch"))
                for value in row.values():
                    if value != "":
                        float(value)
            except (TypeError, ValueError):
                log.warning("pretrain: %s: a torn row skipped: %s", path, row)
                continue
            rows[epoch] = row
    keys = sorted({k for row in rows.values() for k in row})
    return {k: [float(rows[e][k]) for e in sorted(rows) if rows[e].get(k) not in (None, "")] for k in keys}


def warm_start(encoder, init: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Copy the weights of ``init["path"]`` (an ``encoder.keras``) into ``encoder``.

    Raises:
        EncoderflowError: the vocabulary (by sha256 when ``init`` knows it, else by size), the
            sequence length or any weight's shape differs; the message names both sides.
    """
    from encoderflow import model as models
    from encoderflow.errors import EncoderflowError

    parent = models.load(init["path"])
    where = f"pretrain.init_from={init['label']} ({init['path']})"
    if "token_and_position_embedding" not in {layer.name for layer in parent.layers}:
        raise EncoderflowError(
            f"{where}: not an encoder (a {type(parent).__name__} named {parent.name!r}, with no "
            "token_and_position_embedding layer)",
            fix="give an encoder.keras: a run's pretrain/encoder.keras, or the one in a bundle beside its "
            "classifier.keras (or pretrain.init_from=none)",
        )
    theirs = {
        "vocabulary size": int(models.token_embedding(parent).input_dim),
        "sequence length": models.max_length(parent),
    }
    ours = {"vocabulary size": manifest["vocab_size"], "sequence length": manifest["seq_length"]}
    for what, value in theirs.items():
        if value != ours[what]:
            raise EncoderflowError(
                f"{where}: its {what} is {value}, this run's shards have {ours[what]}; "
                "use pretrain.init_from=none or an encoder built for this vocabulary and data.seq_length"
            )
    if init.get("vocab_sha256") and init["vocab_sha256"] != manifest["vocab_sha256"]:
        raise EncoderflowError(
            f"{where}: its vocabulary sha256 {init['vocab_sha256']} differs from this run's "
            f"{manifest['vocab_sha256']} (same size, other tokens); use pretrain.init_from=none or the same vocabulary"
        )
    mine = {w.path: tuple(w.shape) for w in encoder.weights}
    given = {w.path: tuple(w.shape) for w in parent.weights}
    if list(mine.values()) != list(given.values()):
        diff = next(
            (f"{a}: {sa} here, {sb} there" for (a, sa), (_, sb) in zip(mine.items(), given.items()) if sa != sb),
            f"{len(mine)} weights here, {len(given)} there",
        )
        raise EncoderflowError(
            f"{where}: its layers do not match this config's model section ({diff}); "
            "use the model settings it was trained with, or pretrain.init_from=none"
        )
    encoder.set_weights(parent.get_weights())
    log.info("pretrain: warm start from %s: %d weights copied", where, len(mine))


def _adopt_backup(out_dir: Path, key: str) -> None:
    """Resume another run folder's unfinished training of ``key`` by the same code: copy its newest
    sound backup (and its epochs' history) into ``out_dir``, where :class:`StepBackup` finds it.

    A run stopped by Ctrl-C or a kill leaves its backups in its own folder, and the next run gets a
    new one: without this, hours of pretraining would start again from step 0. Nothing is copied
    when ``out_dir`` has a backup of its own.
    """
    from encoderflow.train.callbacks import backup_problem, checksum_file, latest_backup, sweep_dead_backups

    own = out_dir / "backup"
    if latest_backup(own)[1] is not None:
        return
    found, damaged = [], []
    for folder in _same_training(out_dir, key):
        if layout.trains_now(folder) is not None:  # alive: not stopped, and its backups keep changing
            continue
        sweep_dead_backups(folder / "backup")
        steps, file = latest_backup(folder / "backup")
        if file is not None:
            if (why := backup_problem(file)) is None:
                found.append((steps, file))
            else:
                damaged.append((steps, file, why))
    if damaged and (newest := max(damaged, key=lambda d: d[0]))[0] > max(found, default=(0, None))[0]:
        # Said, not skipped in silence: a person learns why hours of training start again.
        log.warning(
            "pretrain: run %s stopped this training (same key and code) at step %d, but its backup %s %s: not "
            "resumed from; %s",
            newest[1].parents[2].name,
            newest[0],
            newest[1],
            newest[2],
            f"resuming the sound one at step {max(found)[0]}" if found else "training starts at step 0",
        )
    if not found:
        return
    steps, file = max(found)
    try:
        _backup_dir(own, key)
        for src in (checksum_file(file), file):  # the checksum first, as StepBackup writes them
            with layout.atomic_path(own / src.name, suffix=src.suffix) as tmp:
                shutil.copyfile(src, tmp)
        if (history := file.parents[1] / "history.csv").exists():
            with layout.atomic_path(out_dir / history.name) as tmp:
                shutil.copyfile(history, tmp)
    except FileNotFoundError:  # that run is alive and replaced its backup meanwhile: train from the start
        shutil.rmtree(own, ignore_errors=True)
        return
    log.info(
        "pretrain: run %s stopped this training (same key and code) at step %d: its backup copied to %s",
        file.parents[2].name,
        steps,
        own,
    )


def _backup_dir(directory: Path, key: str) -> Path:
    """``directory``, emptied unless its backups were taken by training under ``key``.

    A retry resumes only the training it continues: between tries the champion may have moved
    (``init_from=champion``), or the config changed, and resuming would give weights that its
    result's lineage does not describe.
    """
    stamp = directory / BACKUP_KEY
    if directory.exists() and (not stamp.exists() or stamp.read_text().strip() != key):
        log.info("pretrain: backups in %s were taken by other training (another key); starting afresh", directory)
        shutil.rmtree(directory)
    if not stamp.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with layout.atomic_path(directory / BACKUP_CODE) as tmp:
            tmp.write_text(layout.code_hash() + "\n")
        with layout.atomic_path(stamp) as tmp:
            tmp.write_text(key + "\n")
    return directory


# Above this 95% margin (fewer than ~100 masked tokens), the MLM accuracy says nothing.
MARGIN_NOISE = 0.1


def validation_margin(manifest: dict[str, Any], records: int) -> tuple[int, float]:
    """About how many masked tokens ``records`` validation records hold, and the 95% margin of an
    accuracy measured on them (normal approximation at the worst case, 50%)."""
    valid = manifest["totals"]["valid"]
    tokens = valid["tokens"] * records / max(valid["records"], 1)
    masked = int(min(records * manifest["predictions_per_seq"], round(tokens * manifest["mask_rate"])))
    return masked, 1.96 * 0.5 / math.sqrt(max(masked, 1))


def _altered(encoder: Path, result: dict[str, Any]) -> str | None:
    if layout.sha256_file(encoder) != result["encoder_sha256"]:
        return f"its sha256 is not the {result['encoder_sha256']} its result.json recorded"
    return None


def pretrain(
    cfg: Config,
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    init: dict[str, Any] | None = None,
    earlier_runs: bool = True,
) -> dict[str, Any]:
    """Train the guide's encoder + tied MLM head; write ``encoder.keras`` atomically.

    ``init`` (``path``, ``label``, optional ``vocab_sha256``, ``version``) starts from another
    encoder's weights instead of a random initialisation (:func:`warm_start`): continual pretraining.

    A finished run with the same inputs and config is reused as is; with ``earlier_runs``, so is
    another run folder's encoder trained from them by the same code (linked in,
    :func:`~encoderflow.layout.adopt_earlier`). An interrupted run resumes
    from its newest backup in ``backup/`` (:class:`~encoderflow.train.callbacks.StepBackup`:
    weights, optimizer state and step, every ``pretrain.backup_every_steps`` steps into an epoch
    and at each epoch end) at the next step, in one ``fit`` whose data starts there, and ends with
    the weights of a run never interrupted. ``history.csv`` collects every attempt's epochs.

    A resume at an epoch boundary (the only kind when ``backup_every_steps`` is 0 or at least the
    steps per epoch) lines up with an uninterrupted run. After a resume ``s`` steps into an epoch
    (all epochs of one ``fit`` have one length), that attempt's Keras epochs start at the resume
    point: each of its history rows, validations and log lines comes ``s`` steps after an epoch
    boundary, and its last epoch is ``s`` steps short, so training and the final validation still
    end where an uninterrupted run's do.

    Returns:
        The result also written to ``result.json``: ``encoder`` (path), ``mlm_val_accuracy``,
        ``val_loss``, ``loss``, ``history`` (per epoch), and run facts.
    """
    out_dir = Path(out_dir)
    manifest_path = Path(manifest_path)
    # How often to back up, log or return to the host does not change what is trained: not part of the key.
    trained = {k: v for k, v in cfg.to_dict()["pretrain"].items() if k not in HOUSEKEEPING}
    # What was trained from what: the key hashes it and result.json carries it whole.
    keyed = {
        "model": cfg.to_dict()["model"],
        "pretrain": trained,
        "manifest": layout.sha256_file(manifest_path),
        "seed": cfg.data.seed,
        "init": layout.sha256_file(init["path"]) if init else None,
    }
    key = layout.sha256_json(keyed)
    what = "shards, model and pretrain config, seed, initial weights"
    # One try in this run folder at a time; a run of the same training waits for it: two `encoderflow run` of
    # one config minutes apart trained side by side on one accelerator, and the second copied the first's
    # live backup calling it stopped. It now reuses that run's encoder, or resumes its backup if it stops.
    with layout.alone_in(out_dir):
        done = layout.finished_or_after_twin(
            "pretrain", key, out_dir, "encoder", _altered, earlier_runs, what, TWIN_DOES, TWIN_THEN
        )
        if done is not None:
            return done
        if earlier_runs:
            _adopt_backup(out_dir, key)
        with data_parallel(cfg.pretrain.batch_size) as devices, layout.training(out_dir, key):
            return _train(cfg, manifest_path, out_dir, init, key, keyed, devices)


TWIN_DOES = "trains the same model from the same shards, config and code"
TWIN_THEN = "reusing its encoder (or resuming its backup if it stops)"


def backup_code(out_dir: str | os.PathLike) -> str | None:
    """The code hash that took the pretraining backups in ``out_dir`` (a run folder's ``pretrain``), or
    None when it holds none (or they were taken before the hash was recorded)."""
    with contextlib.suppress(OSError):
        return (Path(out_dir) / "backup" / BACKUP_CODE).read_text().strip() or None
    return None


def _same_training(out_dir: Path, key: str) -> Iterator[Path]:
    """The pretrain folders of other runs whose backups were taken training ``key`` with this code and
    that have no result: stopped, or training now (:func:`~encoderflow.layout.trains_now`)."""
    code = layout.code_hash()
    for stamp in (layout.home() / "runs").glob(f"*/pretrain/backup/{BACKUP_KEY}"):
        folder = stamp.parents[1]
        if folder.resolve() == out_dir.resolve() or (folder / "result.json").exists():
            continue
        try:
            same_key = stamp.read_text().strip() == key
        except OSError:
            continue
        if not same_key:
            continue
        if (taken := backup_code(folder)) == code:
            yield folder
        elif layout.trains_now(folder) is None:
            # Said: the stopped run's record promised a resume (hours of pretraining on the guide preset).
            log.info(
                "pretrain: not resuming run %s's backup of this training: taken by other code (code hash %s, "
                "this %s); resumed only by the code that took it",
                folder.parent.name,
                (taken or "not recorded")[:12],
                code[:12],
            )


def _train(
    cfg: Config,
    manifest_path: Path,
    out_dir: Path,
    init: dict[str, Any] | None,
    key: str,
    keyed: dict[str, Any],
    devices: int,
) -> dict[str, Any]:
    """:func:`pretrain`'s training on ``devices`` local devices, once no finished result was found."""
    from encoderflow import model as models
    from encoderflow.data.shards import copy_records, load_manifest, make_dataset
    from encoderflow.errors import EncoderflowError
    from encoderflow.train.callbacks import EpochLogger, NonFiniteLoss, StepBackup

    keras = runtime.keras()
    tf = runtime.tensorflow()
    manifest = load_manifest(manifest_path, cfg)
    p = cfg.pretrain
    keras.utils.set_random_seed(cfg.data.seed)
    policy = runtime.set_dtype_policy(p.precision)
    whole_batches = devices > 1

    def one_batch_at_least(count: int, split: str, records: int, more: str) -> None:
        if count == 0:
            raise EncoderflowError(
                f"{manifest_path}: {records} {split} records{' a copy' if split == 'train' else ''} do not fill "
                f"one batch of pretrain.batch_size={p.batch_size} on {devices} device{'s' * (devices > 1)}",
                fix=f"lower pretrain.batch_size (a multiple of the device count) or {more}",
            )

    train_records, per_copy = manifest["totals"]["train"]["records"], copy_records(manifest)
    # Per copy, whatever pretrain.steps_per_epoch says: repeating 4 records to fill 50 steps trains nothing.
    one_batch_at_least(batches(per_copy, p.batch_size, True), "train", per_copy, "pretrain on more text")
    steps = epoch_steps(manifest, p, whole_batches)
    nan_fix = f"lower pretrain.learning_rate (now {p.learning_rate:g}) or check the input data"
    backup = StepBackup(_backup_dir(out_dir / "backup", key), steps, p.backup_every_steps, nan_fix=nan_fix)
    # A backup saved after the last step (killed before the result was written) leaves nothing to train.
    initial_epoch, skip = divmod(min(backup.steps_done, steps * p.epochs), steps)
    pad_id = manifest["special_ids"]["[PAD]"]
    # pretrain.dropout_off: no dropout while pretraining; fine-tuning rebuilds the encoder with model.dropout.
    model_cfg = dataclasses.replace(cfg.model, dropout=0.0) if p.dropout_off else cfg.model
    encoder = models.build_encoder(model_cfg, manifest["vocab_size"], manifest["seq_length"], pad_id)
    if init:
        warm_start(encoder, init, manifest)
    mlm = models.build_pretraining_model(encoder, manifest["predictions_per_seq"])
    spe = divides = steps_per_execution(p.steps_per_execution, steps)
    if skip % spe:  # a backup taken with another steps_per_execution: calls must end on its step
        spe = math.gcd(spe, skip)
    # The MLflow param says what was asked: say what ran, and why it is less.
    lowered = [f"divide the {steps} steps per epoch"] if divides != p.steps_per_execution else []
    if spe != divides:
        lowered.append(f"end on step {skip}, where the backup this run resumes from was taken")
    compile_mlm(mlm, p, total_steps=steps * p.epochs, steps_per_execution=spe)
    backup.restore(mlm)
    device = runtime.device_summary()
    from encoderflow.train.optim import describe

    log.info(
        "pretrain: device %s, dtype policy %s (precision=%s), %s, %d steps per call%s",
        device,
        policy,
        p.precision,
        describe(p),
        spe,
        f" (pretrain.steps_per_execution {p.steps_per_execution}, lowered to {' and to '.join(lowered)})"
        if lowered
        else "",
    )
    log.info(
        "pretrain: model %s%s",
        models.describe(model_cfg),
        f" (pretrain.dropout_off; fine-tuning uses model.dropout {cfg.model.dropout:g})" if p.dropout_off else "",
    )
    # Declared length: Keras warns "input ran out of data" each epoch on an unknown-length set.
    val_records = manifest["totals"]["valid"]["records"]
    val_batches = batches(val_records, p.batch_size, whole_batches)
    if p.validation_steps:
        val_batches = min(val_batches, p.validation_steps)
    one_batch_at_least(val_batches, "validation", val_records, "hold out more text for validation")
    val_ds = make_dataset(manifest_path, cfg, "valid", p.batch_size, shuffle=False, drop_remainder=whole_batches).take(
        val_batches
    )
    val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(val_batches))
    val_used = min(val_records, val_batches * p.batch_size)
    val_masked, margin = validation_margin(manifest, val_used)
    # The MLM accuracy is a progress figure, not gated on: its margin is said, not warned about.
    log.info(
        "pretrain: validation on %d of %d records, ~%s masked tokens: MLM accuracy is known to +-%.3f (95%%)%s",
        val_used,
        val_records,
        f"{val_masked:,}",
        margin,
        "; that is noise: hold out more text for validation for a figure to compare" if margin > MARGIN_NOISE else "",
    )
    log.info(
        "pretrain: encoder %s parameters (%s with the MLM head), %s train records (%s), batch %d, %s "
        "from epoch %d, %d steps/epoch%s",
        f"{encoder.count_params():,}",
        f"{mlm.count_params():,}",
        f"{train_records:,}",
        manifest_path,
        p.batch_size,
        f"{p.epochs} epoch{'s' * (p.epochs != 1)}",
        initial_epoch,
        steps,
        f" (each record of its copy ~{repeats:.0f} times)"
        if (repeats := steps * p.batch_size / per_copy) >= 1.5
        else "",
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    slow_hint = None
    if runtime.on_cpu() and cfg.preset == "guide":
        slow_hint = (
            "the guide preset needs a GPU: run it on a GPU worker (queue 'gpu'), or try the pipeline with "
            "PRESET=smoke (preset 'smoke' in the trigger form) in minutes on this CPU"
        )
    epoch_logger = EpochLogger(
        "pretrain",
        p.batch_size,
        p.log_every_seconds,
        estimate_steps=ESTIMATE_STEPS,
        slow_hint=slow_hint,
        nan_fix=nan_fix,
        loss_ceiling=2 * math.log(manifest["vocab_size"]),
        # The input pipeline's iterator is dropped as fit returns, and tf.data's autotuner has held that
        # up to 35 s (measured: a repeated shard set, after a few minutes of training), with nothing logged.
        end_note="stopping the input pipeline (TensorFlow may take up to a minute), then saving the encoder",
        resumed_steps=skip,
    )
    history_csv = out_dir / "history.csv"
    t0 = time.monotonic()
    history = None
    if initial_epoch >= p.epochs and backup.steps_done:
        log.info(
            "pretrain: the backup at step %d (%s) is the end of training: an earlier try trained all %d epochs "
            "and stopped before saving the encoder; saving it from that backup",
            backup.steps_done,
            backup.directory,
            p.epochs,
        )
    if initial_epoch < p.epochs:
        if backup.steps_done:  # at an epoch boundary too: the log says where a retry picked up
            # A try whose worker died trains on with no log to write to: its epochs are only in history.csv.
            done = len(read_history(history_csv).get("loss", []))
            log.info(
                "pretrain: resuming epoch %d at step %d of %d (backup in %s)%s",
                initial_epoch + 1,
                skip + 1,
                steps,
                backup.directory,
                f"; {'epoch 1 was' if done == 1 else f'epochs 1-{done} were'} trained by earlier tries, in "
                f"{history_csv} (a try whose worker died trains on after its log ends)"
                if done
                else "",
            )
        train_ds, _ = train_batches(manifest_path, cfg, initial_epoch, skip, whole_batches)
        with warnings.catch_warnings():
            # After a mid-epoch resume the data ends mid-way through the last Keras epoch, as planned.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            history = mlm.fit(
                train_ds,
                validation_data=val_ds,
                epochs=p.epochs,
                steps_per_epoch=steps,
                initial_epoch=initial_epoch,
                verbose=0,
                shuffle=False,
                # CSVLogger before the backup: an epoch's backup follows its history row, so the rows,
                # appended across attempts (unlike History), miss no epoch the backups passed. The
                # backup checks the loss itself before it writes.
                callbacks=[
                    keras.callbacks.CSVLogger(str(history_csv), append=backup.steps_done > 0),
                    backup,
                    epoch_logger,
                ],
            )
    if p.epochs == 0:
        # No pretraining, the ablation's reference: the encoder keeps its seeded random
        # initialisation, and one validation pass says what the untrained head predicts.
        hist, final_loss = {}, None
        ev = mlm.evaluate(val_ds, verbose=0, return_dict=True)
        val_accuracy, val_loss = float(ev[MLM_ACCURACY]), float(ev["loss"])
        log.info(
            "pretrain: pretrain.epochs=0, encoder left at its random initialisation; val MLM accuracy %.4f",
            val_accuracy,
        )
    else:
        hist = read_history(history_csv) or (
            {k: [float(v) for v in vs] for k, vs in history.history.items()} if history else {}
        )
        if not hist.get("loss"):
            raise EncoderflowError(f"pretrain: no epoch was recorded in {out_dir}; delete {backup.directory} and retry")
        final_loss = hist["loss"][-1]
        if not math.isfinite(final_loss):
            raise NonFiniteLoss(f"pretrain: final loss {final_loss}; the encoder is not saved")
        if missing := [k for k in (f"val_{MLM_ACCURACY}", "val_loss") if not hist.get(k)]:
            # Validation always runs (one batch at least): a column missing is a renamed metric, not no data.
            raise EncoderflowError(
                f"pretrain: {history_csv} has no {' or '.join(missing)} column; the encoder is not saved"
            )
        val_accuracy, val_loss = hist[f"val_{MLM_ACCURACY}"][-1], hist["val_loss"][-1]

    encoder_path = out_dir / "encoder.keras"
    with layout.atomic_path(encoder_path, suffix=".keras") as tmp:
        encoder.save(tmp)
    result = {
        "key": key,
        "config": keyed,
        "encoder": str(encoder_path),
        "encoder_sha256": layout.sha256_file(encoder_path),
        "manifest": str(manifest_path),
        # The vocabulary the encoder's ids mean: fine-tuning checks it tokenizes with the same one.
        "vocab_sha256": manifest["vocab_sha256"],
        "parameters": int(encoder.count_params()),
        "mlm_val_accuracy": val_accuracy,
        "val_loss": val_loss,
        "loss": final_loss,
        "first_step_loss": epoch_logger.first_loss,
        "devices": devices,
        "device": device,
        "dtype_policy": policy,
        "steps_per_execution": spe,
        "step_seconds": epoch_logger.step_seconds,
        "history": hist,
        "seconds": round(time.monotonic() - t0, 1),
        # seconds and first_step_loss are this try's: one that resumed a backup did not see the steps before.
        # first_step_loss is Keras's running mean over the first call's steps (pretrain.steps_per_execution).
        "resumed_from_step": initial_epoch * steps + skip,
        "init_from": {k: init.get(k) for k in ("label", "path", "version")} if init else None,
        "code_hash": layout.code_hash(),
    }
    layout.write_json(out_dir / "result.json", result)
    # Only now: until the result is written, a retry must find the trained weights.
    shutil.rmtree(backup.directory, ignore_errors=True)
    # Its path and sha256 are the step's output line (steps._output), as every step's are.
    log.info(
        "pretrain: val MLM accuracy %.4f; encoder %s bytes",
        result["mlm_val_accuracy"],
        f"{encoder_path.stat().st_size:,}",
    )
    return result
