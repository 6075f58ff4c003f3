"""Masked-LM pretraining of the encoder from sealed TFRecord shards (Keras 3, JAX backend)."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from encoderflow import layout
from encoderflow.config import Config

log = logging.getLogger(__name__)


def pretrain(cfg: Config, manifest_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train the guide's encoder + tied MLM head; write ``encoder.keras`` atomically.

    An interrupted attempt resumes from ``backup/`` (``keras.callbacks.BackupAndRestore``); a
    finished one with the same inputs and config is reused as is.
    """
    out_dir = Path(out_dir)
    manifest_path = Path(manifest_path)
    key = layout.sha256_json({"model": cfg.to_dict()["model"], "pretrain": cfg.to_dict()["pretrain"],
                              "manifest": layout.sha256_file(manifest_path), "seed": cfg.data.seed})
    if (done := layout.reusable(out_dir / "result.json", key)) is not None and Path(done["encoder"]).exists():
        log.info("pretrain: reusing %s", done["encoder"])
        return done

    from encoderflow.data.shards import load_manifest, make_dataset

    manifest = load_manifest(manifest_path, cfg)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    from encoderflow import model as models
    from encoderflow.train.callbacks import EpochLogger

    p = cfg.pretrain
    keras.utils.set_random_seed(cfg.data.seed)
    pad_id = manifest["special_ids"]["[PAD]"]
    encoder = models.build_encoder(cfg.model, manifest["vocab_size"], manifest["seq_length"], pad_id)
    mlm = models.build_pretraining_model(encoder, manifest["predictions_per_seq"])
    mlm.compile(
        loss="sparse_categorical_crossentropy",
        optimizer=keras.optimizers.AdamW(p.learning_rate),
        weighted_metrics=["sparse_categorical_accuracy"],
        jit_compile=True,
    )
    steps = p.steps_per_epoch or None
    train_ds = make_dataset(manifest_path, cfg, "train", p.batch_size, shuffle=True, repeat=steps is not None)
    val_ds = make_dataset(manifest_path, cfg, "valid", p.batch_size, shuffle=False)
    if p.validation_steps:
        val_ds = val_ds.take(p.validation_steps)
    log.info("pretrain: %d parameters, %d train records (%s), batch %d, %d epochs, %s steps/epoch", mlm.count_params(),
             manifest["totals"]["train"]["records"], manifest_path, p.batch_size, p.epochs, steps or "all")

    backup = out_dir / "backup"
    t0 = time.monotonic()
    history = mlm.fit(
        train_ds, validation_data=val_ds, epochs=p.epochs, steps_per_epoch=steps,
        verbose=0, shuffle=False,
        callbacks=[keras.callbacks.BackupAndRestore(str(backup), save_freq="epoch", delete_checkpoint=True),
                   EpochLogger("pretrain", p.batch_size)],
    )
    hist = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    final_loss = hist.get("loss", [float("nan")])[-1]
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
        "history": hist,
        "seconds": round(time.monotonic() - t0, 1),
    }
    layout.write_json(out_dir / "result.json", result)
    log.info("pretrain: wrote %s (%s bytes, sha256 %s); val MLM accuracy %.4f", encoder_path,
             f"{encoder_path.stat().st_size:,}", result["encoder_sha256"], result["val_mlm_accuracy"])
    return result
