"""Per-epoch copies: epoch e trains on copy e % dupe_factor, fresh or resumed."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from encoderflow import layout, runtime
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

    # One step per call unless a test says otherwise: several tests stop the run at a given step.
    over = {**SMOKE, "data.dupe_factor": 2, "pretrain.batch_size": BATCH, "pretrain.steps_per_execution": 1}
    over.update({f"pretrain.{k}": v for k, v in pretrain_kw.items()})
    return from_overrides("smoke", over)


def _rows(batches):
    """Each record as (masked token ids, mask positions): what tells two copies apart."""
    batches = list(batches)
    ids = np.concatenate([f["token_ids"].numpy() for f, _, _ in batches])
    pos = np.concatenate([f["mask_positions"].numpy() for f, _, _ in batches])
    return [tuple(a.tolist()) + tuple(b.tolist()) for a, b in zip(ids, pos, strict=True)]


def _copy_rows(duped, c):
    rec = duped["copies"][c]
    return [tuple(a.tolist()) + tuple(b.tolist()) for a, b in zip(rec["token_ids"], rec["mask_positions"], strict=True)]


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
        got = _rows(batches[epoch * steps : (epoch + 1) * steps])
        assert sorted(got) == sorted(_copy_rows(duped, epoch % 2)), epoch
    # Resuming at epoch 1 serves exactly what a fresh run served from epoch 1 on.
    resumed, _ = pretrain.train_batches(duped["manifest"], cfg, initial_epoch=1)
    assert _rows(list(resumed)) == _rows(batches[steps:])
    # Resuming 3 steps into epoch 1 serves the rest, and declares that length.
    mid, _ = pretrain.train_batches(duped["manifest"], cfg, initial_epoch=1, skip=3)
    assert _rows(list(mid)) == _rows(batches[steps + 3 :]) and int(mid.cardinality()) == 2 * steps - 3
    with pytest.raises(ValueError, match="skip must be in"):
        pretrain.train_batches(duped["manifest"], cfg, initial_epoch=1, skip=steps)


def test_train_batches_with_a_step_cap_repeats_within_the_copy(duped):
    cfg = _run_cfg(duped, epochs=2, steps_per_epoch=6)  # 48 > 30 records: wraps inside the copy
    ds, steps = pretrain.train_batches(duped["manifest"], cfg)
    batches = list(ds)
    assert steps == 6 and len(batches) == 12
    assert all(int(f["token_ids"].shape[0]) == BATCH for f, _, _ in batches)
    for epoch in range(2):
        got = set(_rows(batches[epoch * steps : (epoch + 1) * steps]))
        assert got == set(_copy_rows(duped, epoch)), epoch


def _resume_point(backup, steps_per_epoch):
    """(epoch, steps of it done) where a run resumes from ``backup``."""
    from encoderflow.train.callbacks import latest_backup

    return divmod(latest_backup(backup)[0], steps_per_epoch)


def _tiny_model():
    import keras

    m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    m.compile(loss="mse", optimizer=keras.optimizers.AdamW(0.05))
    return m


def _tiny_data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 2)).astype("float32"), rng.normal(size=(8, 1)).astype("float32")


def test_step_backup_restores_weights_optimizer_and_step(tmp_path):
    """A fit stopped after epoch 1 resumes at epoch 2 with the weights and optimizer state it had."""
    import keras

    from encoderflow.train.callbacks import StepBackup, latest_backup

    class Stop(Exception):
        pass

    class StopAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise Stop()

    x, y = _tiny_data()
    backup = tmp_path / "backup"
    assert _resume_point(backup, 4) == (0, 0) and latest_backup(backup) == (0, None)
    stopped, straight = _tiny_model(), _tiny_model()
    straight.set_weights(stopped.get_weights())
    with pytest.raises(Stop):
        stopped.fit(
            x,
            y,
            batch_size=2,
            epochs=4,
            verbose=0,
            shuffle=False,
            callbacks=[StepBackup(backup, 4, every_steps=3), StopAfter()],
        )
    assert _resume_point(backup, 4) == (2, 0)
    # Older ones deleted; the sha256 a resume checks is beside it.
    assert sorted(f.name for f in backup.iterdir()) == [
        "step-000000000008.weights.h5",
        "step-000000000008.weights.h5.sha256",
    ]
    # A backup killed while being written keeps its temp name: never taken for a backup.
    (backup / ".step-000000000011.weights.h5.x1.weights.h5").write_bytes(b"half")
    assert latest_backup(backup)[0] == 8

    resumed = _tiny_model()
    restore = StepBackup(backup, 4, every_steps=3)
    assert restore.restore(resumed) == 8 == restore.steps_done
    assert int(resumed.optimizer.iterations) == 8
    for a, b in zip(
        stopped.weights + stopped.optimizer.variables, resumed.weights + resumed.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Resumed with the data from that epoch on, Keras runs 2 and 3 and ends where a run never stopped does.
    seen = []
    log = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    resumed.fit(x, y, batch_size=2, epochs=4, initial_epoch=2, verbose=0, shuffle=False, callbacks=[restore, log])
    assert seen == [2, 3] and restore.steps_done == 16 and _resume_point(backup, 4) == (4, 0)
    straight.fit(x, y, batch_size=2, epochs=4, verbose=0, shuffle=False)
    for a, b in zip(
        straight.weights + straight.optimizer.variables, resumed.weights + resumed.optimizer.variables, strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    assert StepBackup(tmp_path / "none", 4).restore(_tiny_model()) == 0  # nothing to restore: a fresh start


def test_an_altered_backup_is_deleted_and_not_resumed_from(tmp_path, caplog):
    """4 KB overwritten in a backup's embedding resumed silently and trained on from those weights."""
    import logging

    from encoderflow.train.callbacks import StepBackup

    x, y = _tiny_data()
    backup = tmp_path / "backup"
    _tiny_model().fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False, callbacks=[StepBackup(backup, 4)])
    [file] = backup.glob("step-*.weights.h5")
    assert StepBackup(backup, 4).steps_done == 8  # sound: resumed from
    data = bytearray(file.read_bytes())
    data[-4096:-2048] = b"\x40" * 2048
    file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="encoderflow.train"):
        restore = StepBackup(backup, 4, label="pretrain")
    assert (restore.steps_done, restore.restore_from) == (0, None) and restore.restore(_tiny_model()) == 0
    [message] = caplog.messages
    assert message.startswith(f"pretrain: backup {file} differs from the sha256 written with it")
    assert message.endswith(": deleted, not resumed from; training starts at step 0")
    assert list(backup.iterdir()) == []


