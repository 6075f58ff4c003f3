"""``encoderflow doctor``: one line per check, the fix when not ok, exit 0 only when a run can start.

The data checks run against an offline folder (the shared copy, or tiny files in a temp folder) and
against a loopback HTTP server; nothing here touches the internet.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import socket
import time
import types
from pathlib import Path

import pytest

from encoderflow import cli, doctor
from encoderflow.config import PRESETS
from encoderflow.data import sources

from .data.fixtures_http import STALL, STALL_MAX_S

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ALL_MEMBERS = [m for s in sources.DEFAULT_SPECS.values() for m in s.members]
TRAIN = "wikitext-103-raw/wiki.train.raw"


def offline_folder(root: Path, without: tuple[str, ...] = ()) -> Path:
    """Tiny stand-ins for every file of the offline layout, except ``without``."""
    for member in ALL_MEMBERS:
        if member not in without:
            path = root / member
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x\n")
    return root


def lines(out: str, status: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(status)]


def closed_port_url(path: str = "/gone.zip") -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def loopback_specs(lb, served: bool = True) -> dict[str, sources.DatasetSpec]:
    specs = {}
    for name, spec in sources.DEFAULT_SPECS.items():
        path = f"/official/{spec.filename}"
        if served:
            lb.files[path] = b"payload-" + name.encode()
        specs[name] = dataclasses.replace(spec, urls=(lb.url(path),))
    return specs


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared offline data at {SHARED}")
def test_doctor_passes_with_the_shared_data(capsys):
    assert cli.main(["doctor", "--data-dir", str(SHARED)]) == 0
    out = capsys.readouterr().out
    for what in ("python", "jax", "devices", "precision=auto", "tensorflow", "disk (ENCODERFLOW_HOME)"):
        assert any(line[6:].startswith(what) for line in lines(out, "ok")), (what, out)
    assert not lines(out, "FAIL"), out
    assert any("data (smoke preset)" in line and "complete" in line for line in lines(out, "ok")), out
    assert "sees no GPU" in out
    # The shared folder has no wiki.train.raw: the default preset cannot start here, and the last line says so.
    assert (
        out.rstrip()
        .splitlines()[-1]
        .startswith("doctor: a run can start, but not with presets guide (the default), recipe: see their warn lines")
    ), out


def test_a_missing_file_fails_naming_it_and_the_layout(tmp_path, capsys):
    folder = offline_folder(tmp_path / "offline", without=("SST-2/dev.tsv",))
    assert cli.main(["doctor", "--data-dir", str(folder)]) == 1
    out = capsys.readouterr().out
    fails = [line for line in lines(out, "FAIL") if "data (" in line]
    assert len(fails) == len(PRESETS), out  # every preset reads SST-2/dev.tsv
    for line in fails:
        assert str(folder / "SST-2" / "dev.tsv") in line and "fix:" in line
    assert f"expected layout under {folder}" in out
    for member in ALL_MEMBERS:
        assert f"  {member}\n" in out
    assert "a run would not start" in out


def test_a_folder_without_wikitext_train_suits_smoke_only(tmp_path, capsys):
    folder = offline_folder(tmp_path / "offline", without=(TRAIN,))
    checks = doctor.check_offline(folder, doctor._configs(None, []), sources.DEFAULT_SPECS, required=False)
    by_what = {c.what: c for c in checks}
    assert by_what["data (smoke preset)"].status == doctor.OK
    guide = by_what["data (guide preset)"]
    assert guide.status == doctor.WARN and TRAIN in guide.value and "data.pretrain_split=test" in guide.fix
    # Asking for the guide preset makes its files a requirement.
    assert cli.main(["doctor", "--data-dir", str(folder), "--preset", "guide"]) == 1
    out = capsys.readouterr().out
    assert any(TRAIN in line and "data (guide preset)" in line for line in lines(out, "FAIL")), out
    # ... unless an override pretrains on a split that is there.
    checks = doctor.check_offline(
        folder, doctor._configs("guide", ["data.pretrain_split=test"]), sources.DEFAULT_SPECS, required=True
    )
    assert [c.status for c in checks] == [doctor.OK]


def test_a_missing_offline_folder_fails(tmp_path):
    (check,) = doctor.check_offline(tmp_path / "nowhere", doctor._configs(None, []), sources.DEFAULT_SPECS, True)
    assert check.status == doctor.FAIL and "nowhere" in check.value and "--data-dir" in check.fix


def test_sources_that_answer_are_ok(http_server):
    checks = doctor.check_sources(loopback_specs(http_server), timeout=2)
    assert [c.status for c in checks] == [doctor.OK] * len(sources.DEFAULT_SPECS), checks
    assert all("answers (HTTP 200" in c.value for c in checks)


def test_unreachable_and_missing_sources_fail_with_the_fix(http_server):
    specs = loopback_specs(http_server, served=False)  # the server answers 404
    specs["vocab"] = dataclasses.replace(specs["vocab"], urls=(closed_port_url(),))
    checks = {c.what: c for c in doctor.check_sources(specs, timeout=2)}
    assert all(c.status == doctor.FAIL for c in checks.values()), checks
    assert "HTTP 404" in checks["source (sst2)"].value
    vocab = checks["source (vocab)"]
    assert "cannot connect" in vocab.value and specs["vocab"].urls[0] in vocab.value
    assert "--mirror" in vocab.fix and "--data-dir" in vocab.fix and "bert_vocab_uncased.txt" in vocab.fix


def test_a_mirror_without_the_file_warns_when_the_pinned_url_answers(http_server):
    specs = loopback_specs(http_server)
    http_server.files["/mirror/SST-2.zip"] = b"mirrored"
    checks = {c.what: c for c in doctor.check_sources(specs, mirror=http_server.url("/mirror/"), timeout=2)}
    assert checks["source (sst2)"].status == doctor.OK and "/mirror/SST-2.zip" in checks["source (sst2)"].value
    vocab = checks["source (vocab)"]
    assert vocab.status == doctor.WARN and "HTTP 404" in vocab.value and "mirror" in vocab.fix


def test_a_stalled_source_fails_within_the_timeout(http_server):
    specs = loopback_specs(http_server)
    path = "/official/bert_vocab_uncased.txt"
    http_server.script(path, STALL)  # HEAD is refused (501), the GET fallback then hangs
    t0 = time.monotonic()
    checks = {c.what: c for c in doctor.check_sources(specs, timeout=0.5)}
    # Returned on its own deadline (2 x timeout + 1 = 2 s), not when the server gave up on the stall: the
    # margin is for a loaded machine (a thread's first import of requests), far below the stall.
    assert time.monotonic() - t0 < STALL_MAX_S / 2
    assert checks["source (vocab)"].status == doctor.FAIL and "no answer within" in checks["source (vocab)"].value
    assert checks["source (sst2)"].status == doctor.OK


def test_doctor_command_probes_the_sources_file_urls(http_server, tmp_path, capsys):
    specs = loopback_specs(http_server)
    sources_file = tmp_path / "sources.json"
    payload = {name: {"urls": list(s.urls)} for name, s in specs.items()}
    payload["wikitext"]["urls"] = [closed_port_url("/wikitext-103-raw-v1.zip")]
    sources_file.write_text(json.dumps(payload))
    assert cli.main(["doctor", "--sources-file", str(sources_file), "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    (fail,) = lines(out, "FAIL")
    assert "source (wikitext)" in fail and "cannot connect" in fail and "fix:" in fail
    assert len([line for line in lines(out, "ok") if "source (" in line]) == 2


@pytest.mark.parametrize(
    "free, status",
    [
        (doctor.DISK_FAIL_BYTES - 1, doctor.FAIL),
        (doctor.DISK_WARN_BYTES - 1, doctor.WARN),
        (doctor.DISK_WARN_BYTES, doctor.OK),
    ],
)
def test_disk_check_reports_the_nearest_existing_folder(tmp_path, monkeypatch, free, status):
    seen = []

    def usage(path):
        seen.append(Path(path))
        return types.SimpleNamespace(total=100 * doctor.GIB, used=100 * doctor.GIB - free, free=free)

    monkeypatch.setattr(doctor.shutil, "disk_usage", usage)
    check = doctor.check_disk(tmp_path / "not" / "yet")
    assert seen == [tmp_path] and check.status == status
    assert "GiB free" in check.value and f"not created yet; {tmp_path}" in check.value
    assert bool(check.fix) == (status != doctor.OK)


def test_every_line_is_one_check_with_its_fix():
    assert doctor.Check(doctor.FAIL, "x", "bad", "do y").line().endswith("-> fix: do y")
    assert "fix" not in doctor.Check(doctor.OK, "x", "fine", "unused").line()


def test_a_file_that_cannot_be_read_fails_doctor_and_the_run_before_any_download(tmp_path, capsys):
    """Present is not readable: a vocabulary linked to a file every read of refuses passed doctor, then
    each download try failed as 'not an expected failure' and was retried for minutes."""
    from encoderflow.data.sources import DataError

    folder = offline_folder(tmp_path / "offline", without=("bert_vocab_uncased.txt",))
    (folder / "bert_vocab_uncased.txt").symlink_to("/proc/self/mem")  # a regular file; reading it fails (EIO)
    assert cli.main(["doctor", "--data-dir", str(folder), "--preset", "smoke"]) == 1
    (fail,) = [line for line in lines(capsys.readouterr().out, "FAIL") if "data (offline)" in line]
    assert f"cannot read bert_vocab_uncased.txt (Input/output error) under {folder}" in fail
    assert "fix: make it readable" in fail
    needs = {"bert_vocab": ("bert_vocab_uncased.txt",)}
    with pytest.raises(DataError, match=r"cannot read bert_vocab_uncased.txt \(Input/output error\)"):
        sources.check_offline(folder, needs)


def test_a_fifo_or_folder_where_a_file_belongs_is_named_for_what_it_is_and_nothing_says_complete(tmp_path, capsys):
    """A FIFO was called missing (put it there, it said, and it was there), and an unreadable file's
    preset was called complete above the FAIL, with the whole expected layout printed below it."""
    from encoderflow.data.sources import DataError

    folder = offline_folder(tmp_path / "offline", without=("bert_vocab_uncased.txt",))
    os.mkfifo(folder / "bert_vocab_uncased.txt")  # opening it to read would block until a writer came
    assert cli.main(["doctor", "--data-dir", str(folder), "--preset", "smoke"]) == 1
    out = capsys.readouterr().out
    assert f"cannot read bert_vocab_uncased.txt (not a regular file) under {folder}" in out
    assert "complete" not in out and "missing" not in out and "expected layout" not in out, out
    with pytest.raises(DataError, match=r"cannot read bert_vocab_uncased.txt \(not a regular file\)"):
        sources.check_offline(folder, {"bert_vocab": ("bert_vocab_uncased.txt",)})


def test_a_home_that_is_a_file_or_under_one_fails_doctor_and_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    from encoderflow import layout

    a_file = tmp_path / "env.sh"
    a_file.write_text("export X=1\n")
    for home in (a_file, a_file / "home"):
        check = doctor.check_disk(home)
        assert check.status == doctor.FAIL and f"{a_file} is a file, not a folder" in check.value, check
        monkeypatch.setenv("ENCODERFLOW_HOME", str(home))
        with pytest.raises(cli.EncoderflowError, match=re.escape(f"ENCODERFLOW_HOME={home}: ")) as err:
            layout.writable_home()
        assert "set ENCODERFLOW_HOME to a folder you can write" in str(err.value)
    folder = str(offline_folder(tmp_path / "offline"))
    assert cli.main(["run", "--preset", "smoke", "--data-dir", folder]) == 2
    assert "encoderflow run: EncoderflowError: ENCODERFLOW_HOME=" in capsys.readouterr().err
    assert cli.main(["validate", "--preset", "smoke", "--data-dir", folder]) == 2  # it writes its Data Docs there
    assert "encoderflow validate: EncoderflowError: ENCODERFLOW_HOME=" in capsys.readouterr().err
    monkeypatch.setenv("ENCODERFLOW_HOME", str(a_file))
    with pytest.raises(cli.EncoderflowError, match="it is a file, not a folder; fix: set ENCODERFLOW_HOME to a folder"):
        layout.writable_home()


@pytest.mark.slow
def test_a_scheduler_running_on_the_homes_airflow_is_named_as_what_refuses_encoderflow_run(encoderflow_home, capsys):
    """doctor said "a run can start" (exit 0) while `encoderflow run` was then refused: a standalone ran
    on the same home."""
    import subprocess
    import sys

    from tests.fixtures_runs import beat_a_scheduler

    assert doctor.check_home_airflow() is None  # never set up: nothing runs on it
    env = {**os.environ, **cli.airflow_env()}
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    db = encoderflow_home / "airflow" / "airflow.db"
    assert doctor.check_home_airflow() == doctor.Check(
        doctor.OK, doctor.HOME_AIRFLOW, f"no scheduler running on {encoderflow_home / 'airflow'}"
    )
    beat_a_scheduler(db)
    check = doctor.check_home_airflow()
    assert check.status == doctor.WARN and check.value.startswith(
        "a scheduler runs on it (on teamhost as alice, since "
    )
    assert check.value.endswith("): `encoderflow run` is refused beside it") and "POST /api/v2/dags/" in check.fix
    buf = io.StringIO()
    assert doctor.report([check], [], out=buf) == 0
    assert buf.getvalue().splitlines()[-1] == (
        "doctor: a run can start in the Airflow running on this home (not with encoderflow run) (1 warn)"
    )
    # With a preset's data missing too (the shared offline folder has no WikiText train split).
    missing = doctor.Check(doctor.WARN, "data (guide preset)", "missing wiki.train.raw", "add it")
    buf = io.StringIO()
    assert doctor.report([check, missing], [], out=buf) == 0
    assert buf.getvalue().splitlines()[-1] == (
        "doctor: a run can start in the Airflow running on this home (not with encoderflow run), but not with "
        "preset guide (the default): see its warn line (2 warn)"
    )


# --- GPUs: what nvidia-smi lists against what JAX and TensorFlow use ------------------------------------

H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5f1c2a4e-9b7d-4e0a-8c3f-2d6b1a0e9f71)"
H100_1 = "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-0a9e8f7d-6c5b-4a39-8271-6e5d4c3b2a19)"


def fake_nvidia_smi(folder: Path, monkeypatch, *said: str, exit_code: int = 0) -> Path:
    """An ``nvidia-smi`` first on PATH whose ``-L`` prints ``said`` (one line each)."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    body = "".join(f"echo '{line}'\n" for line in said)
    exe.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 9\n{body}exit {exit_code}\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return exe


