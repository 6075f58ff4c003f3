"""A NaN loss stops training with a clear, expected error (the DAG fails the task; nothing is promoted)."""

from __future__ import annotations

import logging

import numpy as np
import pytest


def _clocked(monkeypatch, times: list[float], label: str, params: dict, **kwargs):
    """An EpochLogger driven by a clock reading ``times`` in turn, with fit's ``params``, in its first epoch."""
    from encoderflow.train import callbacks

    clock = iter(times)
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    logger = callbacks.EpochLogger(label, 4, **kwargs)
    logger.params = params
    logger.on_train_begin()
    logger.on_epoch_begin(0)
    return logger


def test_nan_loss_raises_non_finite_loss(caplog):
    import keras

    from encoderflow.errors import EncoderflowError
    from encoderflow.train.callbacks import EpochLogger, NonFiniteLoss

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    x = np.ones((8, 2), "float32")
    y = np.full((8, 1), np.nan, "float32")  # the loss is NaN from the first batch
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 1") as info:
        model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[EpochLogger("pretrain", 4)])
    assert isinstance(info.value, EncoderflowError)  # the DAG maps this to a failed task, no retry


def test_a_nan_error_says_where_the_loss_was_last_finite_and_the_fix_it_was_given():
    import keras

    from encoderflow.train.callbacks import EpochLogger, NonFiniteLoss

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    x = np.ones((16, 2), "float32")
    y = np.zeros((16, 1), "float32")
    y[8:] = np.nan  # batches 3 and 4 of 4: the loss is finite for two steps, then NaN
    fix = "lower pretrain.learning_rate (now 0.5) or check the input data"
    logger = EpochLogger("pretrain", 4, log_every_seconds=0, nan_fix=fix)
    with pytest.raises(NonFiniteLoss) as info:
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[logger])
    message = str(info.value)
    assert message.startswith("pretrain: loss became nan at step 3 of epoch 1 (last read finite: ")
    assert "at step 2 of epoch 1)" in message and message.endswith("; " + fix)


def test_epoch_lines_are_plain_and_complete(caplog):
    import keras

    from encoderflow.train.callbacks import EpochLogger

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd", metrics=["mae"])
    x, y = np.ones((8, 2), "float32"), np.zeros((8, 1), "float32")
    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        model.fit(
            x, y, batch_size=4, epochs=2, verbose=0, validation_data=(x, y), callbacks=[EpochLogger("finetune", 4)]
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "encoderflow.train"]
    assert len(lines) == 2
    assert lines[0].startswith("finetune epoch 1/2: ") and lines[1].startswith("finetune epoch 2/2: ")
    for key in ("loss=", "val_loss=", "mae=", "steps=2", "seq/s=", "val_s=", "elapsed_s="):
        assert key in lines[1]
    assert not any("\r" in line for line in lines)


def test_a_finite_loss_far_above_guessing_is_called_diverging(caplog):
    """A learning rate of 1.0 in float32 ended epochs at loss 62 and 81 (a uniform guess over BERT's
    vocabulary scores 10.3): finite, so no error, and the run would have read as a success."""
    import keras

    from encoderflow.train.callbacks import EpochLogger

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    x, y = np.ones((8, 2), "float32"), np.full((8, 1), 30.0, "float32")  # mse ~900 from the start
    fix = "lower pretrain.learning_rate (now 1) or check the input data"
    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        model.fit(
            x,
            y,
            batch_size=4,
            epochs=1,
            verbose=0,
            callbacks=[EpochLogger("pretrain", 4, nan_fix=fix, loss_ceiling=20.6)],
        )
        model.fit(x, y * 0, batch_size=4, epochs=1, verbose=0, callbacks=[EpochLogger("pretrain", 4, nan_fix=fix)])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # the second fit has no ceiling
    assert warnings[0].startswith("pretrain: epoch 1 loss ") and "is above 20.60" in warnings[0]
    assert warnings[0].endswith("training is diverging; " + fix)