def test_a_backup_the_disk_has_no_room_for_is_refused_before_hdf5_writes(tmp_path, monkeypatch):
    """HDF5 running out of space mid-backup ended the process in a segmentation fault at exit (exit
    139, after the failure was reported): the backup is refused first, as a full disk, with its sizes."""
    import collections
    import errno
    import shutil

    from encoderflow import errors
    from encoderflow.train.callbacks import StepBackup, backup_size

    x, y = _tiny_data()
    model, backup = _tiny_model(), tmp_path / "backup"
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[StepBackup(backup, 4)])
    [written] = backup.glob("step-*.weights.h5")
    # The estimate covers the file it is for, and by no more than the MiB it adds for HDF5's structure.
    assert written.stat().st_size <= backup_size(model) <= written.stat().st_size + 2**20

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 4096, 4096))
    refused = StepBackup(backup, 4)
    refused.set_model(model)
    with pytest.raises(OSError) as full:
        refused.save()
    assert full.value.errno == errno.ENOSPC
    assert sorted(p.name for p in backup.iterdir()) == [written.name, f"{written.name}.sha256"]  # no temp left
    said = errors.storage_error(full.value).message
    assert said.startswith(f"no space left on the device writing {backup}/step-")
    assert "a backup of pretrain needs about 1.0 MiB, 4.0 KiB is free (ENCODERFLOW_HOME=" in said


