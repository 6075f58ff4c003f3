"""Per-epoch copies: epoch e trains on copy e % dupe_factor, fresh or resumed."""

from __future__ import annotations

import os

import numpy as np
import pytest

from encoderflow.data import shards
from encoderflow.train import pretrain
from tests.data.test_shards import _build_all, _cfg, _read, _unmask, _write_corpus

BATCH = 8  # 30 train records per copy: 4 batches, the last one partial


@pytest.fixture(scope="module")
def duped(tmp_path_factory):
    corpus = _write_corpus(tmp_path_factory.mktemp("corpus"))
    cfg = _cfg(dupe_factor=2)
    p, _, sealed = _build_all(cfg, corpus, tmp_path_factory.mktemp("home"))
    copies = {}
    for c in (0, 1):
        recs = [_read(s["file"]) for s in p["shards"] if s["split"] == "train" and s["copy"] == c]
        copies[c] = {k: np.concatenate([r[k] for r in recs]) for k in recs[0]}
    return {"cfg": cfg, "manifest": sealed["manifest"], "copies": copies}


def _run_cfg(duped, **pretrain_kw):
    from encoderflow.config import from_overrides
    from tests.data.test_shards import SMOKE

    over = {**SMOKE, "data.dupe_factor": 2, "pretrain.batch_size": BATCH}
    over.update({f"pretrain.{k}": v for k, v in pretrain_kw.items()})
    return from_overrides("smoke", over)


def _rows(batches):
    """Each record as (masked token ids, mask positions): what tells two copies apart."""
    batches = list(batches)
    ids = np.concatenate([f["token_ids"].numpy() for f, _, _ in batches])
    pos = np.concatenate([f["mask_positions"].numpy() for f, _, _ in batches])
    return [tuple(a.tolist()) + tuple(b.tolist()) for a, b in zip(ids, pos)]


def _copy_rows(duped, c):
    rec = duped["copies"][c]
    return [tuple(a.tolist()) + tuple(b.tolist()) for a, b in zip(rec["token_ids"], rec["mask_positions"])]


def test_copies_hold_the_same_tokens_with_different_masks(duped):
    c0, c1 = duped["copies"][0], duped["copies"][1]
    np.testing.assert_array_equal(_unmask(c0), _unmask(c1))
    assert not np.array_equal(c0["token_ids"], c1["token_ids"])


def test_make_dataset_epoch_serves_one_copy(duped):
    cfg, manifest = duped["cfg"], duped["manifest"]
    for epoch, copy in ((0, 0), (1, 1), (2, 0), (3, 1)):
        got = _rows(shards.make_dataset(manifest, cfg, "train", BATCH, epoch=epoch))
        assert sorted(got) == sorted(_copy_rows(duped, copy)), epoch
    # Epochs 0 and 2 share a copy but not an order; each order is reproducible.
    e0 = _rows(shards.make_dataset(manifest, cfg, "train", BATCH, epoch=0))
    e2 = _rows(shards.make_dataset(manifest, cfg, "train", BATCH, epoch=2))
    assert e0 != e2
    assert e0 == _rows(shards.make_dataset(manifest, cfg, "train", BATCH, epoch=0))
    # Without an epoch, both copies at once (validation, and the old behaviour).
    both = _rows(shards.make_dataset(manifest, cfg, "train", BATCH))
    assert sorted(both) == sorted(_copy_rows(duped, 0) + _copy_rows(duped, 1))


def test_train_batches_line_epoch_boundaries_up_with_copies(duped):
    cfg = _run_cfg(duped, epochs=3, steps_per_epoch=0)
    ds, steps = pretrain.train_batches(duped["manifest"], cfg)
    assert steps == 4
    batches = list(ds)
    assert len(batches) == 12 and int(ds.cardinality()) == 12
    for epoch in range(3):
        got = _rows(batches[epoch * steps:(epoch + 1) * steps])
        assert sorted(got) == sorted(_copy_rows(duped, epoch % 2)), epoch
    # Resuming at epoch 1 serves exactly what a fresh run served from epoch 1 on.
    resumed, _ = pretrain.train_batches(duped["manifest"], cfg, initial_epoch=1)
    assert _rows(list(resumed)) == _rows(batches[steps:])


def test_train_batches_with_a_step_cap_repeats_within_the_copy(duped):
    cfg = _run_cfg(duped, epochs=2, steps_per_epoch=6)  # 48 > 30 records: wraps inside the copy
    ds, steps = pretrain.train_batches(duped["manifest"], cfg)
    batches = list(ds)
    assert steps == 6 and len(batches) == 12
    assert all(int(f["token_ids"].shape[0]) == BATCH for f, _, _ in batches)
    for epoch in range(2):
        got = set(_rows(batches[epoch * steps:(epoch + 1) * steps]))
        assert got == set(_copy_rows(duped, epoch)), epoch


