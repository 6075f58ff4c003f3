"""The Makefile's venv: jax[cpu] or jax[cuda12] (detected from nvidia-smi, ACCEL overrides), one stamp per flavour.

Everything but the dry-run resolution runs `make -n` or stops before pip, so it needs no network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JAX_VERSION = next(
    line.split("==", 1)[1] for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("jax==")
)

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def make(*args: str, path: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ACCEL", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def fake_nvidia_smi(tmp_path: Path, listing: str, rc: int = 0) -> str:
    """A PATH whose nvidia-smi prints ``listing``; the rest of PATH stays (make, sed, grep)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\nprintf '%s' '{listing}'\nexit {rc}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.mark.parametrize("accel, wanted, unwanted", [("cuda12", "cuda12", "cpu"), ("cpu", "cpu", "cuda12")])
def test_accel_picks_the_jax_flavour(accel, wanted, unwanted):
    r = make("-n", "-B", f"ACCEL={accel}", "venv")
    assert r.returncode == 0, r.stderr
    assert f"jax[{wanted}]=={JAX_VERSION}" in r.stdout
    assert f"jax[{unwanted}]" not in r.stdout
    assert f".venv/.installed-{accel}" in r.stdout
    assert "pip check" in r.stdout


def test_an_unknown_accel_is_refused_clearly():
    for bad in ("rocm", "cpu cuda12", ""):
        r = make("-n", f"ACCEL={bad}", "venv")
        assert r.returncode != 0
        assert f"ACCEL='{bad}' is not supported" in r.stderr and "ACCEL=cpu or ACCEL=cuda12" in r.stderr, r.stderr
        assert "pip install" not in r.stdout


@pytest.mark.parametrize(
    "listing, rc, accel",
    [
        ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\n", 0, "cuda12"),
        ("", 9, "cpu"),  # nvidia-smi present, no driver: it fails and lists nothing
        ("No devices were found\n", 6, "cpu"),
    ],
)
def test_accel_is_detected_from_nvidia_smi(tmp_path, listing, rc, accel):
    r = make("-n", "-B", "venv", path=fake_nvidia_smi(tmp_path, listing, rc))
    assert r.returncode == 0, r.stderr
    assert f"jax[{accel}]=={JAX_VERSION}" in r.stdout


def test_switching_accel_removes_the_other_flavours_venv(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed-cpu").touch()
    (venv / "marker").touch()
    # PYTHON=false stops the recipe right after the switch, before any pip call.
    r = make(f"VENV={venv}", "ACCEL=cuda12", "PYTHON=false", "venv")
    assert r.returncode != 0
    assert "was built for cpu, ACCEL=cuda12 asked: rebuilding it" in r.stdout
    assert not venv.exists()


def test_an_up_to_date_stamp_makes_reruns_free(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".installed-cpu"
    stamp.touch()
    later = time.time() + 60
    os.utime(stamp, (later, later))
    r = make("-n", f"VENV={venv}", "ACCEL=cpu", "venv")
    assert r.returncode == 0, r.stderr
    assert "pip" not in r.stdout
    # The other flavour's stamp is not this one's: it would rebuild.
    r = make("-n", f"VENV={venv}", "ACCEL=cuda12", "venv")
    assert "jax[cuda12]" in r.stdout


def test_the_cuda_wheels_are_pinned_in_constraints():
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["jax-cuda12-plugin"] == pins["jax-cuda12-pjrt"] == pins["jaxlib"] == JAX_VERSION
    assert any(name.startswith("nvidia-cudnn-cu12") for name in pins)
    text = (REPO / "requirements.txt").read_text()
    assert re.search(r"^tensorflow==", text, re.M) and "tensorflow[and-cuda]==" not in text


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    return {
        _normal(name): version
        for name, version in (
            line.split("==", 1)
            for line in (REPO / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")
        )
    }


def assert_at_pins(installed: dict[str, str], *unpinned_ok: str) -> None:
    """Every installed distribution is pinned in constraints.txt, at its pin. pip freeze leaves out
    setuptools and wheel, so constraints.txt does not pin them (nor pip, nor ``unpinned_ok``)."""
    pins = _pins()
    unpinned = {
        n: v for n, v in installed.items() if n not in pins and n not in ("setuptools", "wheel", "pip", *unpinned_ok)
    }
    assert not unpinned, f"not pinned in constraints.txt: {unpinned}"
    assert {n: (v, pins[n]) for n, v in installed.items() if n in pins and pins[n] != v} == {}
    assert installed["jax"] == JAX_VERSION


def test_the_venv_running_these_tests_holds_every_package_at_its_pin():
    """The cpu set as `make venv` installed it (CI builds it): each distribution at its constraints.txt pin."""
    from importlib import metadata

    installed = {_normal(d.metadata["Name"]): d.version for d in metadata.distributions()}
    assert_at_pins(installed, "encoderflow")  # encoderflow is this checkout
    assert not any(n.startswith(("jax-cuda", "nvidia-")) for n in installed), "a CUDA package in the cpu venv"


# The cpu set is checked above on the venv itself; resolving it from scratch again would only repeat that.
@pytest.mark.slow
def test_the_cuda12_dry_run_resolves_every_package_to_its_pin(tmp_path):
    """Needs the package registry. The whole cuda12 set resolves from scratch, each to its constraints.txt pin."""
    report = tmp_path / "report.json"
    r = make("ACCEL=cuda12", f"REPORT={report}", "venv-dry-run", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Would install" in r.stdout
    installed = {
        _normal(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    assert_at_pins(installed)
    assert "jax-cuda12-plugin" in installed and "tensorflow" in installed
