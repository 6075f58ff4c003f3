"""Fine-tuning the pretrained encoder on labeled data (SST-2 or your own) into a model bundle."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from encoderflow import bundle, layout, runtime
from encoderflow.config import Config
from encoderflow.results import split_info

log = logging.getLogger(__name__)

# At most one progress line (step, loss, sequences/s, ETA) per this many seconds within an epoch, as
# pretraining's default (pretrain.log_every_seconds): an epoch of the guide's on a CPU takes hours.
LOG_EVERY_SECONDS = 60.0
# Steps the time estimate is measured over: batches of the length buckets' widths differ in cost (a
# 16-token batch is quick), and 10 of them told a smoke run half its step time.
ESTIMATE_STEPS = 50


def compile_classifier(classifier, f, total_steps: int, num_classes: int = 2) -> None:
    """The guide's fine-tuning compile: AdamW, binary cross-entropy (sparse categorical for more than
    two classes), accuracy.

    Args:
        classifier: the model from :func:`encoderflow.model.build_classifier`.
        f: the ``finetune`` config section.
        total_steps: optimizer steps of the whole fine-tuning (a ``warmup_cosine`` schedule spans them).
        num_classes: the label set's size.
    """
    from encoderflow.train.optim import adamw

    classifier.compile(
        loss="binary_crossentropy" if num_classes <= 2 else "sparse_categorical_crossentropy",
        optimizer=adamw(f, total_steps, ema_momentum=f.ema_momentum),
        metrics=["accuracy"],
        jit_compile=True,
    )


def _unsound(folder: Path, result: dict[str, Any]) -> str | None:
    return bundle.damage(folder)


def _on_this_dev(done: dict[str, Any], labeled: dict[str, Any], dev_sha256: str, out_dir: Path) -> dict[str, Any]:
    """A reused result, its dev accuracy that of this run's dev file: scored again (as the gate scores
    bundles) when the bundle was scored on another. The model is the same one, which the gate then
    refuses to bless a second time (``gate.model_check``); registering it again would otherwise move
    ``champion`` to a copy of itself."""
    if done.get("dev_sha256") == dev_sha256:
        return done
    from encoderflow.data.inputs import read_labeled

    accuracy, loss = bundle.Scorer(done["bundle"]).evaluate(*read_labeled(labeled, "dev"))
    log.info(
        "finetune: dev file changed since this bundle was trained (sha256 %s, was %s): it scores %.4f on it, "
        "val_loss %.4f (%.4f and %.4f before); the per-epoch curves are the earlier dev file's",
        dev_sha256[:16],
        str(done.get("dev_sha256"))[:16],
        accuracy,
        loss,
        done["val_accuracy"],
        done["val_loss"],
    )
    # history_dev_sha256: the dev file the curves (history) were measured on, kept through rescorings.
    trained_on = done.get("history_dev_sha256", done.get("dev_sha256"))
    rescored = {**done, "val_accuracy": accuracy, "val_loss": loss, "dev_sha256": dev_sha256}
    rescored["history_dev_sha256"] = trained_on
    layout.write_json(out_dir / "result.json", rescored)
    return rescored


def finetune(
    cfg: Config,
    encoder_path: str | os.PathLike,
    labeled: dict[str, Any],
    vocab_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    init_classifier: str | os.PathLike | None = None,
    earlier_runs: bool = True,
) -> dict[str, Any]:
    """Encoder + pooled classifier on the labeled train split; dev accuracy; a model bundle.

    Reuses the result of an earlier call with the same inputs and config; with ``earlier_runs``, also
    another run folder's bundle trained from them by the same code (linked in,
    :func:`~encoderflow.layout.adopt_earlier`).

    Args:
        cfg: the run's config (``model``, ``finetune``, ``data`` settings).
        encoder_path: the pretrained ``encoder.keras``.
        labeled: the validated labeled data's record (SST-2 or your own): ``content_hash``,
            ``splits`` train and dev, ``labels``.
        vocab_path: the WordPiece vocabulary the encoder was pretrained with.
        out_dir: where ``bundle/`` and ``result.json`` go.
        init_classifier: a saved classifier to continue from (``finetune.init_from=champion``) instead of a
            new head on ``encoder_path``; its output must fit the label set.
        earlier_runs: look for the bundle in other run folders too (off when a run is forced).

    Returns:
        ``result.json``'s content: ``bundle`` (its folder), ``val_accuracy``, ``val_loss``, ``history``, ...

    Raises:
        NonFiniteLoss: the validation loss is NaN or infinite; no bundle is written.
    """
    out_dir = Path(out_dir)
    # What was trained from what: the key hashes it and result.json carries it whole.
    keyed = {
        "model": cfg.to_dict()["model"],
        "finetune": cfg.to_dict()["finetune"],
        "encoder": layout.sha256_file(encoder_path),
        # The train split alone: the dev split is only scored (a dev-only change re-scores the same
        # model, _on_this_dev) and other files of the dataset (SST-2's unlabeled test.tsv) are not read.
        "train": split_info(labeled, "train")["sha256"],
        "labels": labeled.get("labels"),
        "columns": labeled.get("columns"),
        "vocab": layout.sha256_file(vocab_path),
        # Fine-tuning's own use of them: from the champion's encoder (finetune.init_from), nothing
        # else in the key would tell a bundle trained under another seed or tokenizer apart.
        "data": {k: getattr(cfg.data, k) for k in ("seq_length", "seed", "lowercase", "strip_accents")},
        "precision": cfg.pretrain.precision,
        "init": layout.sha256_file(init_classifier) if init_classifier else None,
    }
    key = layout.sha256_json(keyed)
    dev_sha256 = split_info(labeled, "dev")["sha256"]
    what = "encoder, labeled train split, vocabulary, config"
    # As pretrain: one try in this run folder at a time, and a run of the same fine-tuning waits for it. Two
    # runs differing only in gate settings fine-tuned side by side, and both bundles, one model trained
    # twice, could be registered.
    with layout.alone_in(out_dir):
        done = layout.finished_or_after_twin(
            "finetune", key, out_dir, "bundle", _unsound, earlier_runs, what, TWIN_DOES, TWIN_THEN
        )
        if done is not None:
            return _on_this_dev(done, labeled, dev_sha256, out_dir)
        with layout.training(out_dir, key):
            return _train(cfg, encoder_path, labeled, vocab_path, out_dir, init_classifier, key, keyed, dev_sha256)


TWIN_DOES = "fine-tunes the same encoder on the same data with the same config and code"
TWIN_THEN = "reusing its bundle (or training here if it stops)"


def _train(
    cfg: Config,
    encoder_path: str | os.PathLike,
    labeled: dict[str, Any],
    vocab_path: str | os.PathLike,
    out_dir: Path,
    init_classifier: str | os.PathLike | None,
    key: str,
    keyed: dict[str, Any],
    dev_sha256: str,
) -> dict[str, Any]:
    from encoderflow.data.inputs import labels_of, read_labeled
    from encoderflow.data.sst2 import bucket_widths, bucketed_token_dataset, token_dataset
    from encoderflow.data.tokenizer import Vocab, make_tokenizer

    keras = runtime.keras()

    from encoderflow import model as models
    from encoderflow.train.callbacks import EpochLogger, NonFiniteLoss

    f = cfg.finetune
    keras.utils.set_random_seed(cfg.data.seed)
    # Set, not inherited: dag.test runs every task in one process, where the policy is global.
    policy = runtime.set_dtype_policy(cfg.pretrain.precision)
    device = runtime.device_summary()
    log.info("finetune: device %s, dtype policy %s (precision=%s)", device, policy, cfg.pretrain.precision)
    vocab = Vocab.load(vocab_path)
    train_x, train_y = read_labeled(labeled, "train")
    dev_x, dev_y = read_labeled(labeled, "dev")
    labels = labels_of(labeled)
    seq = cfg.data.seq_length
    loaded = models.load(encoder_path)
    encoder = models.with_dropout(loaded, cfg.model, vocab.pad_id)
    if encoder is not loaded and not init_classifier:
        log.info(
            "finetune: encoder rebuilt with model.dropout %g (pretrained at dropout %g)",
            cfg.model.dropout,
            float(loaded.get_layer("embeddings_dropout").rate),
        )
    # Real-token attention and pooling make outputs independent of padding: fit lengths to the data.
    # As pretrain's line: a run that reused its pretraining had the shape only in the earlier run's log.
    log.info(
        "finetune: encoder %s; pooling %s, length buckets %s (model.padding_mask=%s)",
        models.describe(cfg.model),
        cfg.pooling(),
        "on" if cfg.length_buckets() else "off",
        cfg.model.padding_mask,
    )
    steps = f.steps_per_epoch or None
    if cfg.length_buckets():
        tokenizer = make_tokenizer(vocab_path, None, cfg.data.lowercase, cfg.data.strip_accents)
        train_ds = bucketed_token_dataset(
            train_x, train_y, tokenizer, f.batch_size, seq, shuffle_seed=cfg.data.seed, count_batches=steps is None
        )
        dev_ds = bucketed_token_dataset(dev_x, dev_y, tokenizer, f.batch_size, seq, count_batches=True)
    else:  # the guide's way; its model depends on how much [PAD] it sees: always pad to seq_length
        tokenizer = make_tokenizer(vocab_path, seq, cfg.data.lowercase, cfg.data.strip_accents)
        train_ds = token_dataset(train_x, train_y, tokenizer, f.batch_size, shuffle_seed=cfg.data.seed)
        dev_ds = token_dataset(dev_x, dev_y, tokenizer, f.batch_size)
    if steps is not None:
        train_ds = train_ds.repeat()

    if init_classifier:
        classifier = models.load(init_classifier)
        width = 1 if len(labels) <= 2 else len(labels)
        if classifier.output_shape[-1] != width:
            raise ValueError(f"{init_classifier}: {classifier.output_shape[-1]} outputs, the label set needs {width}")
    else:
        classifier = models.build_classifier(
            encoder, vocab.pad_id, masked_pooling=cfg.pooling() == "real_tokens", num_classes=len(labels)
        )
    # Bucketed batches are not all full: an epoch has at most one partial batch per bucket width more.
    partial = len(bucket_widths(seq)) if cfg.length_buckets() else 0
    per_epoch = steps or math.ceil(len(train_x) / f.batch_size) + partial
    compile_classifier(classifier, f, total_steps=per_epoch * f.epochs, num_classes=len(labels))
    # The steps fit runs, not per_epoch's bound for the schedule: bucketed sets have counted theirs.
    counted = int(train_ds.cardinality())
    epoch_steps = steps or (counted if counted >= 0 else per_epoch)
    log.info(
        "finetune: %s train examples, %s dev examples, batch %d, %s steps/epoch%s, %s, %s steps in all",
        f"{len(train_x):,}",
        f"{len(dev_x):,}",
        f.batch_size,
        f"{epoch_steps:,}",
        " (finetune.steps_per_epoch)" if steps else "",
        f"{f.epochs} epoch{'s' * (f.epochs != 1)}",
        f"{epoch_steps * f.epochs:,}",
    )
    from encoderflow.train.optim import describe

    log.info("finetune: %s", describe(f))
    t0 = time.monotonic()
    history = classifier.fit(
        train_ds,
        validation_data=dev_ds,
        epochs=f.epochs,
        steps_per_epoch=steps,
        verbose=0,
        shuffle=False,
        callbacks=[
            EpochLogger(
                "finetune",
                f.batch_size,
                LOG_EVERY_SECONDS,
                estimate_steps=ESTIMATE_STEPS,
                nan_fix=f"lower finetune.learning_rate (now {f.learning_rate:g}) or check the input data",
                # As pretraining's: learning_rate=1 ended "success" at loss 7.2, ten times a guess's ln 2.
                loss_ceiling=2 * math.log(max(len(labels), 2)),
            )
        ],
    )
    if f.ema_momentum > 0:
        # fit has written the averages into the weights. Keras (3.15, JAX) leaves each average sharing
        # its buffer with that weight, and evaluate donates the buffer, so saving the EMA optimizer then
        # fails: compile afresh (same loss and metrics, a plain optimizer) to evaluate and save.
        log.info("finetune: ending on the moving average of the weights (ema_momentum %s)", f.ema_momentum)
        compile_classifier(classifier, replace(f, ema_momentum=0.0), total_steps=1, num_classes=len(labels))
    val_loss, bucketed_accuracy = classifier.evaluate(dev_ds, verbose=0)
    if not np.isfinite(val_loss):
        raise NonFiniteLoss(f"finetune: validation loss {val_loss}; the classifier is not saved")
    # The metric of record is the dev split scored as the gate scores every bundle, the champion's
    # too (bundle.Scorer: padded to seq_length, in order); the bucketed evaluate can differ from it
    # in the last bit of a bfloat16 sum, and at max_regression 0 that bit could decide a tie.
    val_accuracy = bundle.Scorer.for_classifier(classifier, vocab_path, cfg, labels).accuracy(dev_x, dev_y)
    if val_accuracy != float(bucketed_accuracy):
        log.info(
            "finetune: dev accuracy %.4f as bundles are scored (the bucketed evaluate measured %.4f)",
            val_accuracy,
            bucketed_accuracy,
        )

    path = bundle.write(out_dir / "bundle", classifier, encoder_path, vocab_path, cfg, val_accuracy, labels)
    result = {
        "key": key,
        "config": keyed,
        "bundle": str(path),
        "val_accuracy": float(val_accuracy),
        "val_loss": float(val_loss),
        "dev_sha256": dev_sha256,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "seconds": round(time.monotonic() - t0, 1),
        "device": device,
        "dtype_policy": policy,
        "code_hash": layout.code_hash(),
    }
    layout.write_json(out_dir / "result.json", result)
    log.info("finetune: dev accuracy %.4f (%d classes); bundle %s", val_accuracy, len(labels), path)
    return result