def test_resume_epoch_reads_what_backup_and_restore_saved(tmp_path):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    class Stop(Exception):
        pass

    class StopAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise Stop()

    x, y = np.ones((8, 2), "float32"), np.zeros((8, 1), "float32")

    def model():
        m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        m.compile(loss="mse", optimizer="sgd")
        return m

    backup = tmp_path / "backup"
    assert pretrain.resume_epoch(backup) == 0
    with pytest.raises(Stop):
        model().fit(x, y, epochs=4, verbose=0, callbacks=[
            keras.callbacks.BackupAndRestore(str(backup), save_freq="epoch"), StopAfter()])
    assert pretrain.resume_epoch(backup) == 2
    # Resumed with the data built from that epoch: the guard lets it through, and Keras runs 2 and 3.
    seen = []
    log = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    model().fit(x, y, epochs=4, initial_epoch=2, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(str(backup), save_freq="epoch"), pretrain.epoch_guard(2), log])
    assert seen == [2, 3]
    # A dataset built for the wrong epoch is refused before a single step trains on it.
    with pytest.raises(RuntimeError, match="started at epoch 0 but the data was built from epoch 2"):
        model().fit(x, y, epochs=4, verbose=0, callbacks=[pretrain.epoch_guard(2)])


def test_pretrain_resumes_on_the_copy_of_the_interrupted_epoch(duped, tmp_path, monkeypatch, caplog):
    import logging

    from encoderflow.train import callbacks

    class Killed(Exception):
        pass

    class DiesAfterFirstEpoch(callbacks.EpochLogger):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            raise Killed()

    cfg = _run_cfg(duped, epochs=3, steps_per_epoch=2, validation_steps=1)
    out = tmp_path / "pretrain"
    with monkeypatch.context() as mp:
        mp.setattr(callbacks, "EpochLogger", DiesAfterFirstEpoch)
        with pytest.raises(Killed):
            pretrain.pretrain(cfg, duped["manifest"], out)
    # BackupAndRestore (first in the list) saved epoch 0 before the logger died.
    assert pretrain.resume_epoch(out / "backup") == 1
    with caplog.at_level(logging.INFO, logger="encoderflow.train.pretrain"):
        result = pretrain.pretrain(cfg, duped["manifest"], out)
    assert "3 epochs from epoch 1" in caplog.text
    # The recorded history spans both attempts: epoch 0 from the first, epochs 1-2 from the resume.
    assert len(result["history"]["loss"]) == 3 and np.isfinite(result["loss"])
    assert not (out / "backup").exists()


def test_pretrain_killed_mid_epoch_resumes_at_the_next_step_and_matches_an_uninterrupted_run(
        duped, tmp_path, monkeypatch, caplog):
    """Backups every step: a run killed at step 2 of epoch 2 resumes at step 3 and ends with the
    weights of a run never killed (no batch skipped, none trained twice)."""
    import logging

    from encoderflow import model as models
    from encoderflow.config import from_overrides
    from encoderflow.train import callbacks
    from tests.data.test_shards import SMOKE

    cfg = from_overrides("smoke", {**SMOKE, "data.dupe_factor": 2, "pretrain.batch_size": BATCH,
                                   "pretrain.epochs": 3, "pretrain.steps_per_epoch": 0, "pretrain.validation_steps": 1,
                                   "pretrain.backup_every_steps": 1, "model.dropout": 0.0})

    class Killed(Exception):
        pass

    class DiesMidEpoch(callbacks.EpochLogger):
        def on_epoch_begin(self, epoch, logs=None):
            super().on_epoch_begin(epoch, logs)
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            super().on_train_batch_end(batch, logs)
            if self.epoch == 1 and batch == 1:
                raise Killed()

    out = tmp_path / "killed"
    with monkeypatch.context() as mp:
        mp.setattr(callbacks, "EpochLogger", DiesMidEpoch)
        with pytest.raises(Killed):
            pretrain.pretrain(cfg, duped["manifest"], out)
    assert pretrain.resume_point(out / "backup") == (1, 2)
    with caplog.at_level(logging.INFO, logger="encoderflow.train.pretrain"):
        resumed = pretrain.pretrain(cfg, duped["manifest"], out)
    assert "resuming epoch 2 at step 3 of 4" in caplog.text
    assert len(resumed["history"]["loss"]) == 3 and not (out / "backup").exists()

    straight = pretrain.pretrain(cfg, duped["manifest"], tmp_path / "straight")
    a = models.load(resumed["encoder"]).get_weights()
    b = models.load(straight["encoder"]).get_weights()
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    # Epoch 1 is the same in both; the resumed epoch 2 row covers only its last 2 steps.
    assert resumed["history"]["loss"][0] == pytest.approx(straight["history"]["loss"][0], abs=1e-5)
    assert resumed["history"]["val_loss"][-1] == pytest.approx(straight["history"]["val_loss"][-1], abs=1e-4)


