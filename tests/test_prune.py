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
import subprocess
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


def _du(path: Path, but: Path | None = None) -> int:
    """Bytes on disk under ``path`` as du counts them (allocated blocks, a hard-linked file once), less
    ``but`` under it."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) - (_du(but) if but is not None and but.exists() else 0)


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
    # only-gone, nobody, the summary and the run's folders; the encoder and "both" live on in the kept run.
    # As du counts them, blocks not sizes: 2,000 bytes of files and a 30-byte summary take three blocks.
    sizes = 2000 + (gone / "summary.json").stat().st_size
    before = _du(home)

    done = prune.apply(home, p)
    assert not gone.exists() and kept.exists()
    assert sorted(os.listdir(store)) == ["both"]
    assert {i.path.name for i in done.remove} == {"gone", "only-gone", "nobody"}
    freed = before - _du(home, but=home / "pruned")  # the record prune keeps of the run is not what it freed
    assert p.freed == done.freed == freed > sizes
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
    before = _du(home)
    said = {}
    for flags in (["--dry-run"], []):
        assert cli.main(["prune", "--keep", "1", *flags]) == 0
        out = capsys.readouterr().out
        assert old.exists() and "no Airflow metadata DB found for this home" in out, out
        assert "so runs/, data/ and shards/ are kept" in out and "MLflow (no registry here yet)" in out
        said[bool(flags)] = out.splitlines()[-1]
        assert "2 run folder(s) " in out.splitlines()[-1]
    assert "removed       validation validation/20260101T000000" in out and not site.exists()
    # The amount both reports name is what du saw go: the old site's folders and its one small file.
    gone = before - _du(home)
    assert gone >= 3 * 4096, gone  # validation/<stamp>, corpus/ and index.html: a block each at least
    assert said[True].startswith(f"would free {layout.human_size(gone)} (1 item(s)); "), said[True]
    assert said[False].startswith(f"freed {layout.human_size(gone)} (1 item(s)); "), said[False]


MODEL = "encoderflow-sst2"
# What check_lineage compares: a rejected version with these, against that champion under those gate
# settings, makes a rerun of its training skip (registry.rejected_under).
LINEAGE = {"data.labeled.content_hash": "d" * 64, "config.training_hash": "c" * 64, "code.hash": "e" * 64}


def _version(home: Path, run: str, blessed: bool, encoder: bytes, in_home: bool = True, **tags: str) -> str:
    """A version registered as promote registers one, from a bundle in the run's folder (``in_home``)
    or elsewhere; the encoder is shared by every version given the same bytes."""
    from encoderflow import bundle, registry

    root = (layout.run_dir(run) if in_home else home.parent / "elsewhere" / run) / "finetune" / "bundle"
    root.mkdir(parents=True)
    (root / "classifier.keras").write_bytes(os.urandom(200_000))
    (root / "encoder.keras").write_bytes(encoder)
    (root / "vocab.txt").write_text("[PAD]\nfilm\n")
    bundle.seal(root)
    decision = {
        "blessed": blessed,
        "reasons": [] if blessed else ["regression: 0.70 < champion 0.80"],
        "checks": [],
        "champion_version": tags.pop("champion_version", None),
        "settings_hash": "s" * 64,
    }
    tags = {"airflow.run_id": run, "airflow.dag_id": "encoder_pretraining", **tags}
    return registry.log_candidate(MODEL, root, {}, {}, {}, tags, decision)["version"]


def _gone(version: str) -> bool:
    from mlflow.exceptions import MlflowException

    from encoderflow import registry

    try:
        registry.client().get_model_version(MODEL, version)
    except MlflowException:
        return True
    return False


def test_versions_the_gate_rejected_that_were_never_champion_go_with_their_files_as_du_counts(encoderflow_home):
    """QA: 20 smoke runs left 83 MB of MLflow store, every rejected version's bundle kept for good."""
    from mlflow.entities import ViewType

    from encoderflow import registry

    home = encoderflow_home
    encoder = os.urandom(1 << 20)  # one pretraining, fine-tuned seven times
    v1 = _version(home, "run-1", True, encoder)
    registry.move_champion(MODEL, v1, expected=None, reason="gate", who="airflow")
    v2 = _version(home, "run-2", True, encoder)
    registry.move_champion(MODEL, v2, expected=v1, reason="gate", who="airflow")  # v1: previous
    v3 = _version(home, "run-3", False, encoder, in_home=False, champion_version=v2, **LINEAGE)
    v4 = _version(home, "run-4", False, encoder)
    registry.promote(MODEL, v4, "looked fine by hand", who="alice")  # a person's champion, rolled back
    registry.rollback(MODEL, "it was not", who="alice")
    v5 = _version(home, "run-5", False, encoder)
    v6 = _version(home, "run-6", False, encoder)
    v7 = _version(home, "run-7", False, encoder, **{"lineage.parent": v5})  # the newest (--keep 1), from v5's
    assert [v1, v2, v3, v4, v5, v6, v7] == [str(n) for n in range(1, 8)]
    airflow = _airflow()
    later = time.time() + 60  # every version older than --older-than 0

    p = prune.plan(home, keep=1, older_than_days=0, airflow=airflow, aliased=[], now=later)
    p = prune.plan_versions(home, p, 1, 0, airflow, registry.versions_for_prune(), now=later)
    versions = {i.version: i.why for i in p.remove if i.kind == "version"}
    assert versions == {
        v3: "rejected by the gate (regression: 0.70 < champion 0.80), never champion",
        v6: "rejected by the gate (regression: 0.70 < champion 0.80), never champion",
    }
    kept = {i.version: i.why for i in p.keep if i.kind == "version"}
    assert kept[v1] == "the previous version" and kept[v2] == "the champion version"
    assert kept[v4].startswith("was champion (v4 became champion by alice at ")
    assert (
        kept[v5] == "a kept version's training began from it" and kept[v7] == "one of the newest 1 of encoderflow-sst2"
    )
    files = {i.version: i.files for i in p.remove if i.kind == "version"}
    lines = prune.report_lines(home, p, dry_run=True)
    assert any(line.startswith(f"  would remove  version {MODEL} v3: rejected by the gate") for line in lines)
    # Alone, v3 frees its MLflow run's folders and every file there no other version links to (its own
    # classifier): du of it, less the files the store holds once for several versions (encoder, vocabulary).
    v3_run = files[v3].parent if os.listdir(files[v3].parent) == ["artifacts"] else files[v3]
    linked = {
        (st.st_ino, st.st_blocks * 512) for f in v3_run.rglob("*") if f.is_file() and (st := f.lstat()).st_nlink > 1
    }
    assert (1 << 20) in {size for _, size in linked}  # the shared encoder among them
    alone = _du(v3_run) - sum(size for _, size in linked)
    assert alone > 200_000  # the 200,000-byte classifier at least
    v3_line = next(line for line in lines if f"{MODEL} v3:" in line)
    assert v3_line.endswith(f", never champion (frees {layout.human_size(alone)} alone)"), v3_line
    assert lines[-1].startswith("would free ") and "mlflow gc" in lines[-1]
    assert all(path.exists() for path in files.values()) and not _gone(v3)  # a dry run: nothing went

    before = _du(home)
    done = prune.apply(home, p, recheck=lambda: airflow)
    # v3's bundle lived only in the store (its run folder is elsewhere): its classifier went with it; v6's
    # lives on in its run folder, and the encoder in every version kept.
    gone = before - _du(home)
    assert done.freed == p.freed == gone > 200_000
    # Both reports name what du saw go, the dry run's before it went.
    assert lines[-1].startswith(f"would free {layout.human_size(gone)} ("), lines[-1]
    freed_line = prune.report_lines(home, done, dry_run=False)[-1]
    assert freed_line.startswith(f"freed {layout.human_size(gone)} ("), freed_line
    assert {i.version for i in done.remove if i.kind == "version"} == {v3, v6} and _gone(v3) and _gone(v6)
    assert not any(path.exists() for path in files.values())
    c = registry.client()
    deleted = c.search_runs(
        [c.get_experiment_by_name(registry.EXPERIMENT).experiment_id], run_view_type=ViewType.DELETED_ONLY
    )
    assert {r.data.tags["airflow.run_id"] for r in deleted} == {"run-3", "run-6"}
    assert (layout.run_dir("run-6") / "finetune" / "bundle" / "classifier.keras").exists()
    # Its record stays on the registered model: a rerun of v3's training is skipped as before, not
    # trained again for hours to be rejected again.
    record = registry.pruned_in(c.get_registered_model(MODEL).tags)[v3]
    assert record["why"] == versions[v3] and record["tags"]["airflow.run_id"] == "run-3"
    rejected = registry.rejected_under(MODEL, LINEAGE, v2, "s" * 64)
    assert rejected["version"] == v3 and rejected["reasons"].startswith("regression: 0.70 < champion 0.80 (v3 itself")
    # Asked for by number, as encoderflow runs still prints it: not simply missing.
    from encoderflow.errors import EncoderflowError

    with pytest.raises(EncoderflowError, match=r"no version 3 in .* \(deleted by encoderflow prune --versions on "):
        registry.promote(MODEL, "v3", "bring it back", who="bob")
    # encoderflow runs marks them, where it printed a plain "v3" as if MLflow still held it; the records
    # protect nothing from prune (only the aliases do).
    from encoderflow import runs

    aliased, said, _ = runs.aliased_versions(home)
    assert sorted((a.version, a.alias) for a in aliased) == [
        (v1, "previous"),
        (v2, "champion"),
        (v3, runs.DELETED),
        (v6, runs.DELETED),
    ]
    assert said.startswith("MLflow (") and "deleted" not in said and f"{MODEL} v2 (champion)" in said
    shown = [{"registry": {"registered_model": MODEL, "version": v}} for v in (v2, v6)]
    runs.mark_aliases(shown, aliased)
    assert [runs.version_text(e) for e in shown] == ["v2 champion", "v6 (deleted by prune)"]
    assert shown[1]["aliases"] == [] and shown[1]["version_deleted"] is True  # no alias named "deleted" (--json)
    assert not any("deleted" in i.why for i in prune.plan(home, 1, 0, airflow, aliased, now=later).keep)
    # Another prune finds nothing more to do: the rest stays for the reasons it gave.
    again = prune.plan(home, keep=1, older_than_days=0, airflow=airflow, aliased=[], now=later)
    again = prune.plan_versions(home, again, 1, 0, airflow, registry.versions_for_prune(), now=later)
    assert not [i for i in again.remove if i.kind in prune.VERSION_KINDS]