def test_a_run_waits_while_another_trains_the_same_model_and_never_adopts_its_live_backup(tmp_path, caplog):
    """Two `encoderflow run` of one config minutes apart both pretrained, on one accelerator, and the
    second said the first, alive, had "stopped" as it copied that run's backup."""
    import logging
    import threading

    from encoderflow.train import pretrain as pt

    key, code = "k" * 64, layout.code_hash()
    twin = layout.run_dir("manual__first") / "pretrain"
    (twin / "backup").mkdir(parents=True)
    (twin / "backup" / pt.BACKUP_KEY).write_text(key + "\n")
    (twin / "backup" / pt.BACKUP_CODE).write_text(code + "\n")
    (twin / "backup" / "step-000000000050.weights.h5").write_bytes(b"weights")
    mine = layout.run_dir("manual__second") / "pretrain"
    assert layout.busy_twin(mine, key) is None  # nothing holds its training lock: stopped, not busy

    trains, stop = threading.Event(), threading.Event()

    def first_run():
        with layout.training(twin, key):
            trains.set()
            stop.wait(10)

    threading.Thread(target=first_run).start()
    assert trains.wait(10)
    try:
        assert layout.busy_twin(mine, key) == (twin, str(os.getpid()))
        assert layout.busy_twin(mine, "o" * 64) is None  # other training: not waited for
        pt._adopt_backup(mine, key)  # alive: its backup is not taken for a stopped run's
        assert not (mine / "backup").exists()
        threading.Timer(1.0, stop.set).start()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="encoderflow"):
            assert layout.wait_for_twin(mine, key, pt.TWIN_DOES, pt.TWIN_THEN, poll=0.1) is True
    finally:
        stop.set()
    assert caplog.messages == [
        f"pretrain: run manual__first trains the same model from the same shards, config and code now (pid "
        f"{os.getpid()}): waiting for it, then reusing its encoder (or resuming its backup if it stops)"
    ]
    assert layout.wait_for_twin(mine, key, pt.TWIN_DOES, pt.TWIN_THEN) is False  # it ended: nothing to wait for
    # Stopped under other code (an upgrade since): not resumed, and said, where it was skipped in silence.
    (twin / "backup" / pt.BACKUP_CODE).write_text("0" * 64 + "\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        pt._adopt_backup(mine, key)
    assert not (mine / "backup").exists()
    assert caplog.messages == [
        f"pretrain: not resuming run manual__first's backup of this training: taken by other code (code hash "
        f"000000000000, this {code[:12]}); resumed only by the code that took it"
    ]


@pytest.mark.parametrize("resumed_by", ["a retry", "the next run"])
def test_pretrain_resumes_on_the_copy_of_the_interrupted_epoch(duped, tmp_path, monkeypatch, caplog, resumed_by):
    """A retry resumes in its own run folder; the next run (after Ctrl-C or a kill) from the stopped run's
    backup, copied into its new folder (it used to start again from step 0)."""
    import logging

    from encoderflow.train import callbacks

    class Killed(Exception):
        pass

    class DiesAfterFirstEpoch(callbacks.EpochLogger):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            raise Killed()

    cfg = _run_cfg(duped, epochs=3, steps_per_epoch=2, validation_steps=1)
    # With dropout: its random stream is part of a backup (the resumed weights used to differ by ~1e-3).
    assert cfg.model.dropout > 0
    stopped = layout.run_dir("first") / "pretrain"
    with monkeypatch.context() as mp:
        mp.setattr(callbacks, "EpochLogger", DiesAfterFirstEpoch)
        with pytest.raises(Killed):
            pretrain.pretrain(cfg, duped["manifest"], stopped)
    # The backup (before the logger in the list) saved epoch 0's end before the logger died.
    assert _resume_point(stopped / "backup", 2) == (1, 0)
    out = stopped if resumed_by == "a retry" else layout.run_dir("next") / "pretrain"
    with caplog.at_level(logging.INFO, logger="encoderflow.train.pretrain"):
        result = pretrain.pretrain(cfg, duped["manifest"], out)
    assert "3 epochs from epoch 1" in caplog.text
    # The recorded history spans both attempts: epoch 0 from the first, epochs 1-2 from the resume.
    assert len(result["history"]["loss"]) == 3 and np.isfinite(result["loss"])
    assert not (out / "backup").exists()
    if resumed_by == "the next run":
        assert (
            "pretrain: run first stopped this training (same key and code) at step 2: "
            f"its backup copied to {out / 'backup'}" in caplog.messages
        )
        assert _resume_point(stopped / "backup", 2) == (1, 0)  # the stopped run's own backup is left as it was
        # Forced (earlier_runs=False), a run trains from step 0.
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="encoderflow.train.pretrain"):
            pretrain.pretrain(cfg, duped["manifest"], layout.run_dir("forced") / "pretrain", earlier_runs=False)
        assert "3 epochs from epoch 0" in caplog.text
    # Epochs 1 and 2 trained on copies 1 and 0, as an uninterrupted run's did: the same weights and losses.
    from encoderflow import model as models

    straight = pretrain.pretrain(cfg, duped["manifest"], tmp_path / "straight")
    for x, y in zip(
        models.load(result["encoder"]).get_weights(), models.load(straight["encoder"]).get_weights(), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result["history"]["loss"], straight["history"]["loss"], rtol=0, atol=1e-5)


def test_step_backup_records_the_step_after_a_restore(tmp_path):
    """Backups every 3 steps into an epoch and at epoch ends, counting the steps of earlier attempts."""
    import keras

    from encoderflow.train.callbacks import StepBackup

    x, y = _tiny_data()
    model = _tiny_model()
    backup = tmp_path / "backup"
    saved = []

    class Spy(StepBackup):
        def save(self):
            saved.append(self.steps_done)
            return super().save()

    model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[Spy(backup, 4, every_steps=3)])
    assert saved == [3, 4, 7, 8]
    assert _resume_point(backup, 4) == (2, 0)  # saved at the last epoch end

    class Stop(Exception):
        pass

    stop = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: (_ for _ in ()).throw(Stop()) if b == 3 else None
    )
    model = _tiny_model()
    resumed = StepBackup(backup, 4, every_steps=3)
    resumed.restore(model)
    with pytest.raises(Stop):
        model.fit(x, y, batch_size=2, epochs=4, initial_epoch=2, verbose=0, callbacks=[resumed, stop])
    assert _resume_point(backup, 4) == (2, 3)


