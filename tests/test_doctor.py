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

from .data.fixtures_http import STALL

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
    assert time.monotonic() - t0 < 5
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