def jax_devices_text() -> str:
    """What this machine's JAX has: CPU devices only, as the GPU checks below need (a CUDA venv skips them)."""
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("JAX runs on an accelerator here: nvidia-smi's GPUs are JAX's")
    return f"{len(jax.devices())} x cpu"


def test_gpus_nvidia_smi_lists_while_jax_runs_on_the_cpu_build_are_a_warning_naming_the_cuda_venv(
    tmp_path, monkeypatch, capsys
):
    """A GPU machine with `make venv` run before its driver was there: training ran for hours on the CPU."""
    devices = jax_devices_text()
    # A MIG device's line is indented under its GPU: not a GPU of its own.
    mig = "  MIG 1g.10gb     Device  0: (UUID: MIG-2a3b4c5d-6e7f-5a1b-9c2d-3e4f5a6b7c8d)"
    fake_nvidia_smi(tmp_path / "bin", monkeypatch, H100, mig, H100_1)
    assert doctor.nvidia_gpus() == [H100, H100_1]

    assert cli.main(["doctor", "--data-dir", str(offline_folder(tmp_path / "data"))]) == 0  # a warning, no FAIL
    out = capsys.readouterr().out
    warned = (
        f"warn  devices                {devices}; nvidia-smi lists 2 GPU(s) but this venv has the CPU build of JAX"
        "  -> fix: make ACCEL=cuda12 venv (installs jax[cuda12])"
    )
    assert warned in out.splitlines(), out
    assert not [line for line in out.splitlines() if line.startswith("ok    devices")], out
    assert out.rstrip().splitlines()[-1].startswith("doctor: a run can start ("), out


