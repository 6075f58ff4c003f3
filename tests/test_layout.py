import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from encoderflow import layout

# A writer inside atomic_path: half its bytes written, then it waits to be killed or released.
WRITER = """
import sys, time
from pathlib import Path
from encoderflow import layout

final, marker, release = map(Path, sys.argv[1:])
with layout.atomic_path(final) as tmp:
    tmp.write_bytes(b"half")
    marker.write_text(str(tmp))
    while not release.exists():
        time.sleep(0.05)
    tmp.write_bytes(b"whole")
"""


def _start_writer(final: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    marker, release = tmp_path / "writing", tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(final), str(marker), str(release)])
    deadline = time.monotonic() + 60
    while not marker.exists() or not marker.read_text():
        assert proc.poll() is None, "the writer exited before writing"
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.05)
    return proc, Path(marker.read_text()), release


def test_atomic_path_shows_nothing_when_the_block_fails(tmp_path):
    final = tmp_path / "out" / "result.json"
    with pytest.raises(RuntimeError), layout.atomic_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed halfway")
    assert list(final.parent.iterdir()) == []


def test_a_file_lands_with_the_umask_s_mode_and_a_private_one_stays_0600(tmp_path):
    """encoder.keras (written here) was 0600 beside classifier.keras's 0644: mkstemp's mode, kept by the
    rename, left a home's group unable to read the encoder. A password file keeps mkstemp's on purpose."""
    old = os.umask(0o027)
    try:
        layout._umask.cache_clear()
        with layout.atomic_path(tmp_path / "encoder.keras") as tmp:
            tmp.write_text("weights")
        with layout.atomic_path(tmp_path / "passwords.json", private=True) as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
        layout._umask.cache_clear()
    assert (tmp_path / "encoder.keras").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "passwords.json").stat().st_mode & 0o777 == 0o600


def test_a_live_writers_temp_survives_a_sweep_and_then_lands(tmp_path):
    final = tmp_path / "shard-0.tfrecord"
    proc, temp, release = _start_writer(final, tmp_path)
    try:
        assert temp.parent == tmp_path and temp.name.startswith(".shard-0.tfrecord.")
        # Another run sealing the same shards: the file it sees is being written, so it stays; so does it
        # when another writer writes the same file (whose first act is a sweep of dead writers' temps).
        assert layout.remove_dead_temps(tmp_path, [temp]) == []
        with layout.atomic_path(final) as tmp:
            tmp.write_text("first")
        assert temp.read_bytes() == b"half" and final.read_text() == "first"
        release.touch()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert final.read_bytes() == b"whole" and not temp.exists()


