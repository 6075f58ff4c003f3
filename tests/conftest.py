"""Shared fixtures: an isolated ENCODERFLOW_HOME per test, tiny data files, a loopback HTTP server."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import tempfile

import pytest

# One JAX compilation cache for the session (this process, the `encoderflow run` and Airflow
# processes it starts): a test's programs compile once, not once per test, and no test reads a
# cache a previous session left. Set before JAX is first imported, which reads it then.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="encoderflow-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)

from encoderflow import runtime  # noqa: E402

runtime.use_jax()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# A suite started in the background by a non-interactive shell (`(nohup make test &)`) ignores SIGINT,
# and every process it starts inherits that: the Ctrl-C tests' commands never saw their signal and
# timed out (measured: 2 failures in an otherwise green fresh-clone run). Their own handler again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    with contextlib.suppress(ValueError):  # not the main thread: nothing to restore from here
        signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

# The loopback HTTP server fixture, for every test that downloads.
pytest_plugins = ["tests.data.fixtures_http"]


@pytest.fixture(autouse=True)
def encoderflow_home(tmp_path, monkeypatch):
    """Every test writes its artifacts under its own temporary ENCODERFLOW_HOME."""
    home = tmp_path / "efhome"
    monkeypatch.setenv("ENCODERFLOW_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ENCODERFLOW_MIRROR", raising=False)
    monkeypatch.delenv("ENCODERFLOW_SOURCES", raising=False)
    return home


# The end-to-end files start Airflow (and the stack its servers): run side by side they starve each
# other of the two cores CI has and miss their time-bounded waits. Under `make test`'s workers
# (pytest-xdist, --dist loadfile) they are one scope, run first on one worker, while the other
# workers take every other file whole (module fixtures built once). xdist's own `xdist_group` mark
# cannot do it here: xdist 3.8 renames a grouped test's nodeid through an attribute pytest 9.2 no
# longer reads, so every grouped test is scheduled alone.
END_TO_END = ("tests/test_stack.py", "tests/test_pipeline.py", "tests/test_airflow_api.py")


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    # Stable: the end-to-end scope is queued first, the other files keep their order.
    items.sort(key=lambda item: _file(item.nodeid) not in END_TO_END)


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class EndToEndFirst(LoadScopeScheduling):
        """``loadfile``, the end-to-end files one scope (xdist's own schedulers differ only here too)."""

        def _split_scope(self, nodeid: str) -> str:
            return "end-to-end" if _file(nodeid) in END_TO_END else _file(nodeid)

    return EndToEndFirst(config, log)
