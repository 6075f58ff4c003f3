"""SST-2 fine-tuning of the pretrained encoder, and evaluation of a saved model bundle.

A bundle is a folder with everything needed to score sentences: ``classifier.keras``,
``encoder.keras``, ``vocab.txt`` and ``bundle.json`` (config, tokenizer settings, hashes).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from encoderflow import layout
from encoderflow.config import Config

log = logging.getLogger(__name__)


def finetune(cfg: Config, encoder_path: str | os.PathLike, sst2: dict[str, Any], vocab_path: str | os.PathLike,
             out_dir: str | os.PathLike) -> dict[str, Any]:
    """Encoder + pooled sigmoid classifier on SST-2 train; dev accuracy; a model bundle."""
    out_dir = Path(out_dir)
    key = layout.sha256_json({"model": cfg.to_dict()["model"], "finetune": cfg.to_dict()["finetune"],
                              "encoder": layout.sha256_file(encoder_path), "sst2": sst2["content_hash"],
                              "vocab": layout.sha256_file(vocab_path), "seq": cfg.data.seq_length})
    if (done := layout.reusable(out_dir / "result.json", key)) is not None and Path(done["bundle"]).exists():
        log.info("finetune: reusing %s", done["bundle"])
        return done

    from encoderflow.data.sst2 import bucketed_token_dataset, read_split, token_dataset
    from encoderflow.data.tokenizer import Vocab, make_tokenizer

    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    from encoderflow import model as models
    from encoderflow.train.callbacks import EpochLogger, NonFiniteLoss

    from encoderflow.train.pretrain import dtype_policy

    f = cfg.finetune
    keras.utils.set_random_seed(cfg.data.seed)
    # Set, not inherited: dag.test runs every task in one process, where the policy is global.
    keras.config.set_dtype_policy(dtype_policy(cfg.pretrain.precision))
    vocab = Vocab.load(vocab_path)
    train_x, train_y = read_split(sst2["files"]["SST-2/train.tsv"]["path"])
    dev_x, dev_y = read_split(sst2["files"]["SST-2/dev.tsv"]["path"])
    seq = cfg.data.seq_length
    encoder = models.load(encoder_path)
    # Encoders saved with a fixed input length (older artifacts, the guide's) take full-length input.
    if cfg.model.padding_mask and encoder.input_shape[1] is None:
        # Real-token attention and pooling make outputs independent of padding: fit lengths to the data.
        tokenizer = make_tokenizer(vocab_path, None, cfg.data.lowercase, cfg.data.strip_accents)
        train_ds = bucketed_token_dataset(train_x, train_y, tokenizer, f.batch_size, seq, shuffle_seed=cfg.data.seed)
        dev_ds = bucketed_token_dataset(dev_x, dev_y, tokenizer, f.batch_size, seq, count_batches=True)
    else:  # the guide's model depends on how much [PAD] it sees: always pad to seq_length
        tokenizer = make_tokenizer(vocab_path, seq, cfg.data.lowercase, cfg.data.strip_accents)
        train_ds = token_dataset(train_x, train_y, tokenizer, f.batch_size, shuffle_seed=cfg.data.seed)
        dev_ds = token_dataset(dev_x, dev_y, tokenizer, f.batch_size)
    steps = f.steps_per_epoch or None
    if steps is not None:
        train_ds = train_ds.repeat()

    classifier = models.build_classifier(encoder, vocab.pad_id, masked_pooling=cfg.model.padding_mask)
    classifier.compile(loss="binary_crossentropy", optimizer=keras.optimizers.AdamW(f.learning_rate),
                       metrics=["accuracy"], jit_compile=True)
    t0 = time.monotonic()
    history = classifier.fit(train_ds, validation_data=dev_ds, epochs=f.epochs, steps_per_epoch=steps, verbose=0, shuffle=False,
                             callbacks=[EpochLogger("finetune", f.batch_size)])
    val_loss, val_accuracy = classifier.evaluate(dev_ds, verbose=0)
    if not np.isfinite(val_loss):
        raise NonFiniteLoss(f"finetune: validation loss {val_loss}; the classifier is not saved")

    bundle = out_dir / "bundle"
    tmp = out_dir / f".bundle-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    classifier.save(tmp / "classifier.keras")
    shutil.copyfile(encoder_path, tmp / "encoder.keras")
    shutil.copyfile(vocab_path, tmp / "vocab.txt")
    layout.write_json(tmp / "bundle.json", {
        "config": cfg.to_dict(),
        "seq_length": cfg.data.seq_length,
        "lowercase": cfg.data.lowercase,
        "strip_accents": cfg.data.strip_accents,
        "vocab_size": vocab.size,
        "pad_id": vocab.pad_id,
        "val_accuracy": float(val_accuracy),
        "files": {p.name: layout.sha256_file(p) for p in sorted(tmp.glob("*.keras")) + [tmp / "vocab.txt"]},
    })
    if bundle.exists():
        shutil.rmtree(bundle)
    os.replace(tmp, bundle)

    result = {
        "key": key,
        "bundle": str(bundle),
        "val_accuracy": float(val_accuracy),
        "val_loss": float(val_loss),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "seconds": round(time.monotonic() - t0, 1),
    }
    layout.write_json(out_dir / "result.json", result)
    log.info("finetune: SST-2 dev accuracy %.4f; bundle %s", val_accuracy, bundle)
    return result


class Scorer:
    """Score sentences with a saved bundle (its own tokenizer settings, Keras safe mode)."""

    def __init__(self, bundle_dir: str | os.PathLike):
        from encoderflow.data.tokenizer import make_tokenizer

        os.environ.setdefault("KERAS_BACKEND", "jax")
        from encoderflow import model as models

        self.bundle_dir = Path(bundle_dir)
        meta_path = self.bundle_dir / "bundle.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: not a model bundle (no bundle.json)")
        self.meta = layout.read_json(meta_path)
        self.tokenizer = make_tokenizer(self.bundle_dir / "vocab.txt", self.meta["seq_length"],
                                        self.meta["lowercase"], self.meta["strip_accents"])
        self.classifier = models.load(self.bundle_dir / "classifier.keras")

    def probabilities(self, sentences: list[str], batch_size: int = 256) -> np.ndarray:
        from encoderflow.data.tokenizer import tokenize

        out = []
        for i in range(0, len(sentences), batch_size):
            ids = tokenize(self.tokenizer, sentences[i:i + batch_size])
            out.append(np.asarray(self.classifier.predict(ids, verbose=0)).reshape(-1))
        return np.concatenate(out) if out else np.zeros((0,), dtype=np.float32)

    def accuracy(self, sentences: list[str], labels: np.ndarray) -> float:
        probs = self.probabilities(sentences)
        return float(np.mean((probs >= 0.5).astype(np.int32) == np.asarray(labels)))