def test_the_epoch_rate_is_training_alone_after_the_compiling_call(monkeypatch, caplog):
    """Driven by a clock: the first call (2 steps) takes 10 s (compiling), the next 2 steps 2 s, then
    validation 3 s. seq/s is 2 steps x 4 / 2 s, not 4 steps x 4 / 15 s."""
    logger = _clocked(
        monkeypatch,
        [0.0, 0.0, 10.0, 10.0, 12.0, 12.0, 15.0],
        "pretrain",
        {"epochs": 1, "steps": 4},
        log_every_seconds=1e9,
    )
    logs = {"loss": 5.0}
    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        logger.on_train_batch_end(1, logs)  # steps 1-2: one call
        logger.on_train_batch_end(3, logs)  # steps 3-4
        logger.on_test_begin()
        logger.on_epoch_end(0, logs)
    [line] = [r.getMessage() for r in caplog.records if "epoch 1/1" in r.getMessage()]
    assert "steps=4 seq/s=4 val_s=3.0 epoch_s=15.0 elapsed_s=15.0" in line, line


def test_the_progress_line_rate_and_eta_leave_the_compiling_call_out(monkeypatch, caplog):
    """Driven by a clock: the first call (2 steps) takes 10 s (compiling), the next 2 steps 2 s. The
    progress line says 2 steps x 4 / 2 s = 4 seq/s, and the 4 steps left of 2 epochs x 4 take 4 s at
    that rate (the run's average, compiling in it, said 1 seq/s and 12 s)."""
    logger = _clocked(
        monkeypatch, [0.0, 0.0, 10.0, 10.0, 12.0], "pretrain", {"epochs": 2, "steps": 4}, log_every_seconds=0
    )
    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        logger.on_train_batch_end(1, {"loss": 5.0})  # steps 1-2: the compiling call
        logger.on_train_batch_end(3, {"loss": 4.0})  # steps 3-4
    [line] = [r.getMessage() for r in caplog.records if "progress" in r.getMessage()]
    assert line == "pretrain progress: epoch step 4/4 loss=4.0000 seq/s=4 eta=4.0s", line


def test_a_resumed_fit_estimates_the_steps_it_runs_not_all_of_them(caplog):
    """Resumed at epoch 4 of 30, pretraining estimated the time of 1500 steps where 1300 were left."""
    import keras

    from encoderflow.train.callbacks import EpochLogger

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    x, y = np.ones((16, 2), "float32"), np.zeros((16, 1), "float32")  # 4 steps an epoch at batch 4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        logger = EpochLogger("pretrain", 4, estimate_steps=2)
        model.fit(x, y, batch_size=4, epochs=5, initial_epoch=3, verbose=0, callbacks=[logger])
    [estimate] = [r.getMessage() for r in caplog.records if "estimated training time" in r.getMessage()]
    assert estimate.endswith("for 8 steps (+ validation)"), estimate  # epochs 4 and 5, not all 5


