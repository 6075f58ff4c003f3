"""Training callbacks shared by the baseline, pretraining and fine-tuning loops."""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import threading
import time
import weakref
from pathlib import Path

from encoderflow import layout, runtime
from encoderflow.errors import EncoderflowError

keras = runtime.keras()

log = logging.getLogger("encoderflow.train")

BACKUP_GLOB = "step-*.weights.h5"
# Beside each backup, written before it: the sha256 a resume checks the backup against.
CHECKSUM_SUFFIX = ".sha256"
# Dropout's random stream (each keras.random.SeedGenerator's state) is no weight: save_weights leaves
# it out, and a resume drew other masks than the uninterrupted run (another model, another gate
# decision). A backup keeps the states, in variable order, in this dataset of its .weights.h5 file.
SEED_STATES = "encoderflow_seed_states"


def seed_states(model) -> list:
    """The model's random-stream variables (its layers' ``SeedGenerator`` states), in a fixed order."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def backup_size(model) -> int:
    """About the bytes of ``model``'s backup: every variable ``save_weights`` writes (the model's, its
    optimizer's and the random streams'), plus 1 MiB for HDF5's own structure (measured: 0.18 MB in the
    guide model's backup of 183 variables, 109 MiB in all)."""
    variables = list(model.variables)
    if model.optimizer is not None:
        variables += model.optimizer.variables
    return sum(v.value.nbytes for v in variables) + 2**20  # the arrays' sizes, read without a device copy


class NonFiniteLoss(EncoderflowError):
    """Training produced a NaN or infinite loss; nothing from this run may be promoted."""


def _fmt_seconds(seconds: float) -> str:
    """``2h05m``, ``4m10s``, ``12.3s``: durations as a person reads them in a log line."""
    if not math.isfinite(seconds):
        return "?"
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


# jax.monitoring's duration events of making a program: tracing, lowering to MLIR, compiling, and
# fetching it from the persistent compilation cache instead.
COMPILE_EVENTS = ("/jax/core/compile/", "/jax/compilation_cache/cache_retrieval_time_sec")
# The loggers in a fit now, told of JAX's compiling. Weakly held: a fit that raises never calls
# on_train_end, and a listener of its own would keep the logger, and its model, for the process's life.
_TRAINING: weakref.WeakSet = weakref.WeakSet()


@functools.cache  # one listener per process: jax.monitoring keeps every one registered
def _listen_to_compiling() -> None:
    import jax.monitoring

    def count(event: str, duration: float, **_) -> None:
        if event.startswith(COMPILE_EVENTS):
            for logger in list(_TRAINING):
                logger.compiling += duration

    jax.monitoring.register_event_duration_secs_listener(count)


# Steps the time estimate may leave out for compiling before it takes what it has.
MAX_LEFT_OUT = 100
# What a NaN loss's error says to do when the caller names nothing more precise.
NAN_FIX = "lower the learning rate or check the input data"


