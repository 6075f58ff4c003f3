"""The runtime every ML step shares: Keras on JAX, TensorFlow on the CPU only, the dtype policy.

TensorFlow feeds data (tf.data, WordPiece ops) and never owns an accelerator; JAX does. Both
rules must hold before either library is imported, so every module that needs Keras or
TensorFlow goes through here instead of importing them at its top.
"""

from __future__ import annotations

import os

BACKEND = "jax"
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def use_jax() -> None:
    """Select the JAX backend for Keras; must run before the first ``import keras``."""
    os.environ.setdefault("KERAS_BACKEND", BACKEND)


def keras():
    """``keras``, imported on the JAX backend."""
    use_jax()
    import keras as k

    return k


def tensorflow():
    """TensorFlow with its GPUs hidden: it only feeds data, JAX owns the accelerator."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised in this process; visibility was set earlier
        pass
    return tf


def on_cpu() -> bool:
    """Whether JAX computes on the host CPU here (no accelerator it can use)."""
    import jax

    return jax.default_backend() not in ACCELERATORS


def device_summary() -> str:
    """``1 x NVIDIA H100 80GB HBM3 (gpu)``: what JAX trains on here."""
    import jax

    devices = jax.devices()
    return f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"


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