def test_the_estimate_times_steps_in_which_nothing_compiled(monkeypatch, caplog):
    """Fine-tuning compiles a step per length-bucket width during its first steps: its estimate read
    1,254 ms/step where training ran at ~100. Driven by a clock: the first call (1 step) compiles; the
    next 4 steps take 10 s, in which JAX reports 8 s of compiling another width (its monitoring events):
    left out; the 4 after take 2 s: 500 ms/step."""
    import jax.monitoring

    logger = _clocked(
        monkeypatch,
        [0.0, 0.0, 5.0, 5.0, 15.0, 15.0, 17.0, 17.0],
        "finetune",
        {"epochs": 1, "steps": 10},
        log_every_seconds=1e9,
        estimate_steps=4,
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        logger.on_train_batch_end(0, {"loss": 5.0})  # the compiling first call
        jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", 7.5)
        jax.monitoring.record_event_duration_secs("/jax/core/compile/jaxpr_trace_duration", 0.5)
        jax.monitoring.record_event_duration_secs("/jax/other/event", 3.0)  # not compiling
        logger.on_train_batch_end(4, {"loss": 4.0})  # steps 2-5: compiled another shape
        assert logger.step_seconds is None
        logger.on_train_batch_end(8, {"loss": 3.0})  # steps 6-9
        logger.on_train_end()
    jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", 1.0)
    assert logger.compiling == 8.0  # unregistered at the end of training
    assert [r.getMessage() for r in caplog.records] == [
        "finetune: 500.0 ms/step measured over 4 steps (after 4 in which JAX compiled other shapes); estimated "
        "training time 5.0s for 10 steps (+ validation, + compiling each batch shape met for the first time "
        "(8.0s compiling so far))"
    ]


def test_half_written_backups_a_killed_try_left_are_deleted_unless_a_writer_is_alive(tmp_path, caplog):
    """kill -9 mid-backup left a 12 MB `.step-...weights.h5` temp in the run folder for good."""
    from encoderflow import layout
    from encoderflow.train.callbacks import StepBackup

    backup = tmp_path / "backup"
    backup.mkdir()
    dead = backup / ".step-000000000120.weights.h5.ohi09fy0.weights.h5"
    dead.write_bytes(b"half")
    kept = backup / "KEY"  # what is no temp stays
    kept.write_bytes(b"k" * 64)
    with layout.writing_in(backup):  # a writer alive in the folder: its temp may be that one
        StepBackup(backup, 10)
        assert dead.exists()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        StepBackup(backup, 10)
    assert not dead.exists() and kept.read_bytes() == b"k" * 64
    assert f"pretrain: deleted 1 half-written backup(s) a killed try left in {backup}" in caplog.messages


def test_the_pipeline_s_callbacks_leave_fit_s_thread_free_of_reading_each_call_s_logs(tmp_path):
    """A callback overriding on_train_batch_end that is not ``async_safe`` makes Keras read every call's
    logs (a wait for the device) on fit's thread before it dispatches the next call: EpochLogger and
    StepBackup did, so each call into the compiled step waited for the previous one to finish. With them,
    Keras now runs batch ends on threads of its own, as with no callback at all."""
    import threading

    import keras

    from encoderflow.train.callbacks import EpochLogger, StepBackup

    class Where(keras.callbacks.Callback):
        async_safe = True

        def __init__(self):
            super().__init__()
            self.threads = []

        def on_train_batch_end(self, batch, logs=None):
            self.threads.append(threading.current_thread() is threading.main_thread())

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd", steps_per_execution=2)
    x, y = np.ones((32, 2), "float32"), np.zeros((32, 1), "float32")
    where = Where()
    pipeline = [
        keras.callbacks.CSVLogger(str(tmp_path / "history.csv")),
        StepBackup(tmp_path / "backup", 8, every_steps=4),
        EpochLogger("pretrain", 4, log_every_seconds=0, estimate_steps=2),
        where,
    ]
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False, callbacks=pipeline)
    assert where.threads == [False] * 8  # 2 epochs of 4 calls, none on fit's thread
    assert sorted(f.name for f in (tmp_path / "backup").glob("*.h5")) == ["step-000000000016.weights.h5"]


def test_batch_ends_keras_runs_out_of_order_are_taken_in_the_order_the_calls_ran(caplog):
    """Keras runs async-safe batch ends on a pool of threads: a later call's may come first."""
    import threading

    from encoderflow.train.callbacks import EpochLogger

    logger = EpochLogger("pretrain", 4, log_every_seconds=0)
    logger.params = {"epochs": 1, "steps": 4}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        logger.on_train_begin()
        logger.on_epoch_begin(0)
        logger.on_train_batch_begin(0)
        logger.on_train_batch_begin(2)
        later = threading.Thread(target=logger.on_train_batch_end, args=(3, {"loss": 4.0}))
        later.start()  # steps 3-4 end first, and wait for steps 1-2
        later.join(0.5)
        assert later.is_alive() and logger.steps_seen == 0
        logger.on_train_batch_end(1, {"loss": 5.0})
        later.join(60)
        logger.on_train_end()
    # The first call's loss is the first loss (no progress line for it); the second's line follows it.
    assert [m.split(" seq/s")[0] for m in caplog.messages if "progress" in m] == [
        "pretrain progress: epoch step 4/4 loss=4.0000"
    ]
    assert logger.first_loss == 5.0 and logger.steps_seen == 4 and not logger.calls
    # A call a failed fit began and never ended holds up no later epoch (each would wait for its turn).
    logger.on_train_batch_begin(4)
    logger.on_epoch_begin(1)
    logger.on_train_batch_begin(0)
    logger.on_train_batch_end(1, {"loss": 3.0})
    assert not logger.calls and logger.epoch_steps == 2