def test_versions_stay_while_a_run_is_in_flight_or_whatever_changed_since_the_plan(encoderflow_home):
    from encoderflow import registry

    home = encoderflow_home
    encoder = os.urandom(100_000)
    v1 = _version(home, "run-1", True, encoder)
    registry.move_champion(MODEL, v1, expected=None, reason="gate", who="airflow")
    rejected = [_version(home, f"run-{n}", False, encoder) for n in (2, 3, 4, 5)]
    _version(home, "run-6", False, encoder)
    later = time.time() + 60

    def planned(airflow):
        p = prune.plan(home, keep=1, older_than_days=0, airflow=airflow, aliased=[], now=later)
        return prune.plan_versions(home, p, 1, 0, airflow, registry.versions_for_prune(), now=later)

    # A run in flight may find its model in any version and register none of its own: all stay.
    busy = planned(_airflow(**{"run-9": "running"}))
    assert not [i for i in busy.remove if i.kind == "version"]
    assert "registered versions are kept: in flight: run-9 (a run may find its model in any version)" in busy.notes
    # Airflow says otherwise when asked again: nothing is deleted.
    p = planned(_airflow())
    assert {i.version for i in p.remove if i.kind == "version"} == set(rejected)
    done = prune.apply(home, p, recheck=lambda: _airflow(**{"run-9": "queued"}))
    assert not any(_gone(v) for v in rejected) and not [i for i in done.remove if i.kind == "version"]
    assert "and no registered version was deleted" in done.notes[-1]

    # Since the plan: a person made v2 champion; a later run's gate blessed v3's model; a run found its
    # model in v4 (its MLflow run says registry.version 4: it uploaded no bundle of its own). They stay.
    p = planned(_airflow())
    registry.promote(MODEL, rejected[0], "hand-checked", who="bob")
    registry.client().set_model_version_tag(MODEL, rejected[1], "gate.blessed", "true")
    again = registry.log_candidate(
        MODEL,
        layout.run_dir("run-4") / "finetune" / "bundle",
        {},
        {},
        {},
        {"airflow.run_id": "run-later", "airflow.dag_id": "encoder_pretraining"},
        {"blessed": False, "reasons": ["regression"], "checks": []},
    )
    assert again["version"] == rejected[2] and again["registered_by"] == "run-4"
    done = prune.apply(home, p, recheck=_airflow)
    stays = {i.version: i.why for i in done.keep if i.kind == "version" and i.version in rejected}
    assert stays == {
        rejected[0]: "it is the champion version now",
        rejected[1]: "a gate blessed it since the plan",
        rejected[2]: "run-later found its model in it since the plan",
    }
    assert [i.version for i in done.remove if i.kind == "version"] == [rejected[3]] and _gone(rejected[3])
    assert not any(_gone(v) for v in rejected[:3])

    # A prune killed after MLflow deleted a version, before its files went: the next one removes them.
    v8 = _version(home, "run-8", False, encoder)
    answer = registry.delete_version(MODEL, v8, "a test's", time.time())
    assert answer["deleted"] and answer["files"].exists()
    [left] = [i for i in planned(_airflow()).remove if i.kind == "version files"]
    assert left.path == answer["files"] and left.why == "files of a version an interrupted prune deleted"
    prune.apply(home, planned(_airflow()), recheck=_airflow)
    assert not answer["files"].exists() and not registry.versions_for_prune()["leftovers"]


