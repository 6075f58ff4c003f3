"""``encoderflow prune``: which run folders and cached files go, which stay and why, and removal that
never leaves a half-deleted folder or takes a file a run still holds.

The plan is tested on run folders laid out as a pipeline writes them, with Airflow's and MLflow's
answers given; the answers themselves come from a real Airflow CLI here and from the real pipeline
in ``test_pipeline.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from encoderflow import cli, layout, prune, runs

NOW = time.time()
DAY = 86400


def _aged(path: Path, days: float) -> Path:
    """Set the modification time of ``path`` and everything under it to ``days`` ago."""
    when = NOW - days * DAY
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (when, when), follow_symlinks=False)
    return path


def _run(home: Path, name: str, days: float, done: str | None = "summary", **summary) -> Path:
    folder = home / "runs" / name
    (folder / "pretrain").mkdir(parents=True)
    (folder / "pretrain" / "encoder.keras").write_bytes(name.encode() * 100)
    if done == "summary":
        (folder / "summary.json").write_text(json.dumps({"run_id": name, **summary}))
    elif done == "failure":
        (folder / "failure.json").write_text(json.dumps({"task_id": "pretrain"}))
    return _aged(folder, days)


def _shards(home: Path, name: str, days: float, inputs: list[str] = ()) -> Path:
    folder = home / "shards" / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"inputs": [["train", p, "x"] for p in inputs]}))
    (folder / "train-00000.tfrecord").write_bytes(b"r" * 1000)
    return _aged(folder, days)


def _data(home: Path, dataset: str, name: str, days: float) -> Path:
    folder = home / "data" / dataset / name / "files"
    folder.mkdir(parents=True)
    (folder / "wiki.train.raw").write_text(name)
    (folder / ".complete").write_text(name)  # as data.folders marks a finished copy
    return _aged(folder.parent, days)


def _backup(folder: Path, key: str, code: str, files: bool = True) -> None:
    """A pretraining backup as StepBackup leaves it: its key, its code, a step file and its sha256."""
    from encoderflow.train.pretrain import BACKUP_CODE, BACKUP_KEY

    backups = folder / "pretrain" / "backup"
    backups.mkdir()
    (backups / BACKUP_KEY).write_text(key)
    (backups / BACKUP_CODE).write_text(code)
    if files:
        (backups / "step-40.weights.h5").write_bytes(b"weights")
        (backups / "step-40.weights.h5.sha256").write_text(layout.sha256_file(backups / "step-40.weights.h5"))


def _airflow(**states: str) -> prune.AirflowRuns:
    return prune.AirflowRuns(states, True, "Airflow test")


def _judged(p: prune.Plan, kind: str) -> tuple[dict[str, str], dict[str, str]]:
    removed = {i.path.name: i.why for i in p.remove if i.kind == kind}
    kept = {i.path.name: i.why for i in p.keep if i.kind == kind}
    return removed, kept


def test_run_folders_go_only_when_finished_old_and_not_an_aliased_versions(encoderflow_home):
    home = encoderflow_home
    _run(home, "new", 1)
    _run(home, "stopped", 31, done=None)  # no summary, and no Airflow knows it
    _run(home, "champion", 60, registry={"version": "1"})
    _run(home, "recent", 3)
    _run(home, "failed", 20, done="failure")
    _run(home, "old", 32)
    _run(home, "orphan", 33)  # no Airflow knows it; its summary says it finished
    _run(home, "orphan-failed", 34, done="failure")  # no Airflow knows it; a failure: maybe retrying
    stamped = _run(home, "stamped", 0, done="failure")  # its backup folder holds no backup: nothing to resume
    _backup(stamped, "k3", layout.code_hash(), files=False)
    _aged(stamped, 38)
    backups = (("resumable", "k1", 35, "this"), ("superseded", "k2", 36, "this"), ("other-code", "k4", 39, "old"))
    for name, key, days, code in (*backups, ("finished-k2", None, 37, None)):
        folder = _run(home, name, 0, done="failure" if key else "summary")
        if key:
            _backup(folder, key, layout.code_hash() if code == "this" else "0" * 64)
        else:
            (folder / "pretrain" / "result.json").write_text(json.dumps({"key": "k2"}))
        _aged(folder, days)
    states = dict(new="success", champion="success", recent="success", failed="failed", old="success")
    states |= {"resumable": "failed", "superseded": "failed", "finished-k2": "success", "stamped": "failed"}
    states |= {"other-code": "failed"}
    aliased = [prune.Aliased("encoderflow-sst2", "1", "champion", "champion")]

    p = prune.plan(home, keep=1, older_than_days=7, airflow=_airflow(**states), aliased=aliased, now=NOW)
    removed, kept = _judged(p, "run")
    assert removed == {
        "failed": "Airflow: failed",
        "old": "Airflow: success",
        "orphan": "no Airflow knows it; its summary.json says it finished",
        "superseded": "Airflow: failed",
        "finished-k2": "Airflow: success",
        "stamped": "Airflow: failed",
        "other-code": "Airflow: failed",  # taken by other code: no run resumes it
    }
    assert kept == {
        "new": "one of the newest 1",
        "stopped": "no Airflow knows it, and it has no summary.json",
        "orphan-failed": "no Airflow knows it, and it has no summary.json",
        "champion": "registered encoderflow-sst2 v1 (champion)",
        "recent": "changed within the age limit",
        "resumable": "holds the backup of a pretraining no run has finished since (the next run of it resumes it)",
    }
    assert p.notes == ["Airflow test; none in flight"]

    # The champion began from an encoder in the "old" run's folder (pretrain.init_from=<path>): its config
    # points there, and each run of it failed once prune had removed it.
    parent = home / "runs" / "old" / "pretrain" / "encoder.keras"
    warm = [prune.Aliased("encoderflow-sst2", "1", "champion", "champion", parent=str(parent))]
    p = prune.plan(home, keep=1, older_than_days=7, airflow=_airflow(**states), aliased=warm, now=NOW)
    assert _judged(p, "run")[1]["old"] == f"holds {parent}, which encoderflow-sst2 v1 (champion) began from"
    assert "old" not in _judged(p, "run")[0]

    # MLflow not asked: any finished run may have registered the champion (and failed before its summary).
    p = prune.plan(home, keep=1, older_than_days=7, airflow=_airflow(**states), aliased=None, now=NOW)
    assert not _judged(p, "run")[0]
    assert _judged(p, "run")[1]["old"] == "MLflow could not be asked which run registered the champion"
    # A larger keep keeps the newest by their last change, whatever Airflow says.
    p = prune.plan(home, keep=4, older_than_days=0, airflow=_airflow(**states), aliased=aliased, now=NOW)
    newest = sorted(n for n, why in _judged(p, "run")[1].items() if why == "one of the newest 4")
    assert newest == ["failed", "new", "recent", "stopped"]

    # A run in flight may reuse or resume any run folder's results; an Airflow not asked may have one.
    for airflow in (
        _airflow(**{**states, "old": "running"}),
        prune.AirflowRuns({}, False, "Airflow not asked: make stack's PostgreSQL is not running"),
    ):
        p = prune.plan(home, keep=1, older_than_days=0, airflow=airflow, aliased=aliased, now=NOW)
        assert not [i for i in p.remove if i.kind in prune.SHARED_BY_RUNS] and not _judged(p, "run")[1]
        assert p.notes[0].endswith("so runs/, data/ and shards/ are kept"), p.notes


def test_downloads_and_shards_go_only_when_no_kept_run_used_them(encoderflow_home):
    home = encoderflow_home
    new_data = _data(home, "corpus", "bbbb", 10)
    used_data = _data(home, "corpus", "aaaa", 30)
    stale_data = _data(home, "corpus", "cccc", 40)
    only_labeled = _data(home, "labeled", "dddd", 50)
    trained = _aged(_mk(home / "data" / "vocab-trained" / "eeee" / "vocab.txt"), 50)  # no completion marker
    kept_shards = _shards(home, "s-kept", 30, [str(used_data / "files" / "wiki.train.raw")])
    by_hash = _shards(home, "s-hash", 30)
    stale_shards = _shards(home, "s-stale", 30, [str(stale_data / "files" / "wiki.train.raw")])
    _run(home, "kept", 1, artifacts={"shards_manifest": str(kept_shards / "manifest.json")})
    _run(home, "gone", 30, artifacts={"shards_manifest": str(stale_shards / "manifest.json")})
    # A run that failed after pretraining records its shards only by the manifest's sha256.
    failed = _run(home, "failed", 2, done="failure")
    (failed / "pretrain" / "result.json").write_text(
        json.dumps({"config": {"manifest": layout.sha256_file(by_hash / "manifest.json")}})
    )
    _aged(failed, 2)
    airflow = _airflow(kept="success", gone="success", failed="failed")

    p = prune.plan(home, keep=2, older_than_days=7, airflow=airflow, aliased=[], now=NOW)
    assert _judged(p, "run")[0] == {"gone": "Airflow: success"}
    assert _judged(p, "shards") == (
        {"s-stale": "no kept run used them"},
        {"s-kept": "used by a kept run", "s-hash": "used by a kept run"},
    )
    assert _judged(p, "data") == (
        {"cccc": "an older download no kept shards were built from"},
        {
            "bbbb": "the newest download of it",
            "aaaa": "kept shards were built from it",
            "dddd": "the newest download of it",
        },
    )
    assert new_data.exists() and only_labeled.exists() and trained.name not in str(p.remove)

    # A kept run that failed in pretraining names its shard set in pretrain/shards.json: that set stays.
    named = _run(home, "named", 1, done="failure")
    (named / "pretrain" / "shards.json").write_text(json.dumps({"manifest": str(stale_shards / "manifest.json")}))
    states = {"named": "failed", **airflow.states}
    p = prune.plan(home, keep=3, older_than_days=7, airflow=_airflow(**states), aliased=[], now=NOW)
    assert _judged(p, "shards")[1]["s-stale"] == "used by a kept run" and not _judged(p, "shards")[0]
    shutil.rmtree(named)
    # One from before that record: clearing its pretrain reads a shard set it does not name, so all stay.
    stopped = _run(home, "stopped", 1, done="failure")
    p = prune.plan(
        home, keep=3, older_than_days=7, airflow=_airflow(stopped="failed", **airflow.states), aliased=[], now=NOW
    )
    assert not _judged(p, "shards")[0]
    assert _judged(p, "shards")[1]["s-stale"] == f"kept run {stopped.name} began pretraining and records no shards"


def test_shared_files_go_with_their_last_run_and_the_freed_bytes_count_each_file_once(encoderflow_home):
    home = encoderflow_home
    gone = _run(home, "gone", 30)
    kept = _run(home, "kept", 1)
    store = home / "cache" / "files"
    store.mkdir(parents=True)
    for name, holders in {"only-gone": [gone], "both": [gone, kept], "nobody": []}.items():
        (store / name).write_bytes(b"x" * 1000)
        for folder in holders:
            os.link(store / name, folder / f"static-{name}")
    # The kept run's encoder is a link to the one that goes (a reused result): it frees nothing.
    os.unlink(kept / "pretrain" / "encoder.keras")
    os.link(gone / "pretrain" / "encoder.keras", kept / "pretrain" / "encoder.keras")
    _aged(gone, 30)  # again: the links above were changes

    p = prune.plan(
        home, keep=1, older_than_days=7, airflow=_airflow(gone="success", kept="success"), aliased=[], now=NOW
    )
    assert {i.path.name for i in p.remove if i.kind == "shared file"} == {"only-gone", "nobody"}
    # only-gone, nobody and the summary; the encoder and "both" live on in the kept run.
    freed = 2000 + (gone / "summary.json").stat().st_size
    assert p.freed == freed

    done = prune.apply(home, p)
    assert not gone.exists() and kept.exists()
    assert sorted(os.listdir(store)) == ["both"]
    assert done.freed == freed and {i.path.name for i in done.remove} == {"gone", "only-gone", "nobody"}
    assert (kept / "pretrain" / "encoder.keras").read_bytes() == b"gone" * 100
    assert not list(home.glob(".prune-*"))  # the trash folder went with what was in it


def test_apply_puts_back_what_a_run_started_since_the_plan_may_read_and_keeps_a_file_linked_since(encoderflow_home):
    home = encoderflow_home
    old = _run(home, "old", 30)
    _run(home, "new", 1, artifacts={"shards_manifest": str(home / "shards" / "s-new" / "manifest.json")})
    shards = _shards(home, "s-old", 30)
    served = _aged(_mk(home / "serving" / "encoderflow-sst2" / "v9" / "bundle.json"), 30)
    store = home / "cache" / "files"
    store.mkdir(parents=True)
    (store / "lonely").write_bytes(b"y" * 10)
    airflow = _airflow(old="failed", new="success")
    p = prune.plan(home, keep=1, older_than_days=7, airflow=airflow, aliased=[], now=NOW)
    assert {i.path.name for i in p.remove} == {"old", "s-old", "v9", "lonely"}
    os.link(store / "lonely", home / "runs" / "new" / "lonely")  # a run shared a file after the plan

    def cleared():  # meanwhile a task of the old run was cleared, ran, and wrote a file of its own there
        (old / "finetune").mkdir(parents=True)
        (old / "finetune" / "result.json").write_text("new")
        return _airflow(old="success", new="success")  # a changed state: nothing in flight, yet put back

    done = prune.apply(home, p, recheck=cleared)
    assert (old / "finetune" / "result.json").read_text() == "new"  # the run's new file, and all it had
    assert (old / "pretrain" / "encoder.keras").read_bytes() == b"old" * 100 and (old / "summary.json").exists()
    assert shards.exists() and (store / "lonely").exists() and not served.exists()
    assert [i.path.name for i in done.remove] == ["v9"]
    said = "Airflow test: runs started or changed since the plan, so runs/, data/ and shards/ were put back"
    assert said in done.notes
    assert not (home / "pruned" / "old.json").exists()  # the folder is back: the page reads it, not a record
    assert not list(home.rglob(prune.HIDDEN))

    # Interrupted while asking again (Ctrl-C): everything hidden is put back, and the interrupt goes on.
    (old / "finetune" / "result.json").unlink()
    (old / "finetune").rmdir()
    _aged(old, 30)
    p = prune.plan(home, keep=1, older_than_days=7, airflow=airflow, aliased=[], now=NOW)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune.apply(home, p, recheck=interrupted)
    assert old.exists() and shards.exists() and not list(home.rglob(prune.HIDDEN))
    # A prune killed outright leaves .prune/ folders: the next one puts them back before it plans.
    os.makedirs(home / "runs" / prune.HIDDEN)
    os.replace(old, home / "runs" / prune.HIDDEN / "old")
    assert prune.restore_hidden(home) == [old] and old.exists() and not list(home.rglob(prune.HIDDEN))

    # With Airflow saying the same again, they go.
    assert sorted(i.path.name for i in prune.apply(home, p, recheck=lambda: airflow).remove) == ["old", "s-old"]
    assert not old.exists() and not shards.exists() and not list(home.rglob(prune.HIDDEN))


def test_a_pruned_run_leaves_a_record_of_its_decision_and_the_failure_it_ended_on(encoderflow_home):
    home = encoderflow_home
    reported = _run(home, "reported", 30, gate={"blessed": True}, metrics={"val_accuracy": 0.8})
    (reported / "gate.json").write_text(json.dumps({"blessed": True, "checks": []}))
    _run(home, "failed", 30, done="failure")
    # A task of a finished run was cleared and failed, then the run finished again: no failure to show.
    cleared = _run(home, "cleared", 30, done="failure")
    (cleared / "summary.json").write_text(json.dumps({"run_id": "cleared"}))
    _aged(reported, 30), _aged(cleared, 30), _aged(cleared / "failure.json", 31)
    _run(home, "new", 1)
    airflow = _airflow(reported="success", failed="failed", cleared="success", new="success")
    p = prune.plan(home, keep=1, older_than_days=7, airflow=airflow, aliased=[], now=NOW)
    assert sorted(i.path.name for i in prune.apply(home, p).remove) == ["cleared", "failed", "reported"]
    records = {
        name: json.loads((home / "pruned" / f"{name}.json").read_text()) for name in ("reported", "failed", "cleared")
    }
    assert records["reported"]["summary"]["metrics"] == {"val_accuracy": 0.8}
    assert records["reported"]["gate"] == {"blessed": True, "checks": []} and records["reported"]["failure"] is None
    assert records["failed"]["failure"] == {"task_id": "pretrain"} and records["failed"]["summary"] is None
    assert records["cleared"]["failure"] is None and records["cleared"]["summary"] == {"run_id": "cleared"}
    assert all(r["pruned_at"].startswith(time.strftime("%Y-", time.gmtime())) for r in records.values())


def test_serving_copies_and_validation_sites_beyond_what_is_kept_go(encoderflow_home):
    home = encoderflow_home
    _run(home, "r", 1)
    for version, days in (("v1", 30), ("v2", 30), ("v3", 1)):
        _aged(_mk(home / "serving" / "encoderflow-sst2" / version / "bundle.json"), days)
    for stamp in ("20261101T000000", "20261102T000000", "20261103T000000"):
        _mk(home / "validation" / stamp / "corpus" / "index.html")
        _aged(home / "validation" / stamp, 30)
    aliased = [prune.Aliased("encoderflow-sst2", "1", "champion", None)]
    p = prune.plan(home, keep=2, older_than_days=7, airflow=_airflow(r="success"), aliased=aliased, now=NOW)
    assert _judged(p, "serving") == (
        {"v2": "no alias points to this version"},
        {"v1": "an aliased version", "v3": "changed within the age limit"},
    )
    assert set(_judged(p, "validation")[0]) == {"20261101T000000"}
    assert "serving/ is kept" in " ".join(
        prune.plan(home, keep=2, older_than_days=7, airflow=_airflow(r="success"), aliased=None, now=NOW).notes
    )


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    return path.parents[0]


def test_an_airflow_that_cannot_list_its_runs_or_none_at_all_is_not_asked(encoderflow_home, monkeypatch, tmp_path):
    # A metadata DB with no tables: Airflow's own CLI fails, and the report carries its error line.
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{tmp_path / 'empty.db'}")
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    answer = runs.ask_airflow(encoderflow_home)
    assert answer.asked is False and answer.states == {}
    said = "Airflow of this environment (AIRFLOW_HOME, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN): could not list the runs"
    assert answer.said.startswith(said) and "airflow db migrate" in answer.said, answer.said
    # No Airflow found for this home: its runs' states are unknown, and the fix is named.
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    monkeypatch.delenv("AIRFLOW_HOME")
    answer = runs.ask_airflow(encoderflow_home)
    assert not answer.asked and "no Airflow metadata DB found for this home: set AIRFLOW_HOME" in answer.said


def test_the_cli_refuses_bad_numbers_and_a_home_without_runs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", "--keep", "0"])
    assert "--keep: 0 is below 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prune", "--older-than", "soon"])
    assert "'soon' is not a number" in capsys.readouterr().err
    assert cli.main(["prune"]) == 2
    err = capsys.readouterr().err
    assert "no runs under ENCODERFLOW_HOME=" in err and "set ENCODERFLOW_HOME" in err


def test_the_cli_prunes_nothing_shared_by_runs_when_no_airflow_is_found_and_says_so(
    encoderflow_home, capsys, monkeypatch
):
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", raising=False)
    home = encoderflow_home
    old = _run(home, "old", 30)
    _run(home, "new", 1)
    site = home / "validation" / "20260101T000000"
    for stamp in (site.name, "20260102T000000"):  # the newest --keep stay
        _aged(_mk(home / "validation" / stamp / "corpus" / "index.html").parent, 30)
    for flags in (["--dry-run"], []):
        assert cli.main(["prune", "--keep", "1", *flags]) == 0
        out = capsys.readouterr().out
        assert old.exists() and "no Airflow metadata DB found for this home" in out, out
        assert "so runs/, data/ and shards/ are kept" in out and "MLflow (no registry here yet)" in out
        assert out.splitlines()[-1].startswith(("would free" if flags else "freed") + " ")
        assert "2 run folder(s) " in out.splitlines()[-1]
    assert "removed       validation validation/20260101T000000" in out and not site.exists()
