"""SST-2 fine-tuning of the pretrained encoder into a model bundle (``encoderflow.bundle``)."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from encoderflow import bundle, layout, runtime
from encoderflow.config import Config
from encoderflow.results import SST2_DEV, SST2_TRAIN, file_path

log = logging.getLogger(__name__)


def compile_classifier(classifier, f, total_steps: int) -> None:
    """The guide's fine-tuning compile: AdamW, binary cross-entropy, accuracy.

    Args:
        classifier: the model from :func:`encoderflow.model.build_classifier`.
        f: the ``finetune`` config section.
        total_steps: optimizer steps of the whole fine-tuning (a ``warmup_cosine`` schedule spans them).
    """
    from encoderflow.train.optim import adamw

    classifier.compile(
        loss="binary_crossentropy",
        optimizer=adamw(f, total_steps),
        metrics=["accuracy"],
        jit_compile=True,
    )


def finetune(
    cfg: Config,
    encoder_path: str | os.PathLike,
    sst2: dict[str, Any],
    vocab_path: str | os.PathLike,
    out_dir: str | os.PathLike,
) -> dict[str, Any]:
    """Encoder + pooled sigmoid classifier on SST-2 train; dev accuracy; a model bundle.

    Reuses the result of an earlier call with the same inputs and config.

    Args:
        cfg: the run's config (``model``, ``finetune``, ``data`` settings).
        encoder_path: the pretrained ``encoder.keras``.
        sst2: the SST-2 dataset record: ``content_hash`` and ``files`` with ``SST-2/train.tsv``
            and ``SST-2/dev.tsv``.
        vocab_path: the WordPiece vocabulary the encoder was pretrained with.
        out_dir: where ``bundle/`` and ``result.json`` go.

    Returns:
        ``result.json``'s content: ``bundle`` (its folder), ``val_accuracy``, ``val_loss``, ``history``, ...

    Raises:
        NonFiniteLoss: the validation loss is NaN or infinite; no bundle is written.
    """
    out_dir = Path(out_dir)
    key = layout.sha256_json(
        {
            "model": cfg.to_dict()["model"],
            "finetune": cfg.to_dict()["finetune"],
            "encoder": layout.sha256_file(encoder_path),
            "sst2": sst2["content_hash"],
            "vocab": layout.sha256_file(vocab_path),
            "seq": cfg.data.seq_length,
        }
    )
    if (done := layout.reusable(out_dir / "result.json", key)) is not None and Path(done["bundle"]).exists():
        log.info("finetune: reusing %s", done["bundle"])
        return done

    from encoderflow.data.sst2 import bucket_widths, bucketed_token_dataset, read_split, token_dataset
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
    train_x, train_y = read_split(file_path(sst2, SST2_TRAIN))
    dev_x, dev_y = read_split(file_path(sst2, SST2_DEV))
    seq = cfg.data.seq_length
    encoder = models.with_dropout(models.load(encoder_path), cfg.model, vocab.pad_id)
    # Real-token attention and pooling make outputs independent of padding: fit lengths to the data.
    log.info(
        "finetune: pooling %s, length buckets %s (model.padding_mask=%s)",
        cfg.pooling(),
        "on" if cfg.length_buckets() else "off",
        cfg.model.padding_mask,
    )
    if cfg.length_buckets():
        tokenizer = make_tokenizer(vocab_path, None, cfg.data.lowercase, cfg.data.strip_accents)
        train_ds = bucketed_token_dataset(train_x, train_y, tokenizer, f.batch_size, seq, shuffle_seed=cfg.data.seed)
        dev_ds = bucketed_token_dataset(dev_x, dev_y, tokenizer, f.batch_size, seq, count_batches=True)
    else:  # the guide's way; its model depends on how much [PAD] it sees: always pad to seq_length
        tokenizer = make_tokenizer(vocab_path, seq, cfg.data.lowercase, cfg.data.strip_accents)
        train_ds = token_dataset(train_x, train_y, tokenizer, f.batch_size, shuffle_seed=cfg.data.seed)
        dev_ds = token_dataset(dev_x, dev_y, tokenizer, f.batch_size)
    steps = f.steps_per_epoch or None
    if steps is not None:
        train_ds = train_ds.repeat()

    classifier = models.build_classifier(encoder, vocab.pad_id, masked_pooling=cfg.pooling() == "real_tokens")
    # Bucketed batches are not all full: an epoch has at most one partial batch per bucket width more.
    partial = len(bucket_widths(seq)) if cfg.length_buckets() else 0
    per_epoch = steps or math.ceil(len(train_x) / f.batch_size) + partial
    compile_classifier(classifier, f, total_steps=per_epoch * f.epochs)
    t0 = time.monotonic()
    history = classifier.fit(
        train_ds,
        validation_data=dev_ds,
        epochs=f.epochs,
        steps_per_epoch=steps,
        verbose=0,
        shuffle=False,
        callbacks=[EpochLogger("finetune", f.batch_size)],
    )
    val_loss, val_accuracy = classifier.evaluate(dev_ds, verbose=0)
    if not np.isfinite(val_loss):
        raise NonFiniteLoss(f"finetune: validation loss {val_loss}; the classifier is not saved")

    path = bundle.write(out_dir / "bundle", classifier, encoder_path, vocab_path, cfg, val_accuracy)
    result = {
        "key": key,
        "bundle": str(path),
        "val_accuracy": float(val_accuracy),
        "val_loss": float(val_loss),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "seconds": round(time.monotonic() - t0, 1),
        "device": device,
        "dtype_policy": policy,
    }
    layout.write_json(out_dir / "result.json", result)
    log.info("finetune: SST-2 dev accuracy %.4f; bundle %s", val_accuracy, path)
    return result
