"""The shared runtime: the dtype policy each precision setting resolves to."""

from __future__ import annotations

from encoderflow import runtime


def test_precision_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert runtime.dtype_policy("auto", "gpu") == "mixed_bfloat16"
    assert runtime.dtype_policy("auto", "tpu") == "mixed_bfloat16"
    assert runtime.dtype_policy("auto", "cpu") == "float32"
    assert runtime.dtype_policy("mixed_float16", "cpu") == "mixed_float16"
    assert runtime.dtype_policy("auto") == "float32"  # this machine has no accelerator
