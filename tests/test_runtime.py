"""The shared runtime: the dtype policy each precision setting resolves to."""

from __future__ import annotations

import os
import sys

from encoderflow import runtime


def test_precision_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert runtime.dtype_policy("auto", "gpu") == "mixed_bfloat16"
    assert runtime.dtype_policy("auto", "tpu") == "mixed_bfloat16"
    assert runtime.dtype_policy("auto", "cpu") == "float32"
    assert runtime.dtype_policy("mixed_float16", "cpu") == "mixed_float16"
    # Asked of this machine's JAX: float32 on a CPU-only venv, bfloat16 under ACCEL=cuda12 on a GPU.
    import jax

    assert runtime.dtype_policy("auto") == ("float32" if jax.default_backend() == "cpu" else "mixed_bfloat16")


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


CACHE_PROBE = r"""
import collections, json
from encoderflow import runtime

folder = runtime.use_compilation_cache()
import jax, jax.numpy as jnp

events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **_: events.update([event.rsplit("/", 1)[-1]]))
jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.0)(jnp.ones((8, 8)))
print(json.dumps({"folder": folder, "hits": events["cache_hits"], "misses": events["cache_misses"]}))
"""


def test_compiled_programs_are_kept_under_encoderflow_home_for_the_next_process(tmp_path):
    """A task's second process (a retry, the next run) reads what the first compiled; JAX's own
    settings still choose another folder or switch the cache off."""
    import json
    import subprocess
    import sys

    def probe(**env: str) -> dict:
        base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
        run = subprocess.run(
            [sys.executable, "-c", CACHE_PROBE],
            env=base | {"ENCODERFLOW_HOME": str(tmp_path / "home")} | env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    first, second = probe(), probe()
    assert first["folder"] == str(tmp_path / "home" / "cache" / "jax"), first
    assert first["misses"] >= 1 and first["hits"] == 0, first
    assert second["hits"] >= 1 and second["misses"] == 0, second
    assert any(p.name.endswith("-cache") for p in (tmp_path / "home" / "cache" / "jax").iterdir())

    elsewhere = probe(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "elsewhere"))
    assert elsewhere["folder"] == str(tmp_path / "elsewhere") and elsewhere["misses"] >= 1, elsewhere
    off = probe(JAX_ENABLE_COMPILATION_CACHE="false")
    assert off["folder"] is None and off["hits"] == 0, off


def test_tensorflow_that_initialised_its_gpus_first_is_named_not_passed_over(monkeypatch, caplog):
    """A RuntimeError from set_visible_devices used to be ignored, leaving TensorFlow on the GPUs."""
    import types

    def initialised(devices, kind):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    for visible, warned in ((["/physical_device:GPU:0"], True), ([], False)):
        fake = types.ModuleType("tensorflow")
        fake.config = types.SimpleNamespace(
            set_visible_devices=initialised, get_visible_devices=lambda kind, v=visible: v
        )
        monkeypatch.setitem(sys.modules, "tensorflow", fake)
        monkeypatch.setitem(sys.modules, "tensorflow_text", types.ModuleType("tensorflow_text"))
        monkeypatch.setattr(runtime, "_tf", None)
        caplog.clear()
        with caplog.at_level("WARNING", logger="encoderflow.runtime"):
            assert runtime.tensorflow() is fake
        assert ("TensorFlow initialised 1 GPU(s) before encoderflow could hide them" in caplog.text) is warned