class EpochLogger(keras.callbacks.Callback):
    """Plain log lines (no progress bars in task logs), a time estimate and a NaN guard.

    An epoch's line gives its metrics, ``seq/s`` (training alone, after the epoch's first call into
    the compiled step, which for the run's first epoch includes compiling it), ``val_s`` (its
    validation), ``epoch_s`` (the whole epoch) and ``elapsed_s`` (since training began). A progress
    line's ``seq/s`` is timed the same way, and its ETA is the run's steps left at that rate. The time
    estimate is timed over steps that compiled nothing: steps in which JAX compiled (its
    ``jax.monitoring`` compile events: fine-tuning's length buckets compile a step per batch width) are
    left out and the next ones timed instead; an estimate over them read 1,254 ms/step where training ran
    at ~100.

    The step path stays free of device-to-host copies. Keras reads every call's logs (waiting for the
    device) before a callback that overrides ``on_train_batch_end`` sees them, on fit's own thread,
    unless each such callback is ``async_safe``: this one is, so Keras reads them on a thread of its
    own while fit dispatches the next call. Those threads may run out of order: each call is taken
    in the order fit ran them (the calls :meth:`on_train_batch_begin` saw). It never touches
    ``self.model`` there (under JAX that copies fit's state into the model's variables, on the
    training thread's toes). A NaN or infinite loss raises :class:`NonFiniteLoss` at the first read
    after it appears (Keras raises it on fit's thread at its next call), at the latest at the
    epoch's end.

    Args:
        label: what is training (``pretrain``, ``finetune``, ``baseline``).
        examples_per_step: batch size, to report sequences per second.
        log_every_seconds: at most one progress line per this many seconds within an epoch
            (step/steps, loss, sequences/s, ETA); 0 logs one per call into the compiled step.
        estimate_steps: after the first step (which compiles), time this many steps and log the
            estimated training time; 0 skips the estimate.
        slow_hint: logged as a warning with the estimate (e.g. "run it on a GPU worker ..."),
            when the caller knows this machine is the wrong one for the job.
        nan_fix: the fix a NaN loss's error names (e.g. the learning-rate key and its value).
        loss_ceiling: an epoch loss above this is diverging, though finite: a warning says so
            with ``nan_fix`` (pretraining: twice a uniform guess's, 2 ln(vocabulary size)).
        end_note: logged when training ends, after "<label>: training ended after N s; ": what comes
            next, for a task log that would otherwise be silent until it is done.
        resumed_steps: steps of the first epoch an earlier try trained (a mid-epoch resume: fit's data
            starts after them), left out of the estimate and the ETA.

    Attributes:
        first_loss: the loss after the first call into the compiled step (``None`` before): Keras's
            running mean over that call's steps.
        timed_steps: the steps the estimate timed (whole calls: ``estimate_steps`` or a few more).
        step_seconds: the measured seconds per step (``None`` before the estimate).
        left_out: the steps the estimate left out because JAX compiled during them.
        compiling: the seconds JAX has spent compiling since training began.
    """

    first_loss: float | None = None
    step_seconds: float | None = None
    timed_steps = 0
    left_out = 0
    # Keras's CallbackList: run on_train_batch_end on a thread of its own (keras-team/keras#20284).
    async_safe = True

    def __init__(
        self,
        label: str,
        examples_per_step: int,
        log_every_seconds: float = 60.0,
        estimate_steps: int = 0,
        slow_hint: str | None = None,
        nan_fix: str = NAN_FIX,
        loss_ceiling: float | None = None,
        end_note: str | None = None,
        resumed_steps: int = 0,
    ):
        super().__init__()
        self.end_note, self.resumed_steps = end_note, resumed_steps
        self.label, self.examples_per_step, self.nan_fix = label, examples_per_step, nan_fix
        self.loss_ceiling = loss_ceiling
        self.epoch = 0
        self.first_epoch: int | None = None
        # The last finite loss read (epoch, step, value): where a NaN's error says training still held.
        self.last_finite: tuple[int, int, float] | None = None
        self.log_every_seconds, self.estimate_steps, self.slow_hint = log_every_seconds, estimate_steps, slow_hint
        self.train_t0 = self.epoch_t0 = self.last_line_t = 0.0
        self.first_call: tuple[int, float] | None = None
        self.val_t0: float | None = None
        self.epoch_steps = self.steps_seen = 0
        self.estimate_from: tuple[int, float, float] | None = None
        self.compiling = 0.0  # seconds JAX has spent compiling since training began
        # The first step of each call fit has begun and this callback has not yet taken the end of.
        self.calls: collections.deque[int] = collections.deque()
        self.turn = threading.Condition()

    def on_train_begin(self, logs=None):
        self.train_t0 = self.last_line_t = time.monotonic()
        _listen_to_compiling()
        _TRAINING.add(self)

    def on_train_end(self, logs=None):
        _TRAINING.discard(self)
        if self.end_note:
            log.info("%s: training ended after %.1f s; %s", self.label, time.monotonic() - self.train_t0, self.end_note)

    def on_epoch_begin(self, epoch, logs=None):
        with self.turn:  # Keras has waited for every batch end of the epoch before: only a failed fit's are left
            self.calls.clear()
        self.epoch_t0 = time.monotonic()
        self.epoch_steps = 0
        self.epoch = epoch
        if self.first_epoch is None:  # fit's initial_epoch: a resumed run starts past 0
            self.first_epoch = epoch
        # The epoch line's seq/s is training's steady state: timed from the end of the epoch's first
        # call into the compiled step (the run's first also compiles it) to the start of validation.
        self.first_call = None
        self.val_t0 = None

    def on_test_begin(self, logs=None):
        if self.val_t0 is None:  # fit's validation at the epoch's end
            # fit has only dispatched the epoch's last calls: validation begins once they are done (their
            # batch ends, taken on Keras's threads, say so). Stamped earlier, training's last seconds were
            # counted as validation's, and seq/s read 2.5 times the progress lines'.
            with self.turn:
                self.turn.wait_for(lambda: not self.calls, timeout=600)
            self.val_t0 = time.monotonic()

    def read_loss(self, logs, step: int) -> float | None:
        """Read the loss (waits for the device) and raise :class:`NonFiniteLoss` on NaN (fit stops)."""
        loss = (logs or {}).get("loss")
        if loss is None:
            return None
        value = float(loss)
        if not math.isfinite(value):
            held = ""
            if self.last_finite:
                epoch, at, last = self.last_finite
                held = f" (last read finite: {last:.4f} at step {at} of epoch {epoch + 1})"
            raise NonFiniteLoss(
                f"{self.label}: loss became {value} at step {step} of epoch {self.epoch + 1}{held}; {self.nan_fix}"
            )
        self.last_finite = (self.epoch, step, value)
        return value

    def on_train_batch_begin(self, batch, logs=None):
        with self.turn:
            self.calls.append(batch)

    def on_train_batch_end(self, batch, logs=None):
        # ``batch`` is the last step of this call: with steps_per_execution > 1 a call runs several.
        with self.turn:
            # Keras's threads may run out of order: this call's turn comes once every earlier one is taken.
            # (Driven without on_train_batch_begin, as a test does, there is no order to keep.)
            self.turn.wait_for(lambda: len(self.calls) < 2 or self.calls[1] > batch, timeout=300)
            try:
                self.call_ended(batch, logs)
            finally:
                if self.calls:
                    self.calls.popleft()
                self.turn.notify_all()

    def call_ended(self, batch, logs) -> None:
        self.steps_seen += batch + 1 - self.epoch_steps
        self.epoch_steps = batch + 1
        if self.first_call is None:
            self.first_call = (self.epoch_steps, time.monotonic())
        if self.first_loss is None:
            self.first_loss = self.read_loss(logs, self.epoch_steps)
            # Steps after the first, which also compiled the step function, are timed from here.
            self.estimate_from = (self.steps_seen, time.monotonic(), self.compiling)
            return
        if self.estimate_steps and self.step_seconds is None and self.estimate_from:
            done, t0, compiled = self.estimate_from
            if self.steps_seen - done >= self.estimate_steps:
                self.read_loss(logs, self.epoch_steps)
                now = time.monotonic()
                # Compiling overlaps the device's queued steps: subtracting its seconds under-counts them.
                if self.compiling - compiled > 0.05 * (now - t0) and self.left_out < MAX_LEFT_OUT:
                    self.left_out += self.steps_seen - done
                    self.estimate_from = (self.steps_seen, now, self.compiling)
                else:
                    self.timed_steps = self.steps_seen - done  # whole calls: estimate_steps or more
                    self.step_seconds = (now - t0) / self.timed_steps
                    self.log_estimate()
        now = time.monotonic()
        if now - self.last_line_t >= self.log_every_seconds:
            self.last_line_t = now
            self.log_progress(logs, now)

    def steady_rate(self, until: float) -> float:
        """Sequences per second in this epoch up to ``until``, its first call (compiling) left out.

        With a single call so far there is nothing else to time, and the whole epoch counts.
        """
        steps, since = self.epoch_steps, self.epoch_t0
        if self.first_call and self.epoch_steps > self.first_call[0]:
            steps, since = self.epoch_steps - self.first_call[0], self.first_call[1]
        return steps * self.examples_per_step / (until - since) if until > since else float("nan")

    def total_steps(self) -> int | None:
        """The steps this fit runs: a run resumed at epoch k runs ``epochs - k`` of them, not all, less the
        steps of epoch k an earlier try trained."""
        p = self.params or {}
        if not (p.get("epochs") and p.get("steps")):
            return None
        return (p["epochs"] - (self.first_epoch or 0)) * p["steps"] - self.resumed_steps

    def log_estimate(self) -> None:
        total = self.total_steps()
        if total is None:
            return
        seconds = total * self.step_seconds
        # Shapes met later compile then: the estimate covers steps, and a run of many batch shapes (fine-tuning's
        # length buckets) said 1.8 s where its epoch took 60 s. The compiling so far says how much that can be.
        later = (
            f", + compiling each batch shape met for the first time ({_fmt_seconds(self.compiling)} compiling so far)"
            if self.left_out
            else ""
        )
        log.info(
            "%s: %.1f ms/step measured over %d steps%s; estimated training time %s for %d steps (+ validation%s)",
            self.label,
            1000 * self.step_seconds,
            self.timed_steps,
            f" (after {self.left_out} in which JAX compiled other shapes)" if self.left_out else "",
            _fmt_seconds(seconds),
            total,
            later,
        )
        if self.slow_hint:
            log.warning("%s: estimated %s here; %s", self.label, _fmt_seconds(seconds), self.slow_hint)

    def log_progress(self, logs, now: float) -> None:
        loss = self.read_loss(logs, self.epoch_steps)
        steps = (self.params or {}).get("steps")
        rate = self.steady_rate(now)
        total = self.total_steps()
        # The ETA runs at the rate measured now, not the run's average, which counts compiling.
        left = (total - self.steps_seen) * self.examples_per_step / rate if total and rate > 0 else float("nan")
        log.info(
            "%s progress: epoch step %d/%s loss=%.4f seq/s=%.0f eta=%s",
            self.label,
            self.epoch_steps,
            steps or "?",
            loss if loss is not None else float("nan"),
            rate,
            _fmt_seconds(left),
        )

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss = self.read_loss(logs, self.epoch_steps)
        if self.loss_ceiling is not None and loss is not None and loss > self.loss_ceiling:
            # Finite but far worse than guessing: the model that comes out of this is no use, and
            # without this line the run would end "success" with it.
            log.warning(
                "%s: epoch %d loss %.4f is above %.2f, twice what a uniform guess scores: training is diverging; %s",
                self.label,
                epoch + 1,
                loss,
                self.loss_ceiling,
                self.nan_fix,
            )
        now = time.monotonic()
        seconds = now - self.epoch_t0
        rate = self.steady_rate(now if self.val_t0 is None else self.val_t0)
        metrics = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(logs.items()) if _is_number(v))
        total = self.params.get("epochs") if self.params else "?"
        log.info(
            "%s epoch %d/%s: %s steps=%d seq/s=%.0f val_s=%.1f epoch_s=%.1f elapsed_s=%.1f",
            self.label,
            epoch + 1,
            total,
            metrics,
            self.epoch_steps,
            rate,
            0.0 if self.val_t0 is None else now - self.val_t0,
            seconds,
            now - self.train_t0,
        )


