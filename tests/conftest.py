"""Shared fixtures: an isolated ENCODERFLOW_HOME per test, tiny data files, a loopback HTTP server."""

from __future__ import annotations

import os

import pytest

from encoderflow import runtime

runtime.use_jax()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
