"""The runtime every ML step shares: Keras on JAX, TensorFlow on the CPU only, the dtype policy.

TensorFlow feeds data (tf.data, WordPiece ops) and never owns an accelerator; JAX does. Both
rules must hold before either library is imported, so every module that needs Keras or
TensorFlow goes through here instead of importing them at its top.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import threading

from encoderflow import layout

BACKEND = "jax"
# [workers] execution_api_retries for every topology. Airflow's 5 give up after about 30 s: a task the
# scheduler re-queued at start (an orphan after a crash) failed its last try before a slow api-server
# listened. 10 wait up to about 5 minutes (random exponential back-off, 90 s at most between tries).
WORKER_API_RETRIES = "10"
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


# Compiled programs kept between processes; an entry reused past this many bytes in all is evicted
# least recently used first. Setting a bound also makes JAX lock the folder around each read and
# write, which the Celery workers sharing ENCODERFLOW_HOME need: JAX writes an entry in place.
COMPILATION_CACHE_MAX_BYTES = 4 << 30


def use_jax() -> None:
    """Select the JAX backend for Keras; must run before the first ``import keras``."""
    os.environ.setdefault("KERAS_BACKEND", BACKEND)
    use_compilation_cache()


@functools.cache  # once per process: use_jax() runs on every keras() call
def use_compilation_cache() -> str | None:
    """Keep XLA's compiled programs under ``ENCODERFLOW_HOME/cache/jax`` across processes.

    Each Airflow task is a fresh process that compiles its model's steps again; with JAX's
    persistent compilation cache, a retry, the next run of the same config or the second task
    with the same shapes reads them instead (a smoke run here: 80 s cold, 58 s warm). The key
    covers the program, the JAX version, the device and the compile options, so a changed config
    compiles anew. JAX's own settings win: ``JAX_COMPILATION_CACHE_DIR`` (another folder),
    ``JAX_ENABLE_COMPILATION_CACHE=false`` (off), ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``
    (by default every program is kept: most compile in well under JAX's 1 s threshold, and a
    task compiles dozens of them) and ``JAX_COMPILATION_CACHE_MAX_SIZE``.

    Returns:
        The cache folder, or ``None`` where JAX's cache is switched off.
    """
    import jax

    if not jax.config.jax_enable_compilation_cache:
        return None
    folder = jax.config.jax_compilation_cache_dir
    if not folder:
        folder = str(layout.home() / "cache" / "jax")
        jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    return folder


def keras():
    """``keras``, imported on the JAX backend."""
    use_jax()
    import keras as k

    return k


native_log = logging.getLogger("encoderflow.native")
# Where nothing configured logging (the CLI's screens), these notes stay off the terminal, as a
# library's should; a configured root logger (Airflow's task log) still receives them.
native_log.addHandler(logging.NullHandler())
# glog/absl severities of TensorFlow's C++ start-up lines ("I0000 …", "E0000 …"): none of them is an
# error of ours (a real failure raises in Python), so none reaches a task log at ERROR level.
_SEVERITY = {"I": logging.DEBUG, "W": logging.INFO, "E": logging.WARNING, "F": logging.ERROR}
# "E0000 00:00:1795.1  4930 cuda_platform.cc:52] failed call to cuInit …": severity, source, message.
_GLOG = re.compile(r"^([IWEF])\d{4} (?:\S+\s+\d+ (\S+)\] (.*))?")


_NATIVE_NOTES = (
    "WARNING: All log messages before absl::InitializeLog()",  # absl's preamble to the first line
    "To enable the following instructions:",  # the second line of cpu_feature_guard's note
)


def _native_record(line: str) -> tuple[int, str, str] | None:
    """``(level, source, message)`` of a native start-up line; ``None`` for anything else."""
    if line.startswith(_NATIVE_NOTES):
        return logging.DEBUG, "absl", line
    m = _GLOG.match(line)
    if m is None:
        return None
    source = m.group(2) or "absl"
    # The glog header's letter is the severity, now the record's level: not repeated in the message.
    # Except TensorFlow's CUDA probe ("failed call to cuInit" on every machine without a driver): it is
    # about devices TensorFlow is told never to use (``tensorflow()`` hides them), nothing to act on.
    level = logging.DEBUG if source.startswith("cuda_") else _SEVERITY[m.group(1)]
    return level, source, m.group(3) if m.group(2) else line


@contextlib.contextmanager
def native_stderr_to_log():
    """Route what native code writes to file descriptor 2 meanwhile into ``encoderflow.native``.

    TensorFlow's C++ runtime prints its start-up notes (oneDNN, CUDA probing, absl's preamble)
    straight to stderr, which Airflow files at ERROR level in the task log. Inside this block
    they are logged line by line at their own severity instead (see ``_SEVERITY``).
    """
    sys.stderr.flush()
    saved, (read_end, write_end) = os.dup(2), os.pipe()
    records: list[tuple[int, str, str]] = []

    def drain():
        with os.fdopen(read_end, "r", errors="replace") as pipe:
            for line in pipe:
                record = _native_record(line.rstrip("\n"))
                if record is None:  # Python's own stderr (log handlers, warnings): as it was
                    os.write(saved, line.encode(errors="replace"))
                else:
                    records.append(record)

    reader = threading.Thread(target=drain, name="native-stderr", daemon=True)
    reader.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees EOF
        reader.join(timeout=10)  # before closing ``saved``, which it still writes pass-through lines to
        os.close(saved)
        for level, source, message in records:
            native_log.log(level, "native (%s): %s", source, message)


_tf = None  # set once: GPUs hidden, even where another library imported TensorFlow first


def tensorflow(optional: bool = False):
    """TensorFlow with its GPUs hidden: it only feeds data, JAX owns the accelerator.

    Imported (with tensorflow-text, which keras-hub loads) while its native start-up notes are
    routed to the log at their own level. ``optional``: return ``None`` where TensorFlow is not
    installed (the GPU check runs without it).
    """
    global _tf
    if _tf is not None:
        return _tf
    with native_stderr_to_log():
        try:
            import tensorflow as tf
        except ImportError:
            if optional:
                return None
            raise
        with contextlib.suppress(ImportError):
            import tensorflow_text  # noqa: F401  (keras-hub's tokenizers load it; its .so logs too)
        try:
            tf.config.set_visible_devices([], "GPU")  # probes CUDA: the "failed call to cuInit" line
        except RuntimeError:  # another import initialised TensorFlow's devices before this call
            if gpus := tf.config.get_visible_devices("GPU"):
                logging.getLogger(__name__).warning(
                    "TensorFlow initialised %d GPU(s) before encoderflow could hide them, and may hold memory "
                    "JAX needs: call encoderflow.runtime.tensorflow() before anything else uses TensorFlow",
                    len(gpus),
                )
    _tf = tf
    return tf


def on_cpu() -> bool:
    """Whether JAX computes on the host CPU here (no accelerator it can use)."""
    import jax

    return jax.default_backend() not in ACCELERATORS


def device_summary() -> str:
    """``1 x NVIDIA H100 80GB HBM3 (gpu)``, or ``1 x cpu``: what JAX trains on here."""
    import jax

    devices = jax.devices()
    kind, platform = devices[0].device_kind, devices[0].platform
    return f"{len(devices)} x {kind}" + ("" if kind.lower() == platform.lower() else f" ({platform})")


def dtype_policy(precision: str, platform: str | None = None) -> str:
    """``auto``: bfloat16 compute where the accelerator has it, float32 on a CPU.

    Args:
        precision: ``pretrain.precision`` (``auto`` or a Keras dtype policy name).
        platform: the JAX backend; ``None`` asks JAX.
    """
    if precision != "auto":
        return precision
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "mixed_bfloat16" if platform in ACCELERATORS else "float32"


def set_dtype_policy(precision: str) -> str:
    """Resolve ``precision`` and make it Keras's global policy; returns the policy's name."""
    policy = dtype_policy(precision)
    keras().config.set_dtype_policy(policy)
    return policy