def test_the_estimate_says_how_many_steps_it_timed_in_whole_calls(monkeypatch, caplog):
    """With 4 steps per call, an estimate over 10 steps times 3 calls (12 steps): it said "10"."""
    logger = _clocked(
        monkeypatch,
        [0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 7.0, 7.0],
        "pretrain",
        {"epochs": 1, "steps": 16},
        log_every_seconds=1e9,
        estimate_steps=10,
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        for last in (3, 7, 11, 15):
            logger.on_train_batch_end(last, {"loss": 5.0})
        logger.on_train_end()
    assert logger.timed_steps == 12
    assert caplog.messages == [
        "pretrain: 500.0 ms/step measured over 12 steps; estimated training time 8.0s for 16 steps (+ validation)"
    ]


def test_a_fit_that_raises_leaves_nothing_holding_its_logger():
    """Keras skips on_train_end when fit raises: the logger's jax.monitoring listener stayed registered,
    holding the logger and its model for the life of the process (three NaN fits, three listeners)."""
    import gc
    import weakref

    import keras

    from encoderflow.train.callbacks import EpochLogger, NonFiniteLoss

    def failed_fit() -> weakref.ref:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(loss="mse", optimizer="sgd")
        logger = EpochLogger("pretrain", 4)
        x, y = np.ones((8, 2), "float32"), np.full((8, 1), np.nan, "float32")
        try:
            model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[logger])
        except NonFiniteLoss:
            pass
        return weakref.ref(logger)

    gone = [failed_fit() for _ in range(3)]
    gc.collect()
    assert [ref() for ref in gone] == [None, None, None]


def test_validation_is_timed_from_the_end_of_training_not_from_fit_s_dispatch():
    """fit reaches validation once it has dispatched the epoch's last calls; their batch ends come later, on
    Keras's threads. val_t0 was stamped then: training's last seconds counted as validation's, and the epoch
    line's seq/s read 378 where the progress lines read ~150."""
    import threading
    import time

    from encoderflow.train.callbacks import EpochLogger

    logger = EpochLogger("pretrain", 4, log_every_seconds=1e9)
    logger.params = {"epochs": 1, "steps": 2}
    logger.on_train_begin()
    logger.on_epoch_begin(0)
    logger.on_train_batch_begin(0)
    ended = []

    def late_end():  # the device finishes the last call 0.5 s after fit dispatched it
        time.sleep(0.5)
        ended.append(time.monotonic())
        logger.on_train_batch_end(1, {"loss": 1.0})

    worker = threading.Thread(target=late_end)
    worker.start()
    logger.on_test_begin()
    worker.join(60)
    logger.on_train_end()
    assert ended and logger.val_t0 >= ended[0]


def test_a_mid_epoch_resume_estimates_the_steps_it_trains(caplog):
    """Resumed at step 105 of 200 (2 epochs), the estimate said 400 steps where 296 were left, and the
    last progress line an ETA of 14 s as training ended."""
    from encoderflow.train.callbacks import EpochLogger

    logger = EpochLogger("pretrain", 4, resumed_steps=104)
    logger.params = {"epochs": 2, "steps": 200}
    logger.on_epoch_begin(0)
    assert logger.total_steps() == 296