def test_gpus_with_a_cuda_plugin_that_did_not_load_name_the_driver_check(tmp_path, monkeypatch):
    """jax[cuda12] installed, but JAX fell back to the CPU (a driver too old for CUDA 12): the fix is
    the driver, not the venv."""
    devices = jax_devices_text()
    fake_nvidia_smi(tmp_path / "bin", monkeypatch, H100)
    # The plugin's distribution as pip leaves it: importlib.metadata finds it on sys.path.
    dist = tmp_path / "site" / "jax_cuda12_plugin-0.10.2.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jax-cuda12-plugin\nVersion: 0.10.2\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    checks, backend = doctor.check_jax(doctor.nvidia_gpus())
    assert backend == "cpu"
    assert [c.line() for c in checks][1] == (
        f"warn  devices                {devices}; nvidia-smi lists 1 GPU(s) but the CUDA plugin "
        "(jax-cuda12-plugin 0.10.2) did not load  -> fix: check the NVIDIA driver supports CUDA 12 (nvidia-smi) "
        "and python -c \"import jax; print(jax.devices('cuda'))\" for the error"
    )


def test_no_gpu_or_no_nvidia_smi_is_the_cpu_said_as_such(tmp_path, monkeypatch):
    devices = jax_devices_text()
    # nvidia-smi there, and no GPU: it says so on stdout and exits 6.
    fake_nvidia_smi(tmp_path / "bin", monkeypatch, "No devices were found", exit_code=6)
    assert doctor.nvidia_gpus() == []
    checks, _ = doctor.check_jax(doctor.nvidia_gpus())
    assert [c.line() for c in checks][1] == f"ok    devices                {devices} (no GPU: training runs on the CPU)"
    # No nvidia-smi at all: nothing to compare JAX with.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert doctor.nvidia_gpus() is None
    checks, _ = doctor.check_jax(None)
    assert [(c.status, c.value) for c in checks][1] == (doctor.OK, f"{devices} (no GPU: training runs on the CPU)")