def latest_backup(directory: str | os.PathLike) -> tuple[int, Path | None]:
    """The newest complete backup :class:`StepBackup` left in ``directory``: ``(steps done, its file)``.

    ``(0, None)`` when there is none. Only complete backups carry the ``step-*`` name (they are
    written under a temp name and renamed), so a half-written one is never picked.
    """
    found = [(int(f.name.split(".")[0].removeprefix("step-")), f) for f in Path(directory).glob(BACKUP_GLOB)]
    return max(found, default=(0, None))


def checksum_file(backup: Path) -> Path:
    return backup.with_name(backup.name + CHECKSUM_SUFFIX)


def backup_problem(backup: Path) -> str | None:
    """Why ``backup`` may not be resumed from (no checksum beside it, or other bytes), or None."""
    recorded = checksum_file(backup)
    if not recorded.exists():
        return f"has no {recorded.name} to check it against"
    if (actual := layout.sha256_file(backup)) != recorded.read_text().strip():
        return f"differs from the sha256 written with it ({actual[:12]}... now)"
    return None


def sweep_dead_backups(directory: str | os.PathLike, label: str = "pretrain") -> None:
    """Delete the half-written backups a killed writer left in ``directory`` (a guide backup is ~115 MB;
    ``kill -9`` mid-write left one for good in every kept run folder). Only when no writer is alive there."""
    directory = Path(directory)
    if gone := layout.remove_dead_temps(directory, directory.glob(".step-*")):
        log.info("%s: deleted %d half-written backup(s) a killed try left in %s", label, len(gone), directory)