def test_backups_fall_on_the_first_call_boundary_at_or_after_each_backup_point(tmp_path):
    """Backups are taken between calls into the compiled step: with 4 steps a call and a backup every 5
    steps, at 8 (the first boundary past 5), at the epoch end (12), then 20 and 24. steps_per_execution
    had to divide the backup interval too, and an epoch of 12,352 steps with a backup every 5,000 ran one
    step a call."""
    import keras

    from encoderflow.train.callbacks import StepBackup

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 2)).astype("float32"), rng.normal(size=(24, 1)).astype("float32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer=keras.optimizers.AdamW(0.05), steps_per_execution=4)
    saved = []

    class Spy(StepBackup):
        def save(self):
            saved.append(self.steps_done)
            return super().save()

    model.fit(
        x, y, batch_size=2, epochs=2, verbose=0, shuffle=False, callbacks=[Spy(tmp_path / "b", 12, every_steps=5)]
    )
    assert saved == [8, 12, 20, 24]
    assert _resume_point(tmp_path / "b", 12) == (2, 0)


def test_step_backup_never_saves_a_step_that_raised(tmp_path):
    """A NaN loss stops training before the state it produced is backed up."""
    from encoderflow.train.callbacks import EpochLogger, NonFiniteLoss, StepBackup

    x, _ = _tiny_data()
    y = np.full((8, 1), np.nan, "float32")
    with pytest.raises(NonFiniteLoss):
        _tiny_model().fit(
            x,
            y,
            batch_size=2,
            epochs=2,
            verbose=0,
            callbacks=[StepBackup(tmp_path / "backup", 4, every_steps=1), EpochLogger("pretrain", 2)],
        )
    assert _resume_point(tmp_path / "backup", 4) == (0, 0)


def test_learning_rate_schedules():
    from encoderflow.config import PretrainConfig
    from encoderflow.train.optim import learning_rate

    assert learning_rate(PretrainConfig(), total_steps=100) == 5e-4  # the guide's constant rate
    sched = learning_rate(PretrainConfig(lr_schedule="warmup_cosine", warmup_ratio=0.1), total_steps=100)
    at = {step: float(sched(step)) for step in (0, 5, 10, 55, 100)}
    assert at[0] == pytest.approx(0.0)
    assert at[5] == pytest.approx(2.5e-4)  # halfway up the linear warm-up
    assert at[10] == pytest.approx(5e-4)  # peak at the end of warm-up
    assert at[55] == pytest.approx(2.5e-4, rel=1e-3)  # cosine halfway down
    assert at[100] == pytest.approx(0.0, abs=1e-9)


TWO_DEVICES = r"""
import json, sys
from encoderflow.config import from_overrides
from encoderflow.train import pretrain
cfg = from_overrides("smoke", json.loads(sys.argv[2]))
result = pretrain.pretrain(cfg, sys.argv[1], sys.argv[3])
import keras
print("RESULT " + json.dumps({
    "devices": result["devices"],
    "first_step_loss": result["first_step_loss"],
    "losses": result["history"]["loss"],
    "distribution_after": repr(keras.distribution.distribution()),
}))
"""


def _on_devices(n, manifest, over, out):
    import json
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
    proc = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES, str(manifest), json.dumps(over), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
def test_two_device_data_parallel_matches_one_device(duped, tmp_path):
    """DataParallel over 2 (forced host) devices: the first step's loss equals 1 device's within 1e-4.

    Each run is a fresh process, so this also pins that the data order does not vary between
    processes (it once did: tf.data's per-iteration reshuffle).
    """
    from tests.data.test_shards import SMOKE

    over = {
        **SMOKE,
        "data.dupe_factor": 2,
        "pretrain.batch_size": BATCH,
        "pretrain.epochs": 1,
        "pretrain.steps_per_epoch": 1,
        "pretrain.validation_steps": 1,
        "model.dropout": 0.0,
    }
    results = {n: _on_devices(n, duped["manifest"], over, tmp_path / f"dev{n}") for n in (1, 2)}
    assert results[1]["devices"] == 1 and results[2]["devices"] == 2
    one, two = results[1]["first_step_loss"], results[2]["first_step_loss"]
    assert np.isfinite(one) and one > 1.0
    assert abs(one - two) < 1e-4, (one, two)


@pytest.mark.slow
def test_two_devices_train_whole_epochs_and_leave_no_distribution_behind(duped, tmp_path):
    """30 records a copy, batch 8: the short last batch cannot split over 2 devices, so it is left out."""
    from tests.data.test_shards import SMOKE

    over = {
        **SMOKE,
        "data.dupe_factor": 2,
        "pretrain.batch_size": BATCH,
        "pretrain.epochs": 2,
        "pretrain.steps_per_epoch": 0,
        "pretrain.validation_steps": 0,
    }
    got = _on_devices(2, duped["manifest"], over, tmp_path / "out")
    assert got["devices"] == 2 and len(got["losses"]) == 2 and all(np.isfinite(got["losses"]))
    # Fine-tuning in the same process (make run) must not inherit the data-parallel layout.
    assert got["distribution_after"] == "None"


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


def _killed_after_epoch_one(duped, out, epochs: int) -> dict:
    """A pretraining of ``epochs`` epochs (2 steps each) SIGKILLed after its first: its overrides."""
    import json
    import subprocess
    import sys

    from tests.data.test_shards import SMOKE

    over = {
        **SMOKE,
        "data.dupe_factor": 2,
        "pretrain.batch_size": BATCH,
        "pretrain.epochs": epochs,
        "pretrain.steps_per_epoch": 2,
        "pretrain.validation_steps": 1,
    }
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_FIRST_EPOCH, str(duped["manifest"]), json.dumps(over), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (out / "encoder.keras").exists()
    assert _resume_point(out / "backup", 2) == (1, 0)
    return over


@pytest.mark.slow
def test_pretraining_sigkilled_after_epoch_one_resumes_at_epoch_two(duped, tmp_path, caplog):
    import logging

    from encoderflow.config import from_overrides

    out = tmp_path / "pretrain"
    over = _killed_after_epoch_one(duped, out, epochs=3)

    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        result = pretrain.pretrain(from_overrides("smoke", over), duped["manifest"], out)
    assert "3 epochs from epoch 1" in caplog.text
    epochs_run = [
        m.split(":")[0] for r in caplog.records if r.name == "encoderflow.train" and " epoch " in (m := r.getMessage())
    ]
    assert epochs_run == ["pretrain epoch 2/3", "pretrain epoch 3/3"]  # resumed at the second epoch
    assert len(result["history"]["loss"]) == 3  # the killed attempt's epoch is in the record too
    assert (out / "encoder.keras").exists() and not (out / "backup").exists()
    # Its seconds are this try's: said, so `runs` does not pass them off as the whole training's.
    steps = result["config"]["pretrain"]["steps_per_epoch"]  # epoch one's, which the killed try trained
    assert result["resumed_from_step"] == steps == 2
    from encoderflow import runs

    shown = runs.detail_lines({"summary": {"runtime": {"pretrain": result}}, "folder": None}, tmp_path)
    assert any(f"the try that resumed at step {steps:,}" in line for line in shown), shown


@pytest.mark.slow
def test_a_retry_under_another_key_does_not_resume_the_old_backup(duped, tmp_path, caplog):
    """Between tries the champion it warm-starts from may move, or the config change: the backup
    was taken by other training, and resuming it would give weights the result does not describe."""
    import logging

    from encoderflow.config import from_overrides

    out = tmp_path / "pretrain"
    over = _killed_after_epoch_one(duped, out, epochs=2)
    changed = {**over, "pretrain.learning_rate": 1e-4}
    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        result = pretrain.pretrain(from_overrides("smoke", changed), duped["manifest"], out)
    assert "were taken by other training" in caplog.text
    assert "2 epochs from epoch 0" in caplog.text
    epochs_run = [
        m.split(":")[0] for r in caplog.records if r.name == "encoderflow.train" and " epoch " in (m := r.getMessage())
    ]
    assert epochs_run == ["pretrain epoch 1/2", "pretrain epoch 2/2"]
    assert len(result["history"]["loss"]) == 2 and not (out / "backup").exists()
    # What fine-tuning checks its tokenizer against.
    assert result["vocab_sha256"] == layout.read_json(duped["manifest"])["vocab_sha256"]


KILLED_MID_EPOCH = r"""
import json, os, signal, sys
from encoderflow.config import from_overrides
from encoderflow.train import callbacks, pretrain

class DiesMidEpoch(callbacks.EpochLogger):
    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == 1 and batch == 2:
            os.kill(os.getpid(), signal.SIGKILL)

callbacks.EpochLogger = DiesMidEpoch
pretrain.pretrain(from_overrides("smoke", json.loads(sys.argv[2])), sys.argv[1], sys.argv[3])
"""


@pytest.mark.slow
def test_pretraining_sigkilled_mid_epoch_resumes_at_the_next_step(duped, tmp_path, caplog):
    """A real SIGKILL as step 3 of epoch 2 begins (backups every 2 steps): the backup on disk resumes
    at step 3 and the run ends with an uninterrupted run's weights, history and final validation."""
    import json
    import logging
    import subprocess
    import sys

    from encoderflow import model as models
    from encoderflow.config import from_overrides
    from tests.data.test_shards import SMOKE

    over = {
        **SMOKE,
        "data.dupe_factor": 2,
        "pretrain.batch_size": BATCH,
        "pretrain.epochs": 3,
        "pretrain.steps_per_epoch": 0,
        "pretrain.validation_steps": 1,
        "pretrain.backup_every_steps": 2,
        # Backups fall between calls: 2 steps per call puts one at step 2 of the 4.
        "pretrain.steps_per_execution": 3,
        "model.dropout": 0.0,
    }
    out = tmp_path / "pretrain"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_MID_EPOCH, str(duped["manifest"]), json.dumps(over), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert _resume_point(out / "backup", 4) == (1, 2)

    cfg = from_overrides("smoke", over)
    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        resumed = pretrain.pretrain(cfg, duped["manifest"], out)
    assert "resuming epoch 2 at step 3 of 4" in caplog.text
    # What ran, where the MLflow param says what was asked (16).
    assert ", 2 steps per call (pretrain.steps_per_execution 3, lowered to divide the 4 steps per epoch)" in caplog.text
    # Epochs of a try no log shows (its worker died and it trained on) are named where they are.
    assert f"; epoch 1 was trained by earlier tries, in {out / 'history.csv'} (a try whose worker died" in caplog.text
    # The resumed attempt's epochs start 2 steps into an epoch; the last is 2 steps short.
    steps_run = [m.split(" steps=")[1].split()[0] for r in caplog.records if " steps=" in (m := r.getMessage())]
    assert steps_run == ["4", "2"]
    assert len(resumed["history"]["loss"]) == 3 and not (out / "backup").exists()
    straight = pretrain.pretrain(cfg, duped["manifest"], tmp_path / "straight")
    for x, y in zip(
        models.load(resumed["encoder"]).get_weights(), models.load(straight["encoder"]).get_weights(), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)  # no batch skipped, none trained twice
    assert resumed["mlm_val_accuracy"] == pytest.approx(straight["mlm_val_accuracy"], abs=1e-4)
    # Epoch 1 is the same in both; the resumed attempt's rows start at its resume point, and its last
    # validation, at the end of training, sees the same weights.
    assert resumed["history"]["loss"][0] == pytest.approx(straight["history"]["loss"][0], abs=1e-5)
    assert resumed["history"]["val_loss"][-1] == pytest.approx(straight["history"]["val_loss"][-1], abs=1e-4)


def test_pretrain_killed_after_its_last_backup_trains_nothing_more(duped, tmp_path, monkeypatch, caplog):
    """Killed after the final backup but before the result: the retry restores it and saves the encoder."""
    import logging

    from encoderflow import model as models
    from encoderflow.train import callbacks

    class Killed(Exception):
        pass

    class DiesAtTheEnd(callbacks.EpochLogger):
        def on_train_end(self, logs=None):
            raise Killed()

    cfg = _run_cfg(duped, epochs=2, steps_per_epoch=2, validation_steps=1)
    out = tmp_path / "pretrain"
    with monkeypatch.context() as mp:
        mp.setattr(callbacks, "EpochLogger", DiesAtTheEnd)
        with pytest.raises(Killed):
            pretrain.pretrain(cfg, duped["manifest"], out)
    assert _resume_point(out / "backup", 2) == (2, 0)
    caplog.clear()  # only the retry's lines count below
    with caplog.at_level(logging.INFO, logger="encoderflow.train"):
        result = pretrain.pretrain(cfg, duped["manifest"], out)
    assert "2 epochs from epoch 2" in caplog.text
    assert not [r for r in caplog.records if r.name == "encoderflow.train"]  # no epoch ran
    # Said, not only done: the retry's log went from its plan to the encoder's size without a word.
    assert (
        f"pretrain: the backup at step 4 ({out / 'backup'}) is the end of training: an earlier try trained all 2 "
        "epochs and stopped before saving the encoder; saving it from that backup"
    ) in caplog.messages
    assert (
        len(result["history"]["loss"]) == 2
        and result["mlm_val_accuracy"] == result["history"]["val_sparse_categorical_accuracy"][-1]
    )
    straight = pretrain.pretrain(cfg, duped["manifest"], tmp_path / "straight")
    for x, y in zip(
        models.load(result["encoder"]).get_weights(), models.load(straight["encoder"]).get_weights(), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


def test_steps_per_execution_divides_the_epoch():
    assert pretrain.steps_per_execution(16, 50) == 10  # the smoke epoch: 50 steps
    # The backup interval no longer counts (backups fall on call boundaries): 12,352 steps and a backup every
    # 5,000 ran one step per call, each call's logs read on fit's thread.
    assert pretrain.steps_per_execution(16, 12352) == 16
    assert pretrain.steps_per_execution(1, 128) == 1
    assert pretrain.steps_per_execution(64, 7) == 7  # never more than an epoch
    assert pretrain.steps_per_execution(8, 13) == 1  # a prime epoch: one step per call


def test_pretrain_logs_an_estimate_progress_and_the_cpu_warning(duped, tmp_path, caplog):
    """Before long training on a CPU, the log says how long it will take and what to do instead."""
    import dataclasses
    import logging

    cfg = _run_cfg(duped, epochs=1, steps_per_epoch=16, validation_steps=1, log_every_seconds=0)
    cfg = dataclasses.replace(cfg, preset="guide")  # the preset that needs a GPU
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        result = pretrain.pretrain(cfg, duped["manifest"], tmp_path / "pretrain")
    lines = [r.getMessage() for r in caplog.records if r.name == "encoderflow.train"]
    estimate = [
        line for line in lines if "ms/step measured over 10 steps" in line and "estimated training time" in line
    ]
    assert len(estimate) == 1 and "for 16 steps" in estimate[0], lines
    assert any("pretrain: device 1 x " in r.getMessage() for r in caplog.records)
    # What the preset chose is said, not only what was overridden (the recipe's pre-norm was in no line).
    m = cfg.model
    assert (
        f"pretrain: model {m.num_layers} layer{'s' * (m.num_layers != 1)} of width {m.model_dim} ({m.num_heads} heads, "
        f"feed-forward {m.intermediate_dim}), post-norm (the guide's), dropout {m.dropout:g}"
    ) in caplog.messages
    said = f"learning rate {cfg.pretrain.learning_rate:g} (constant), weight decay "
    assert any(said in line for line in caplog.messages)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "encoderflow.train"]
    if not runtime.on_cpu():  # make test on a GPU machine: the guide preset is where it belongs
        assert warning == [] and result["device"].endswith("(gpu)")
        return
    assert len(warning) == 1 and "GPU worker" in warning[0].getMessage() and "smoke" in warning[0].getMessage()
    progress = [line for line in lines if line.startswith("pretrain progress: epoch step ")]
    assert progress and all("loss=" in line and "seq/s=" in line and "eta=" in line for line in progress)
    assert "pretrain progress: epoch step 16/16" in progress[-1]
    assert not any("\r" in line for line in lines)
    assert result["step_seconds"] > 0 and result["device"] == "1 x cpu"
    # What follows the last epoch is said: tf.data's autotuner has held the end of fit up to 35 s, silently.
    assert re.fullmatch(
        r"pretrain: training ended after \d+\.\d s; stopping the input pipeline \(TensorFlow may take up to a "
        r"minute\), then saving the encoder",
        lines[-1],
    ), lines[-1]


def test_mixed_bfloat16_trains_to_within_5_percent_of_float32(duped, tmp_path):
    import dataclasses

    losses = {}
    for precision in ("float32", "mixed_bfloat16"):
        cfg = _run_cfg(duped, epochs=1, steps_per_epoch=20, validation_steps=1, precision=precision)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0))
        result = pretrain.pretrain(cfg, duped["manifest"], tmp_path / precision)
        assert result["dtype_policy"] == precision
        assert layout.sha256_json(result["config"]) == result["key"]  # what it was trained from, recorded
        assert result["config"]["pretrain"]["precision"] == precision
        losses[precision] = result["loss"]
    assert np.isfinite(losses["mixed_bfloat16"])
    assert losses["mixed_bfloat16"] == pytest.approx(losses["float32"], rel=0.05), losses


