"""The shared runtime: the dtype policy each precision setting resolves to."""

from __future__ import annotations

from encoderflow import runtime


def test_precision_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert runtime.dtype_policy("auto", "gpu") == "mixed_bfloat16"
    assert runtime.dtype_policy("auto", "tpu") == "mixed_bfloat16"
    assert runtime.dtype_policy("auto", "cpu") == "float32"
    assert runtime.dtype_policy("mixed_float16", "cpu") == "mixed_float16"
    assert runtime.dtype_policy("auto") == "float32"  # this machine has no accelerator


NATIVE_PROBE = r"""
import logging, os, sys
from encoderflow import runtime

records = []
class Keep(logging.Handler):
    def emit(self, r): records.append((r.levelname, r.getMessage()))
runtime.native_log.addHandler(Keep())
runtime.native_log.setLevel(logging.DEBUG)
with runtime.native_stderr_to_log():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"I0000 00:00:1.0  1 port.cc:153] oneDNN custom operations are on.\n")
    os.write(2, b"E0000 00:00:1.0  1 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
    os.write(2, b"E0000 00:00:1.0  1 op_kernel.cc:1830] a native error of TensorFlow's own\n")
    print("a python line on stderr", file=sys.stderr, flush=True)
print(records)
"""


def test_native_start_up_lines_are_logged_at_their_own_level_not_as_errors():
    """TensorFlow's C++ notes on fd 2 would be ERROR lines in a task log; they become log records, and
    its CUDA probe (every CPU machine's "failed call to cuInit") a DEBUG one."""
    import ast
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", NATIVE_PROBE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    records = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    # The CUDA probe is about devices TensorFlow is never given: DEBUG, whatever its letter says.
    assert [level for level, _ in records] == ["DEBUG", "DEBUG", "DEBUG", "WARNING"], records
    assert records[2][1] == "native (cuda_platform.cc:52): failed call to cuInit: UNKNOWN ERROR (303)"
    assert records[3][1] == "native (op_kernel.cc:1830): a native error of TensorFlow's own"
    # Nothing native reaches stderr any more; Python's own stderr lines pass through untouched.
    assert "a python line on stderr" in proc.stderr
    assert "cuInit" not in proc.stderr and "oneDNN" not in proc.stderr