def test_tensorflow_seeing_a_gpu_fails_doctor_as_memory_it_would_take_from_jax(tmp_path, monkeypatch, capsys):
    """TensorFlow imported before runtime.tensorflow() hid the GPUs from it takes the GPU memory JAX needs.
    The CPU build here sees none: a TensorFlow that does (as a CUDA build would) stands in for it."""

    class Config:
        @staticmethod
        def get_visible_devices(kind: str) -> list[str]:
            return ["/physical_device:GPU:0", "/physical_device:GPU:1"] if kind == "GPU" else []

    real = doctor.runtime.tensorflow()
    assert doctor.check_tensorflow().line() == (
        f"ok    tensorflow             {real.__version__}, sees no GPU (feeds data on the CPU)"
    )
    seeing = types.SimpleNamespace(__version__="2.99.0", config=Config)
    monkeypatch.setattr(doctor.runtime, "tensorflow", lambda: seeing)
    assert doctor.check_tensorflow().line() == (
        "FAIL  tensorflow             2.99.0 sees 2 GPU(s): it would compete with JAX for GPU memory  -> fix: import "
        "TensorFlow only through encoderflow.runtime.tensorflow(), before anything else imports it"
    )
    assert cli.main(["doctor", "--data-dir", str(offline_folder(tmp_path / "data"))]) == 1
    out = capsys.readouterr().out
    assert "FAIL  tensorflow             2.99.0 sees 2 GPU(s)" in out
    last = out.splitlines()[-1]
    assert re.fullmatch(r"doctor: 1 FAIL, \d+ warn: a run would not start; fix the FAIL lines", last), out