def test_zero_pretraining_epochs_keeps_the_seeded_initialisation(duped, tmp_path):
    """pretrain.epochs=0: the no-pretraining reference. The encoder is saved untrained (the same weights
    for the same seed), with one validation pass as its MLM accuracy, and nothing is fitted."""
    from encoderflow import model as models

    cfg = _run_cfg(duped, epochs=0, validation_steps=1)
    result = pretrain.pretrain(cfg, duped["manifest"], tmp_path / "a")
    again = pretrain.pretrain(cfg, duped["manifest"], tmp_path / "b")
    assert result["history"] == {} and result["loss"] is None
    assert 0.0 <= result["mlm_val_accuracy"] <= 1.0 and np.isfinite(result["val_loss"])
    assert not (tmp_path / "a" / "history.csv").exists()
    for x, y in zip(
        models.load(result["encoder"]).get_weights(), models.load(again["encoder"]).get_weights(), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    trained = pretrain.pretrain(
        _run_cfg(duped, epochs=1, steps_per_epoch=2, validation_steps=1), duped["manifest"], tmp_path / "c"
    )
    moved = [
        not np.array_equal(x, y)
        for x, y in zip(
            models.load(result["encoder"]).get_weights(), models.load(trained["encoder"]).get_weights(), strict=True
        )
    ]
    assert any(moved)  # two steps of training change the weights the untrained run kept


def test_warm_start_begins_lower_and_refuses_a_mismatch_naming_both_sides(duped, tmp_path):
    """pretrain.init_from=<encoder.keras>: continual pretraining starts where the parent left off."""
    from encoderflow.errors import EncoderflowError

    parent_cfg = _run_cfg(duped, epochs=2, steps_per_epoch=40, validation_steps=1, steps_per_execution=8)
    parent = pretrain.pretrain(parent_cfg, duped["manifest"], tmp_path / "parent")
    cfg = _run_cfg(duped, epochs=1, steps_per_epoch=12, validation_steps=1, steps_per_execution=4)
    cold = pretrain.pretrain(cfg, duped["manifest"], tmp_path / "cold")
    init = {"label": "path", "path": parent["encoder"]}
    warm = pretrain.pretrain(cfg, duped["manifest"], tmp_path / "warm", init)
    # The MLM head is not part of an encoder.keras: it starts fresh on the pretrained encoder and
    # catches up within steps, so the first epoch's loss, not its first step's, shows the head start.
    assert warm["history"]["loss"][0] < cold["history"]["loss"][0], (warm["history"], cold["history"])
    assert warm["init_from"] == {"label": "path", "path": parent["encoder"], "version": None}
    assert warm["key"] != cold["key"]  # a warm start never reuses a cold start's result

    with pytest.raises(EncoderflowError, match=r"vocabulary sha256 abc differs from this run's [0-9a-f]{64}"):
        pretrain.pretrain(cfg, duped["manifest"], tmp_path / "v", {**init, "vocab_sha256": "abc"})
    from dataclasses import replace

    wider = replace(cfg, model=replace(cfg.model, intermediate_dim=96))
    with pytest.raises(EncoderflowError, match=r"layers do not match this config's model section \(.*here, .*there\)"):
        pretrain.pretrain(wider, duped["manifest"], tmp_path / "w", init)
    # A bundle's classifier.keras (beside its encoder.keras) failed with Keras's "No such layer", read as
    # a bug and retried.
    from encoderflow import model as models

    classifier = models.build_classifier(models.load(parent["encoder"]), 0, masked_pooling=True, num_classes=2)
    classifier.save(tmp_path / "classifier.keras")
    with pytest.raises(EncoderflowError, match=r"classifier.keras\): not an encoder \(a Functional named ") as err:
        pretrain.pretrain(cfg, duped["manifest"], tmp_path / "c", {**init, "path": str(tmp_path / "classifier.keras")})
    assert "give an encoder.keras" in err.value.fix


def test_a_copy_smaller_than_one_batch_is_refused_whatever_the_step_count(duped, tmp_path, caplog):
    """4 records repeated to fill 50 steps trained nothing and was blessed; fewer records than one
    batch now fail before the model is built. The records' repetition is logged when it happens."""
    import logging

    from encoderflow.errors import EncoderflowError

    cfg = _run_cfg(duped, epochs=1, steps_per_epoch=50, batch_size=32)  # 30 records a copy
    with pytest.raises(EncoderflowError) as err:
        pretrain.pretrain(cfg, duped["manifest"], tmp_path / "small")
    assert str(err.value).startswith(
        f"{duped['manifest']}: 30 train records a copy do not fill one batch of pretrain.batch_size=32 on 1 device"
    )
    assert err.value.fix == "lower pretrain.batch_size (a multiple of the device count) or pretrain on more text"
    assert not (tmp_path / "small").exists()
    cfg = _run_cfg(duped, epochs=1, steps_per_epoch=6, validation_steps=1)  # 48 sequences of 30 records
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        pretrain.pretrain(cfg, duped["manifest"], tmp_path / "repeated")
    assert any("6 steps/epoch (each record of its copy ~2 times)" in m for m in caplog.messages), caplog.messages
    # 9 validation records, one batch of 8 read: its accuracy's margin is said, and that it is noise.
    assert (
        "pretrain: validation on 8 of 9 records, ~46 masked tokens: MLM accuracy is known to +-0.144 (95%); "
        "that is noise: hold out more text for validation for a figure to compare"
    ) in caplog.messages


def test_another_runs_encoder_from_the_same_key_and_code_is_copied_not_trained_again(duped, caplog):
    """A finetune- or gate-only change used to pretrain again in every new run folder."""
    import logging

    cfg = _run_cfg(duped, epochs=1, steps_per_epoch=2, validation_steps=1)
    first = pretrain.pretrain(cfg, duped["manifest"], layout.run_dir("first") / "pretrain")
    assert first["code_hash"] == layout.code_hash() and "reused_from" not in first
    out = layout.run_dir("second") / "pretrain"
    caplog.clear()  # the first training's lines, when an earlier test left the loggers at INFO
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        second = pretrain.pretrain(cfg, duped["manifest"], out)
    assert second["reused_from"] == str(layout.run_dir("first") / "pretrain" / "result.json")
    assert second["encoder"] == str(out / "encoder.keras")
    assert layout.sha256_file(second["encoder"]) == first["encoder_sha256"] == second["encoder_sha256"]
    assert not any("steps/epoch" in m for m in caplog.messages)  # nothing was built or fitted
    assert any(
        m.startswith("pretrain: reusing the encoder run first trained from the same shards")
        and "set force to train again" in m
        for m in caplog.messages
    )
    # force (earlier_runs=False) trains; another config is another key.
    forced = pretrain.pretrain(cfg, duped["manifest"], layout.run_dir("forced") / "pretrain", earlier_runs=False)
    other = pretrain.pretrain(
        _run_cfg(duped, epochs=1, steps_per_epoch=3, validation_steps=1),
        duped["manifest"],
        layout.run_dir("o") / "pretrain",
    )
    assert "reused_from" not in forced and "reused_from" not in other
    # An encoder altered after its result was written is named and trained again, not copied. The
    # second run's is a link to the first's (no second copy on disk): altering one alters both.
    assert os.path.samefile(second["encoder"], first["encoder"])
    for run in ("first", "forced"):
        path = layout.run_dir(run) / "pretrain" / "encoder.keras"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        fresh = pretrain.pretrain(cfg, duped["manifest"], layout.run_dir("third") / "pretrain")
    assert "reused_from" not in fresh
    altered = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(altered) == 3 and all("its result.json recorded" in r.getMessage() for r in altered)


def test_the_validation_margin_follows_the_masked_tokens_it_is_measured_on():
    manifest = {"predictions_per_seq": 20, "mask_rate": 0.25, "totals": {"valid": {"records": 100, "tokens": 6400}}}
    masked, margin = pretrain.validation_margin(manifest, 100)
    assert masked == 1600 and margin == pytest.approx(1.96 * 0.5 / 40)  # 64 tokens a record: 16 masked each
    assert pretrain.validation_margin(manifest, 1) == (16, pytest.approx(0.245))
    # predictions_per_seq caps what a long record contributes
    long = {**manifest, "totals": {"valid": {"records": 10, "tokens": 10 * 512}}}
    assert pretrain.validation_margin(long, 10)[0] == 200


def test_a_second_try_in_the_same_run_folder_waits_for_the_first_and_history_survives_a_torn_row(tmp_path, caplog):
    """A Celery worker killed alone left its pretrain training; the retry trained beside it in the same
    folder, their history.csv rows interleaved, and reading it failed the run (int(''))."""
    import fcntl
    import logging
    import threading
    import time

    out = tmp_path / "pretrain"
    out.mkdir()
    entered = threading.Event()
    with open(tmp_path / ".pretrain.lock", "a+") as first:  # the earlier try, alive
        fcntl.flock(first, fcntl.LOCK_EX)
        first.write("4242\n")
        first.flush()

        def retry():
            with layout.alone_in(out, every=0.2):
                entered.set()

        with caplog.at_level(logging.WARNING, logger="encoderflow"):
            waiter = threading.Thread(target=retry)
            waiter.start()
            time.sleep(1.0)
            assert not entered.is_set()
        fcntl.flock(first, fcntl.LOCK_UN)
    waiter.join(10)
    assert entered.is_set()
    assert f"pretrain: an earlier try (pid 4242) still trains in {out}" in caplog.text
    (out / "history.csv").write_text("epoch,loss\n0,7.5\n,4.0405\n2,6.9,6.8\n3,6.5epoch\n4\n1,7.1\n")
    assert pretrain.read_history(out / "history.csv") == {"loss": [7.5, 7.1]}
