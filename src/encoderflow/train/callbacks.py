"""Training callbacks shared by the baseline, pretraining and fine-tuning loops."""

from __future__ import annotations

import logging
import math
import time

import keras

from encoderflow.errors import EncoderflowError

log = logging.getLogger("encoderflow.train")


class NonFiniteLoss(EncoderflowError):
    """Training produced a NaN or infinite loss; nothing from this run may be promoted."""


class EpochLogger(keras.callbacks.Callback):
    """One plain log line per epoch (no progress bars in task logs), and a NaN guard.

    Args:
        label: what is training (``pretrain``, ``finetune``, ``baseline``).
        examples_per_step: batch size, to report sequences per second.
    """

    def __init__(self, label: str, examples_per_step: int):
        super().__init__()
        self.label, self.examples_per_step = label, examples_per_step
        self._t0 = self._epoch_t0 = 0.0
        self._steps = 0

    def on_train_begin(self, logs=None):
        self._t0 = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_t0 = time.monotonic()
        self._steps = 0

    first_loss: float | None = None

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        loss = (logs or {}).get("loss")
        if self.first_loss is None and loss is not None:
            self.first_loss = float(loss)
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True
            raise NonFiniteLoss(f"{self.label}: loss became {float(loss)} at step {self._steps}; "
                                "lower the learning rate or check the input data")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = time.monotonic() - self._epoch_t0
        rate = self._steps * self.examples_per_step / seconds if seconds > 0 else float("nan")
        metrics = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(logs.items()) if _is_number(v))
        total = self.params.get("epochs") if self.params else "?"
        log.info("%s epoch %d/%s: %s steps=%d seq/s=%.0f epoch_s=%.1f elapsed_s=%.1f", self.label, epoch + 1,
                 total, metrics, self._steps, rate, seconds, time.monotonic() - self._t0)


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