def test_a_killed_writers_temp_is_swept(tmp_path):
    final = tmp_path / "shard-0.tfrecord"
    proc, temp, _ = _start_writer(final, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert temp.exists() and not final.exists()
    assert layout.remove_dead_temps(tmp_path, [temp, tmp_path / ".gone.tmp"]) == [temp]
    assert list(tmp_path.glob(".shard-0.tfrecord.*")) == []


def test_a_retry_writing_the_file_again_clears_its_killed_writers_temp(tmp_path):
    """A pretrain killed while saving left ``.encoder.keras.XXXX.keras`` (0600) in its run folder for
    good: its retry wrote the encoder beside it."""
    final = tmp_path / "encoder.keras"
    proc, temp, _ = _start_writer(final, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert temp.exists()
    with layout.atomic_path(final) as tmp:
        tmp.write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert final.read_text() == "whole"


def test_a_finished_writer_leaves_only_its_file_and_no_lock(tmp_path):
    final = tmp_path / "a.json"
    for text in ("one", "two"):
        layout.write_json(final, {"v": text})
    assert layout.read_json(final) == {"v": "two"}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    # Its folder lock went with it: a sweep now may delete.
    dead = tmp_path / ".a.json.x.tmp"
    dead.write_text("left by a killed writer")
    assert layout.remove_dead_temps(tmp_path, [dead]) == [dead]


def test_an_hdf5_file_is_written_through_atomic_path(tmp_path):
    """HDF5 takes its own flock on the file it creates: a lock on the temp file would refuse it."""
    h5py = pytest.importorskip("h5py")
    final = tmp_path / "step-1.weights.h5"
    with layout.atomic_path(final, suffix=".weights.h5") as tmp, h5py.File(tmp, "w") as f:
        f["w"] = [1.0, 2.0]
    with h5py.File(final, "r") as f:
        assert list(f["w"][:]) == [1.0, 2.0]


def test_a_write_the_disk_has_no_room_for_is_refused_as_a_full_disk(tmp_path):
    import errno
    import shutil

    free = shutil.disk_usage(tmp_path).free
    layout.require_room(tmp_path / "fits.bin", 1024, "a file")
    with pytest.raises(OSError) as refused:
        layout.require_room(tmp_path / "huge.bin", free * 4 + 2**40, "a huge file")
    assert (refused.value.errno, refused.value.filename) == (errno.ENOSPC, str(tmp_path / "huge.bin"))
    assert refused.value.strerror.startswith("a huge file needs about ") and " is free" in refused.value.strerror
    assert not (tmp_path / "huge.bin").exists()


def test_writers_racing_for_one_folder_all_land_and_leave_one_whole(tmp_path):
    """Two scorers fetching into one folder: the loser of the old delete-then-rename failed with
    "Directory not empty"."""
    import threading

    final, errors, barrier = tmp_path / "champion", [], threading.Barrier(8, timeout=60)

    def write(n: int) -> None:
        try:
            for round_ in range(5):
                with layout.atomic_dir(final) as tmp:
                    for i in range(20):
                        (tmp / f"f{i}").write_text(f"{n}-{round_}")
                    barrier.wait() if round_ == 0 else None
        except Exception as exc:  # noqa: BLE001 - the test reports any writer's failure
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({p.read_text() for p in final.iterdir()}) == 1 and len(list(final.iterdir())) == 20
    assert [p.name for p in tmp_path.iterdir()] == ["champion"]  # nothing aside left behind


DIR_WRITER = """
import sys, time
from pathlib import Path
from encoderflow import layout

final, marker, release = map(Path, sys.argv[1:])
with layout.atomic_dir(final, prefix=".extract-") as tmp:
    (tmp / "part").write_bytes(b"half")
    marker.write_text(str(tmp))
    while not release.exists():
        time.sleep(0.05)
"""


def test_temp_folders_of_dead_writers_are_swept_and_a_live_ones_kept(tmp_path):
    root = tmp_path / "data"
    dead = root / ".extract-dead"
    marker, release = tmp_path / "writing", tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", DIR_WRITER, str(root / "final"), str(marker), str(release)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() or not marker.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never started"
            time.sleep(0.05)
        live = Path(marker.read_text())
        # A killed extraction's output (made now: a writer sweeps its prefix's dead folders as it starts).
        (dead / "wikitext-103-raw").mkdir(parents=True)
        (dead / "wikitext-103-raw" / "wiki.train.raw").write_bytes(b"x" * 1000)
        # While another extraction runs here, neither folder is touched: the dead one waits its turn.
        assert layout.remove_dead_temps(root, root.glob(".extract-*")) == []
        assert live.is_dir() and dead.is_dir()
        release.touch()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert (root / "final" / "part").read_bytes() == b"half"
    assert layout.remove_dead_temps(root, root.glob(".extract-*")) == [dead]
    assert sorted(p.name for p in root.iterdir()) == ["final"]


def test_a_temp_folder_sweeps_what_dead_writers_of_its_prefix_left(tmp_path):
    dead = tmp_path / ".fetch-killed"
    (dead / "files").mkdir(parents=True)
    other = tmp_path / ".extract-killed"  # another prefix: not this writer's to sweep
    other.mkdir()
    with layout.temp_dir(tmp_path, ".fetch-") as tmp:
        assert tmp.name.startswith(".fetch-") and tmp.is_dir()
        assert not dead.exists() and other.is_dir()
    assert not tmp.exists()


def _earlier_run(run: str, key: str, artifact: bytes, code: str | None = None, age: float = 0.0) -> Path:
    """A finished stage result in run folder ``run``, as pretrain writes one, ``age`` seconds old."""
    out = layout.run_dir(run) / "pretrain"
    out.mkdir(parents=True)
    (out / "encoder.keras").write_bytes(artifact)
    result = {"key": key, "encoder": str(out / "encoder.keras"), "code_hash": code or layout.code_hash()}
    path = layout.write_json(out / "result.json", result)
    os.utime(path, (time.time() - age, time.time() - age))
    return out


def test_adopt_earlier_links_the_newest_sound_result_of_the_same_key_and_code(caplog):
    def altered(file: Path, result: dict) -> str | None:
        return None if file.read_bytes().startswith(b"good") else "its sha256 differs"

    mine = layout.run_dir("now") / "pretrain"
    assert layout.adopt_earlier("pretrain", "k1", mine, "encoder", altered) is None  # no other run yet
    _earlier_run("old", "k1", b"good old", age=60)
    _earlier_run("other-key", "k2", b"good other key")
    _earlier_run("other-code", "k1", b"good other code", code="0" * 64)
    newest = _earlier_run("newest", "k1", b"bad bytes", age=1)
    with caplog.at_level("WARNING", logger="encoderflow.layout"):
        adopted = layout.adopt_earlier("pretrain", "k1", mine, "encoder", altered)
    # The newest is altered: named once and passed over for the older sound one, which is copied.
    assert [r.getMessage() for r in caplog.records] == [
        f"pretrain: not reusing {newest / 'encoder.keras'} (run newest): its sha256 differs"
    ]
    assert adopted["encoder"] == str(mine / "encoder.keras") and adopted["key"] == "k1"
    assert (mine / "encoder.keras").read_bytes() == b"good old"
    assert adopted["reused_from"] == str(layout.run_dir("old") / "pretrain" / "result.json")
    assert layout.read_json(mine / "result.json") == adopted
    assert sorted(p.name for p in mine.iterdir()) == ["encoder.keras", "result.json"]  # no temp left behind
    # A copy of a copy names the run that trained it.
    later = layout.adopt_earlier("pretrain", "k1", layout.run_dir("later") / "pretrain", "encoder", altered)
    assert later["reused_from"] == adopted["reused_from"]
    # Its own folder is never a source, and another key or another code's result is never adopted.
    assert layout.adopt_earlier("pretrain", "k2", layout.run_dir("other-key") / "pretrain", "encoder", altered) is None
    assert layout.adopt_earlier("pretrain", "k3", mine, "encoder", altered) is None


def test_adopt_earlier_links_a_folder_artifact_whole(caplog):
    src = layout.run_dir("old") / "finetune"
    (src / "bundle" / "sub").mkdir(parents=True)
    (src / "bundle" / "bundle.json").write_text("{}")
    (src / "bundle" / "sub" / "weights").write_bytes(b"w")
    layout.write_json(src / "result.json", {"key": "k", "bundle": str(src / "bundle"), "code_hash": layout.code_hash()})
    mine = layout.run_dir("now") / "finetune"
    adopted = layout.adopt_earlier("finetune", "k", mine, "bundle", lambda folder, result: None)
    assert adopted["bundle"] == str(mine / "bundle")
    assert (mine / "bundle" / "sub" / "weights").read_bytes() == b"w"
    assert sorted(p.name for p in mine.iterdir()) == ["bundle", "result.json"]
    # Linked, not copied: no second copy on disk, and the adopting run stands alone once the old one goes.
    assert os.path.samefile(mine / "bundle" / "sub" / "weights", src / "bundle" / "sub" / "weights")
    import shutil

    shutil.rmtree(layout.run_dir("old"))
    assert (mine / "bundle" / "sub" / "weights").read_bytes() == b"w"
    # The next run links the kept copy in and says whose it is: the run that trained it is pruned.
    caplog.clear()
    with caplog.at_level("INFO", logger="encoderflow.layout"):
        later = layout.finished(
            "finetune", "k", layout.run_dir("later") / "finetune", "bundle", lambda f, r: None, True, "x"
        )
    assert later["reused_from"] == str(src / "result.json") and later["linked_from"] == str(mine / "result.json")
    assert caplog.messages == [
        "finetune: reusing the bundle run old trained from the same x and code (key k) (from run now, which reused it; "
        f"run old's folder is pruned): linked to {layout.run_dir('later') / 'finetune' / 'bundle'}; "
        "set force to train again"
    ]


def test_share_identical_keeps_one_copy_of_what_every_run_writes_alike(tmp_path):
    runs = []
    for run, extra in (("a", b"only in a"), ("b", b"only in b")):
        static = tmp_path / run / "static"
        (static / "js").mkdir(parents=True)
        (static / "js" / "lib.js").write_bytes(b"x" * 5000)
        (static / "own.css").write_bytes(extra)
        runs.append(static)
    assert layout.share_identical(runs[0]) == 0  # the first of each content is the one stored
    assert layout.share_identical(runs[1]) == 5000
    assert os.path.samefile(runs[0] / "js" / "lib.js", runs[1] / "js" / "lib.js")
    assert not os.path.samefile(runs[0] / "own.css", runs[1] / "own.css")
    assert (runs[1] / "own.css").read_bytes() == b"only in b" and (
        runs[1] / "js" / "lib.js"
    ).read_bytes() == b"x" * 5000
    assert layout.share_identical(runs[1]) == 0  # again: nothing left to share
    assert sorted(p.name for p in runs[1].iterdir()) == ["js", "own.css"]  # no temp left behind
    # A stored copy altered in place after all is not linked to: the next sound file replaces it.
    stored = layout.home() / "cache" / "files" / layout.sha256_file(runs[0] / "own.css")
    (tmp_path / "c" / "static").mkdir(parents=True)
    (tmp_path / "c" / "static" / "own.css").write_bytes(b"only in a")
    with open(runs[0] / "own.css", "wb") as f:  # as a writer that opens an existing file "wb" does
        f.write(b"half")
    assert stored.read_bytes() == b"half"
    assert layout.share_identical(tmp_path / "c" / "static") == 0
    assert stored.read_bytes() == b"only in a" == (tmp_path / "c" / "static" / "own.css").read_bytes()


def test_finished_reuses_its_own_result_only_while_its_artifact_is_sound(caplog):
    # A cleared task re-runs in the same folder: an altered own artifact is trained again, not
    # handed on (with the sha256 its result recorded) to a step that then fails reading it.
    def altered(file: Path, result: dict) -> str | None:
        return None if file.read_bytes().startswith(b"good") else "its sha256 differs"

    mine = _earlier_run("now", "k1", b"good")
    args = ("pretrain", "k1", mine, "encoder", altered, False, "the same shards")
    assert layout.finished(*args)["encoder"] == str(mine / "encoder.keras")
    (mine / "encoder.keras").write_bytes(b"bad")
    caplog.clear()
    with caplog.at_level("WARNING", logger="encoderflow.layout"):
        assert layout.finished(*args) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"pretrain: not reusing this run's {mine / 'encoder.keras'}: its sha256 differs; training it again"
    ]
    (mine / "encoder.keras").unlink()
    assert layout.finished(*args) is None


def test_a_copied_home_reuses_its_own_files_not_the_ones_its_results_name_in_the_old_home(tmp_path, monkeypatch):
    """QA: in a copy of a home, results name the old home's files (absolute paths): a reuse read those
    (and said "linked"), while the copy's own altered file went unchecked; with the old home deleted,
    the stage would have trained again for hours."""
    import shutil

    def altered(file: Path, result: dict) -> str | None:
        return None if file.read_bytes().startswith(b"good") else "its sha256 differs"

    first = _earlier_run("first", "k0", b"good first")
    old = _earlier_run("old", "k1", b"good old")
    # "old" reused "first"'s result: its record names the home it was made in.
    layout.write_json(
        old / "result.json", {**layout.read_json(old / "result.json"), "reused_from": str(first / "result.json")}
    )
    _earlier_run("own", "k2", b"good own")
    copy = tmp_path / "copy"
    shutil.copytree(layout.home(), copy)
    monkeypatch.setenv("ENCODERFLOW_HOME", str(copy))
    (layout.run_dir("old") / "pretrain" / "encoder.keras").write_bytes(b"bad copy")
    mine = layout.run_dir("now") / "pretrain"
    assert layout.adopt_earlier("pretrain", "k1", mine, "encoder", altered) is None  # the copy's is altered
    (layout.run_dir("old") / "pretrain" / "encoder.keras").write_bytes(b"good copy")
    adopted = layout.adopt_earlier("pretrain", "k1", mine, "encoder", altered)
    assert (mine / "encoder.keras").read_bytes() == b"good copy" and adopted["encoder"] == str(mine / "encoder.keras")
    # The run that trained it is named as it is in this home, not as a folder of the old one ("pruned").
    assert adopted["reused_from"] == str(copy / "runs" / "first" / "pretrain" / "result.json")
    # A retry in a copied run folder hands on its own file, not the old home's path.
    own = layout.run_dir("own") / "pretrain"
    done = layout.finished("pretrain", "k2", own, "encoder", altered, False, "x")
    assert done["encoder"] == str(own / "encoder.keras") and Path(done["encoder"]).is_relative_to(copy)