class StepBackup(keras.callbacks.Callback):
    """Backs up weights, optimizer state and the global step, so a killed fit can resume at the next step.

    A backup is due every ``every_steps`` steps into an epoch and at each epoch end (with
    ``every_steps`` 0 or at least ``steps_per_epoch``: epoch ends only). It is written when the next
    call into the compiled step begins (the first at or after the step it was due), or at the Keras
    epoch end, after validation and after the callbacks listed before this one (a ``CSVLogger`` there
    has written the epoch's history row). It is taken on fit's thread, between calls, from the state
    fit holds then; it overrides no ``on_train_batch_end``, which would make Keras read every call's
    logs on fit's thread (a device-to-host wait per call, see :class:`EpochLogger`). Weights that are
    no longer finite (a NaN loss's) are never backed up: :class:`NonFiniteLoss` is raised instead.
    ``model.save_weights`` holds the optimizer's variables too, its step count among them (which
    drives the learning-rate schedule).
    The step is in the file name and the file is renamed into place once complete, so a backup is
    either whole or absent and always agrees with its step; older backups are deleted after that.
    Its sha256 is written beside it first; a backup whose bytes no longer match it (or that has
    none) is logged, deleted and not resumed from: training starts again rather than continue from
    altered weights.

    Keras's own ``BackupAndRestore`` resumes at epoch granularity only; this one leaves the resume
    to the caller: :meth:`restore` the weights, and start the data and ``fit`` at ``steps_done``
    (``fit`` does not skip data on a resume).

    Args:
        directory: where backups go (created on the first one).
        steps_per_epoch: steps in one epoch of the training schedule.
        every_steps: steps between backups within an epoch; 0 = epoch ends only.
        label: names the training in a NaN error.
        nan_fix: the fix that error names.

    Attributes:
        steps_done: steps trained over every attempt: the newest backup's when created, then
            counting each step this callback sees.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        steps_per_epoch: int,
        every_steps: int = 0,
        label: str = "pretrain",
        nan_fix: str = NAN_FIX,
    ):
        super().__init__()
        self.label, self.nan_fix = label, nan_fix
        self.directory = Path(directory)
        self.steps_per_epoch, self.every_steps = steps_per_epoch, every_steps
        sweep_dead_backups(self.directory, label)
        self.steps_done, self.restore_from = latest_backup(self.directory)
        if self.restore_from is not None and (why := backup_problem(self.restore_from)):
            log.warning(
                "%s: backup %s %s: deleted, not resumed from; training starts at step 0",
                label,
                self.restore_from,
                why,
            )
            for path in (self.restore_from, checksum_file(self.restore_from)):
                path.unlink(missing_ok=True)
            self.steps_done, self.restore_from = 0, None
        self.epoch_start = self.steps_done
        self.last_logs = None

    def restore(self, model) -> int:
        """Load the newest backup into ``model`` (compiled); returns the steps it had done (0: none)."""
        if self.restore_from is None:
            return 0
        # An unbuilt optimizer has no variables to load into: Keras would skip its state.
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self.restore_from)
        import h5py
        import numpy as np

        states = seed_states(model)
        with h5py.File(self.restore_from, "r") as f:
            saved = np.asarray(f[SEED_STATES]) if SEED_STATES in f else None
        if saved is not None and len(saved) == len(states):
            for variable, state in zip(states, saved, strict=True):
                variable.assign(state)
        elif states:
            log.info(
                "%s: backup %s holds no dropout random state (%d expected): the resumed steps draw other dropout "
                "masks than an uninterrupted run would",
                self.label,
                self.restore_from,
                len(states),
            )
        return self.steps_done

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = self.steps_done

    def on_train_batch_begin(self, batch, logs=None):
        # ``batch`` is this call's first step: the steps before it in this Keras epoch are done.
        self.last_logs = None
        self.reach(self.epoch_start + batch)

    def on_epoch_end(self, epoch, logs=None):
        end = self.epoch_start + self.steps_per_epoch
        if (self.params or {}).get("epochs"):
            # A resumed fit's data ends mid-way through its last Keras epoch, at the end of training.
            end = min(end, self.params["epochs"] * self.steps_per_epoch)
        self.last_logs = logs
        self.reach(end)

    def reach(self, step: int) -> None:
        """Training is at ``step`` (steps done over every attempt): back up if a backup fell due since."""
        due = self.due_between(self.steps_done, step)
        self.steps_done = step
        if due:
            self.save()

    def due_between(self, done: int, now: int) -> bool:
        """Whether a backup point lies after step ``done`` and at or before ``now``."""
        per_epoch, every = self.steps_per_epoch, self.every_steps
        if now // per_epoch > done // per_epoch:  # an epoch ended
            return True
        if not every or every >= per_epoch:
            return False
        start = now // per_epoch * per_epoch
        return (now - start) // every > (done - start) // every

    def save(self) -> Path:
        """Write a backup of the model as it is now, at ``steps_done``; returns its file."""
        # Checked here, at the backup cadence, not every step: a backup never holds NaN weights.
        loss = (self.last_logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"{self.label}: loss became {float(loss)} by step {self.steps_done}; {self.nan_fix}")
        model = self.model  # under JAX, reading Callback.model syncs the state fit holds into the variables
        ops = keras.ops
        if not bool(ops.all(ops.stack([ops.all(ops.isfinite(v)) for v in model.trainable_variables]))):
            raise NonFiniteLoss(
                f"{self.label}: the weights are no longer finite by step {self.steps_done} (the loss became NaN or "
                f"infinite): not backed up; {self.nan_fix}"
            )
        final = self.directory / f"step-{self.steps_done:012d}.weights.h5"
        self.directory.mkdir(parents=True, exist_ok=True)
        layout.require_room(final, backup_size(model), f"a backup of {self.label}")
        with layout.atomic_path(final, suffix=".weights.h5") as tmp:
            model.save_weights(tmp)
            if states := seed_states(model):
                import h5py
                import numpy as np

                with h5py.File(tmp, "a") as f:
                    f.create_dataset(SEED_STATES, data=np.stack([np.asarray(v) for v in states]))
            with layout.atomic_path(checksum_file(final)) as sidecar:
                sidecar.write_text(layout.sha256_file(tmp) + "\n")
        for old in self.directory.glob(BACKUP_GLOB):
            if old != final:
                old.unlink(missing_ok=True)
                checksum_file(old).unlink(missing_ok=True)
        return final


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