def test_step_backup_records_epoch_and_steps_after_a_restore(tmp_path):
    """Keras's int save_freq records epoch 0 after a restore until an epoch ends; ours does not."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    from encoderflow import layout

    x, y = np.ones((8, 2), "float32"), np.zeros((8, 1), "float32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    backup = tmp_path / "backup"
    model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[pretrain.step_backup(backup, 3, keep=True)])
    assert pretrain.resume_point(backup) == (2, 0)  # saved at the last epoch end

    class Stop(Exception):
        pass

    stop = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: (_ for _ in ()).throw(Stop()) if b == 2 else None)
    with pytest.raises(Stop):
        model.fit(x, y, batch_size=2, epochs=4, verbose=0,
                  callbacks=[pretrain.step_backup(backup, 3), stop])
    meta = layout.read_json(backup / pretrain.BACKUP_METADATA)
    assert meta["epoch"] == 2 and meta["steps_done"] == 3
    assert pretrain.resume_point(backup) == (2, 3)


def test_precision_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert pretrain.dtype_policy("auto", "gpu") == "mixed_bfloat16"
    assert pretrain.dtype_policy("auto", "tpu") == "mixed_bfloat16"
    assert pretrain.dtype_policy("auto", "cpu") == "float32"
    assert pretrain.dtype_policy("mixed_float16", "cpu") == "mixed_float16"
    assert pretrain.dtype_policy("auto") == "float32"  # this machine has no accelerator


def test_learning_rate_schedules():
    from encoderflow.config import PretrainConfig

    assert pretrain.learning_rate(PretrainConfig(), total_steps=100) == 5e-4  # the guide's constant rate
    sched = pretrain.learning_rate(PretrainConfig(lr_schedule="warmup_cosine", warmup_ratio=0.1), total_steps=100)
    at = {step: float(sched(step)) for step in (0, 5, 10, 55, 100)}
    assert at[0] == pytest.approx(0.0)
    assert at[5] == pytest.approx(2.5e-4)        # halfway up the linear warm-up
    assert at[10] == pytest.approx(5e-4)         # peak at the end of warm-up
    assert at[55] == pytest.approx(2.5e-4, rel=1e-3)  # cosine halfway down
    assert at[100] == pytest.approx(0.0, abs=1e-9)


TWO_DEVICES = r"""
import json, sys
from encoderflow.config import from_overrides
from encoderflow.train import pretrain
cfg = from_overrides("smoke", json.loads(sys.argv[2]))
result = pretrain.pretrain(cfg, sys.argv[1], sys.argv[3])
print("RESULT " + json.dumps({"devices": result["devices"], "first_step_loss": result["first_step_loss"]}))
"""


@pytest.mark.slow
def test_two_device_data_parallel_matches_one_device(duped, tmp_path):
    """DataParallel over 2 (forced host) devices: the first step's loss equals 1 device's within 1e-4.

    Each run is a fresh process, so this also pins that the data order does not vary between
    processes (it once did: tf.data's per-iteration reshuffle).
    """
    import json
    import subprocess
    import sys

    from tests.data.test_shards import SMOKE

    over = {**SMOKE, "data.dupe_factor": 2, "pretrain.batch_size": BATCH, "pretrain.epochs": 1,
            "pretrain.steps_per_epoch": 1, "pretrain.validation_steps": 1, "model.dropout": 0.0}
    results = {}
    for n in (1, 2):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        proc = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(duped["manifest"]), json.dumps(over),
                               str(tmp_path / f"dev{n}")], env=env, capture_output=True, text=True, timeout=300,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
        results[n] = json.loads(line[len("RESULT "):])
    assert results[1]["devices"] == 1 and results[2]["devices"] == 2
    one, two = results[1]["first_step_loss"], results[2]["first_step_loss"]
    assert np.isfinite(one) and one > 1.0
    assert abs(one - two) < 1e-4, (one, two)


KILLED_AFTER_FIRST_EPOCH = r"""
import json, os, signal, sys
from encoderflow.config import from_overrides
from encoderflow.train import callbacks, pretrain

class DiesAfterFirstEpoch(callbacks.EpochLogger):
    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost worker would

callbacks.EpochLogger = DiesAfterFirstEpoch
pretrain.pretrain(from_overrides("smoke", json.loads(sys.argv[2])), sys.argv[1], sys.argv[3])
"""


@pytest.mark.slow
def test_pretraining_sigkilled_after_epoch_one_resumes_at_epoch_two(duped, tmp_path, caplog):
    import json
    import logging
    import subprocess
    import sys

    from encoderflow.config import from_overrides
    from tests.data.test_shards import SMOKE

    over = {**SMOKE, "data.dupe_factor": 2, "pretrain.batch_size": BATCH, "pretrain.epochs": 3,
            "pretrain.steps_per_epoch": 2, "pretrain.validation_steps": 1}
    out = tmp_path / "pretrain"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_EPOCH, str(duped["manifest"]), json.dumps(over),
                           str(out)], capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (out / "encoder.keras").exists()
    assert pretrain.resume_epoch(out / "backup") == 1

    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        result = pretrain.pretrain(from_overrides("smoke", over), duped["manifest"], out)
    assert "3 epochs from epoch 1" in caplog.text
    epochs_run = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "encoderflow.train"]
    assert epochs_run == ["pretrain epoch 2/3", "pretrain epoch 3/3"]  # resumed at the second epoch
    assert len(result["history"]["loss"]) == 3  # the killed attempt's epoch is in the record too
    assert (out / "encoder.keras").exists() and not (out / "backup").exists()