def test_the_cli_prunes_versions_only_of_a_store_on_this_machine_and_never_without_airflow(
    encoderflow_home, capsys, monkeypatch
):
    from encoderflow import registry

    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", raising=False)
    home = encoderflow_home
    _version(home, "run-1", False, b"enc")
    _version(home, "run-2", False, b"enc")
    _aged(home / "runs", 30)
    for flags in (["--dry-run"], []):
        assert cli.main(["prune", "--versions", "--keep", "1", "--older-than", "0", *flags]) == 0
        out = capsys.readouterr().out
        assert "registered versions are kept: no Airflow could be asked" in out, out
        assert f"  keep          version {MODEL} v1: no Airflow could be asked" in out
        assert "mlflow gc" in out.splitlines()[-1]
    assert len(registry.versions_for_prune()["versions"]) == 2
    # A server's files are not this machine's: refused before anything is asked or removed.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert cli.main(["prune", "--versions"]) == 2
    err = capsys.readouterr().err
    assert "prune --versions deletes versions from an MLflow store on this machine" in err
    assert "http://127.0.0.1:9 is a server" in err and "fix: leave out --versions here" in err
    # A home of make stack, its versions on the stack's server and no embedded store: refused the same
    # way (it found nothing to delete in a store that is not there, and exited 0).
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    stack_home = home.parent / "stack-home"
    monkeypatch.setenv("ENCODERFLOW_HOME", str(stack_home))
    (stack_home / "stack").mkdir(parents=True)
    (stack_home / "runs").mkdir()
    (stack_home / "stack" / "secrets.json").write_text("{}")
    assert cli.main(["prune", "--versions", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "this home's versions are on make stack's MLflow server (http://127.0.0.1:" in err, err
    assert "it has no embedded store" in err and "fix: leave out --versions here" in err


def test_prune_versions_stores_the_identical_files_of_versions_registered_before_once(encoderflow_home):
    """Versions registered before registration linked identical files each hold a copy (QA: the same
    encoder.keras in every version): prune --versions links the store's, never a run folder's."""
    from encoderflow import bundle, registry

    home = encoderflow_home
    encoder = os.urandom(1 << 20)
    versions = [_version(home, f"run-{n}", True, encoder) for n in (1, 2, 3)]
    registry.move_champion(MODEL, versions[-1], expected=None, reason="gate", who="airflow")
    judged = registry.versions_for_prune()["versions"]
    for v in judged:  # each file its own copy again, as this code's predecessor left them
        for folder in (v["files"] / "bundle", layout.run_dir(v["tags"]["airflow.run_id"]) / "finetune" / "bundle"):
            for path in folder.iterdir():
                shutil.copy2(path, path.with_name("copy"))
                os.replace(path.with_name("copy"), path)
    assert all((v["files"] / "bundle" / "encoder.keras").stat().st_nlink == 1 for v in judged)
    airflow, later = _airflow(), time.time() + 60
    p = prune.plan(home, keep=10, older_than_days=0, airflow=airflow, aliased=[], now=later)
    p = prune.plan_versions(home, p, 10, 0, airflow, registry.versions_for_prune(), now=later)
    assert not p.remove and len([i for i in p.keep if i.kind == "version"]) == 3
    before = _du(home)
    done = prune.apply(home, p, recheck=lambda: airflow)
    # Two of the store's three encoders, and its other identical files, as du counts them; the run
    # folders' copies are their own (rewritten in place, one would alter the registered versions).
    assert done.shared == before - _du(home) >= 2 << 20
    first = judged[0]["files"] / "bundle" / "encoder.keras"
    assert first.stat().st_nlink == 3
    assert all(
        (layout.run_dir(v["tags"]["airflow.run_id"]) / "finetune" / "bundle" / "encoder.keras").stat().st_nlink == 1
        for v in judged
    )
    shared = before - _du(home)
    assert f"  stored the kept versions' identical files once: {layout.human_size(shared)} freed" in (
        prune.report_lines(home, done, dry_run=False)
    )
    for v in versions:
        assert bundle.damage(registry.download_version(MODEL, v, home.parent / f"serve-{v}")) is None
