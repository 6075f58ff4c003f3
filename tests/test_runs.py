"""``encoderflow.runs``: the record of runs read back (folders, pruned records, Airflow's and MLflow's
word), and ``encoderflow runs``, a terminal's view of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from encoderflow import DAG_ID, cli, errors, layout, runs
from tests.fixtures_runs import BLESSED_RUN, FAILED_RUN, REJECTED_RUN, write_runs

QUEUED_RUN = "manual__2026-11-28T12:00:00+00:00"
MODEL = "encoderflow-sst2"
STORE = "http://mlflow:5000"  # where the fixture's runs registered


def _fail(home: Path, run_id: str) -> Path:
    """FAILED_RUN's failure.json and its task log, as the DAG's failure callback and Airflow write them."""
    folder = layout.run_dir(run_id)
    layout.write_json(
        folder / "failure.json",
        {
            "run_id": run_id,
            "task_id": "validate_labeled",
            "map_index": -1,
            "try_number": 2,
            "error": "ValidationFailed",
            "message": "labeled: 3 of 12 expectations failed",
            "fix": "fix the file named above, or point --labeled at a good copy",
        },
    )
    log = folder / "logs" / "task_id=validate_labeled" / "attempt=2.log"
    log.parent.mkdir(parents=True)
    log.write_text("ValidationFailed: labeled: 3 of 12 expectations failed\n")
    return log


@pytest.fixture
def recorded(encoderflow_home):
    write_runs(encoderflow_home)
    log = _fail(encoderflow_home, FAILED_RUN)
    # A run's pretraining time as Keras may leave it: not a number.
    summary = layout.run_dir(REJECTED_RUN) / "summary.json"
    data = json.loads(summary.read_text())
    data["runtime"] = {"pretrain": {"seconds": float("nan"), "device": "1 x gpu", "dtype_policy": "mixed_bfloat16"}}
    summary.write_text(json.dumps(data))
    return encoderflow_home, log


def _entries(home: Path, aliased: list[runs.Aliased] | None, stores: tuple[str, ...] = (STORE,)) -> dict[str, dict]:
    dag_runs = [
        {"run_id": QUEUED_RUN, "state": "queued", "run_after": "2026-11-28T12:00:00+00:00", "start_date": None},
        {"run_id": FAILED_RUN, "state": "failed", "start_date": "2026-11-27T09:00:01+00:00", "end_date": None},
        {"run_id": BLESSED_RUN, "state": "success", "start_date": "2026-11-25T10:00:01+00:00", "end_date": None},
    ]
    entries = runs.collect_runs(home, dag_runs)
    runs.mark_aliases(entries, aliased, set(stores))
    return {e["run_id"]: e for e in entries}


def test_the_table_gives_each_run_its_state_verdict_metrics_and_version_in_aligned_columns(recorded):
    home, _ = recorded
    champion = [runs.Aliased(MODEL, "1", "champion", layout.safe_run_id(BLESSED_RUN), STORE)]
    entries = _entries(home, champion)
    lines = runs.table_lines(list(entries.values()))
    head, rows = lines[0], {line.split()[0]: line for line in lines[1:]}
    assert head.split() == [
        "run",
        "state",
        "preset",
        "started",
        "(UTC)",
        "gate",
        "val_accuracy",
        "baseline_val_accuracy",
        "mlm_val_accuracy",
        "version",
    ]
    assert list(rows) == [QUEUED_RUN, FAILED_RUN, BLESSED_RUN, REJECTED_RUN]  # Airflow's order, then folders
    blessed = rows[BLESSED_RUN]
    assert blessed.split()[1:3] == ["success", "guide"] and "2026-11-25 10:00:01" in blessed
    # The summary predates the metric's rename (sst2_val_accuracy): it reads as val_accuracy.
    assert blessed.endswith("0.8120                 0.7500            0.3100  v1 champion"), blessed
    assert "NOT BLESSED" not in blessed and "  BLESSED  " in blessed
    # No Airflow asked knows the rejected run: its state is its folder's, starred.
    assert rows[REJECTED_RUN].split()[1] == "finished*" and "NOT BLESSED" in rows[REJECTED_RUN]
    assert rows[REJECTED_RUN].endswith("0.7010                 0.7500            0.3100  v2"), rows[REJECTED_RUN]
    assert rows[FAILED_RUN].split()[1:3] == ["failed", "–"] and " FAILED " in rows[FAILED_RUN]
    assert rows[QUEUED_RUN].split()[1] == "queued" and "in flight" in rows[QUEUED_RUN]
    # Every column starts where its header does.
    for name in ("state", "gate", "version"):
        at = head.index(name)
        assert all(line[at - 2 : at] == "  " and line[at] != " " for line in lines[1:] if len(line) > at), name
    # MLflow not asked: versions are shown, aliases are not claimed.
    entries = _entries(home, None)
    assert entries[BLESSED_RUN]["aliases"] is None
    assert runs.table_lines([entries[BLESSED_RUN]])[1].endswith("0.3100  v1")


def test_one_run_in_full_gives_its_checks_intervals_failure_fix_and_log(recorded):
    home, log = recorded
    entries = _entries(home, [runs.Aliased(MODEL, "2", "previous", None, STORE)])
    rejected = "\n".join(runs.detail_lines(entries[REJECTED_RUN], home))
    # No Airflow record of it: the time in its run id.
    assert (
        f"run        {REJECTED_RUN}\nstate      finished* · triggered 2026-11-26 03:00:00\npreset     guide\n"
        in rejected
    )
    assert f"folder     {home / 'runs' / layout.safe_run_id(REJECTED_RUN)}\n" in rejected
    assert "gate       NOT BLESSED\n           PASS metric: candidate accuracy present\n" in rejected
    assert "           FAIL champion: -0.1110\n" in rejected
    assert (
        "           95% intervals: candidate 0.7010 [0.6700, 0.7310] · candidate - champion -0.1110 [-0.1400, -0.0820]"
        in rejected
    )
    assert (
        "metrics    val_accuracy 0.7010 · baseline_val_accuracy 0.7500 · champion_val_accuracy 0.8120 · "
        "mlm_val_accuracy 0.3100\n" in rejected
    )
    assert f"registry   {MODEL} v2 previous · MLflow run mlflowrun2 · http://mlflow:5000\n" in rejected
    assert "pretrain   1 x gpu, mixed_bfloat16\n" in rejected  # the NaN time is left out, not printed as nan
    docs = home / "runs" / layout.safe_run_id(REJECTED_RUN) / "data_docs"
    assert f"data docs sst2: {docs / 'sst2' / 'index.html'}" in rejected

    failed = "\n".join(runs.detail_lines(entries[FAILED_RUN], home))
    assert "state      failed · started 2026-11-27 09:00:01\n" in failed
    assert (
        "failed     at validate_labeled, try 2: ValidationFailed: labeled: 3 of 12 expectations failed\n"
        "           fix: fix the file named above, or point --labeled at a good copy\n"
        f"           log: {log}\n"
        "gate       FAILED\n"
    ) in failed
    assert "registry   not registered" in failed
    # A task tried more than once: how each try ended, under the failure (the first killed with its worker).
    tries = home / "runs" / layout.safe_run_id(FAILED_RUN) / "tries"
    layout.write_json(tries / "build_shard.3.json", {"try": 2, "earlier": [{"try": 1}], "ended": {"as": "returned"}})
    layout.write_json(tries / "check_params.json", {"try": 1, "ended": {"as": "success"}})
    failed = "\n".join(runs.detail_lines(entries[FAILED_RUN], home))
    assert (
        f"           log: {log}\n"
        "retried    build_shard[3]: try 1 never ended (its process was killed, or a person marked it failed); try 2 "
        "ran to the end\n"
        "gate       FAILED\n"
    ) in failed

    queued = "\n".join(runs.detail_lines(entries[QUEUED_RUN], home))
    assert "folder     none (the run has not written one)\n" in queued and "gate       in flight" in queued


def test_the_cli_lists_finds_and_prints_json_without_an_airflow_or_a_registry(recorded, monkeypatch, capsys):
    home, _ = recorded
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", raising=False)
    assert cli.main(["runs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ENCODERFLOW_HOME={home}"
    assert out[1].startswith("Airflow not asked: no Airflow metadata DB found for this home: set AIRFLOW_HOME")
    # The runs registered in a server that does not answer here: said so, and no alias is claimed.
    # An unreachable server is named as the outage it is, with why.
    assert out[2] == (
        "MLflow could not be asked: the MLflow server at http://mlflow:5000 is not reachable "
        "(Name or service not known)"
    ), out[2]
    rows = [line.split()[:2] for line in out[5:8]]
    assert sorted(rows) == sorted([[FAILED_RUN, "failed*"], [REJECTED_RUN, "finished*"], [BLESSED_RUN, "finished*"]])
    # Not "no Airflow asked knows this run": none was asked.
    assert out[8] == "* Airflow was not asked (above): the state is what the run's folder says"
    assert out[-1].startswith("encoderflow runs RUN")

    assert cli.main(["runs", "--limit", "1"]) == 0
    assert "2 older run(s) not shown (--limit 0 shows all)" in capsys.readouterr().out

    # A run by the start of its id; the start of several is refused, naming them.
    assert cli.main(["runs", "scheduled"]) == 0
    assert capsys.readouterr().out.startswith(f"run        {REJECTED_RUN}\n")
    assert cli.main(["runs", "manual__2026-11-2"]) == 2
    err = capsys.readouterr().err
    assert "2 runs start with 'manual__2026-11-2'" in err and BLESSED_RUN in err and "give more of the run id" in err
    assert cli.main(["runs", "nope"]) == 2
    assert "no run 'nope' under ENCODERFLOW_HOME=" in capsys.readouterr().err
    # By its folder name, too.
    assert cli.main(["runs", layout.safe_run_id(FAILED_RUN)]) == 0
    assert "failed     at validate_labeled" in capsys.readouterr().out

    # Strict JSON: the NaN a summary holds becomes null (a NaN would make the whole answer unreadable to jq).
    def refuse(name: str):
        raise AssertionError(f"{name} in the JSON")

    assert cli.main(["runs", "--json"]) == 0
    said = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert said["home"] == str(home) and said["airflow"].startswith("Airflow not asked")
    by_id = {r["run_id"]: r for r in said["runs"]}
    assert by_id[REJECTED_RUN]["summary"]["runtime"]["pretrain"]["seconds"] is None
    assert by_id[BLESSED_RUN]["metrics"]["val_accuracy"] == 0.812 and by_id[BLESSED_RUN]["aliases"] is None
    assert cli.main(["runs", "--json", REJECTED_RUN]) == 0
    assert json.loads(capsys.readouterr().out, parse_constant=refuse)["gate"]["blessed"] is False


def test_a_home_with_no_runs_says_so_and_where_it_looked(encoderflow_home, monkeypatch, capsys):
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", raising=False)
    assert cli.main(["runs"]) == 0
    out = capsys.readouterr().out
    assert f"ENCODERFLOW_HOME={encoderflow_home}\n" in out
    assert out.rstrip().endswith(
        "no runs yet: trigger encoder_pretraining (or set ENCODERFLOW_HOME to the folder your runs used)"
    )
    with pytest.raises(SystemExit):
        cli.main(["runs", "--limit", "-1"])
    assert "--limit: -1 is below 0" in capsys.readouterr().err


def test_runs_are_found_by_any_of_their_names_and_a_pruned_one_by_its_record(recorded):
    from encoderflow import prune

    home, _ = recorded
    folder = layout.run_dir(REJECTED_RUN)
    layout.write_json(folder / layout.RESOLVED_FILE, {"set": {"model.dropout": 0.2}, "triggered_by": "alice"})
    assert len(prune.apply(home, prune.Plan(remove=[prune.Item("run", folder, "test")])).remove) == 1
    entries = list(_entries(home, []).values())
    # The start of a folder name, as `ls runs/` shows it (":" and "+" are "_" there).
    assert runs.find(entries, "manual__2026-11-27T09_00")["run_id"] == FAILED_RUN
    pruned = runs.find(entries, folder.name)
    assert pruned["run_id"] == REJECTED_RUN and runs.find(entries, "scheduled__2026-11-26T03_00") is pruned
    shown = "\n".join(runs.detail_lines(pruned, home))
    record = home / "pruned" / f"{folder.name}.json"
    assert pruned["settings"] == {"model.dropout": 0.2} and pruned["triggered_by"] == "alice"  # its resolved.json kept
    assert record.is_file() and f"its record: {record}" in shown, shown
    assert "NOT BLESSED" in shown and "data docs" not in shown  # its Data Docs went with the folder


def test_the_newest_run_comes_first_even_when_no_airflow_asked_knows_it(recorded, monkeypatch, capsys):
    from encoderflow import prune

    home, _ = recorded
    # A run the Airflow asked has forgotten (a reset DB), newer than every run it knows.
    newest = "manual__2026-12-05T00:00:00+00:00"
    layout.write_json(layout.run_dir(newest) / "summary.json", {"run_id": newest, "gate": {"blessed": False}})
    # A pruned run: its record was written now, but the run is from November.
    folder = layout.run_dir(REJECTED_RUN)
    assert len(prune.apply(home, prune.Plan(remove=[prune.Item("run", folder, "test")])).remove) == 1
    ordered = [e["run_id"] for e in runs.newest_first(list(_entries(home, []).values()))]
    assert ordered == [newest, QUEUED_RUN, FAILED_RUN, REJECTED_RUN, BLESSED_RUN]
    # A run id with no date in it sorts by when its folder last changed: now, the newest.
    layout.write_json(layout.run_dir("nightly-rebuild") / "summary.json", {"run_id": "nightly-rebuild"})
    assert runs.newest_first(list(_entries(home, []).values()))[0]["run_id"] == "nightly-rebuild"
    # So a --limit shows the newest, and what it leaves out is older.
    known = [{"run_id": BLESSED_RUN, "state": "success", "start_date": "2026-11-25T10:00:01+00:00"}]
    monkeypatch.setattr(runs, "asking_airflow", lambda home: lambda: runs.DagRuns(known, True, "Airflow x: 1 runs"))
    assert cli.main(["runs", "--limit", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[5:7]] == ["nightly-rebuild", newest], out
    assert out[-2] == "3 older run(s) not shown (--limit 0 shows all)", out


def test_an_alias_marks_only_the_version_of_the_runs_own_store(recorded):
    home, _ = recorded
    # The blessed run registered v1 in http://mlflow:5000; another store's v1 is another model.
    other = "sqlite:////elsewhere/mlflow.db"
    elsewhere = [runs.Aliased(MODEL, "1", "champion", None, other)]
    assert _entries(home, elsewhere, (STORE, other))[BLESSED_RUN]["aliases"] == []
    here = [runs.Aliased(MODEL, "1", "champion", None, "http://mlflow:5000/")]
    assert _entries(home, here, ("http://mlflow:5000/",))[BLESSED_RUN]["aliases"] == ["champion"]
    # A store the run recorded that was not asked (a home moved since: its old path is gone) is
    # looked for in every store asked.
    assert _entries(home, elsewhere, (other,))[BLESSED_RUN]["aliases"] == ["champion"]
    # A summary from before runs recorded their store matches the version in any store.
    summary = layout.run_dir(BLESSED_RUN) / "summary.json"
    data = json.loads(summary.read_text())
    del data["registry"]["tracking_uri"]
    summary.write_text(json.dumps(data))
    assert _entries(home, elsewhere, (STORE, other))[BLESSED_RUN]["aliases"] == ["champion"]


def test_odd_files_in_a_run_folder_do_not_take_the_record_down(recorded, monkeypatch):
    home, _ = recorded
    failed, blessed = layout.run_dir(FAILED_RUN), layout.run_dir(BLESSED_RUN)
    (failed / "failure.json").write_text('["not", "an", "object"]')
    data = json.loads((blessed / "summary.json").read_text())
    data.update(gate=None, metrics=None, config_hash=12345, artifacts=1)
    data["registry"]["registered_model"] = ["not", "a", "name"]
    data["runtime"] = {"pretrain": {"seconds": "12.5", "device": "1 x cpu"}, "finetune": 3.0}
    (blessed / "summary.json").write_text(json.dumps(data))
    (blessed / "gate.json").write_text('"a string"')
    gate = json.loads((layout.run_dir(REJECTED_RUN) / "gate.json").read_text())
    gate["checks"][0]["name"] = ["a", "list"]
    (layout.run_dir(REJECTED_RUN) / "gate.json").write_text(json.dumps(gate))
    entries = _entries(home, [runs.Aliased(MODEL, "1", "champion", None, STORE)])
    # Airflow says the failed run failed; its unreadable failure.json is left out.
    assert entries[FAILED_RUN]["failure"] is None and runs.verdict_of(entries[FAILED_RUN]) == "FAILED"
    shown = "\n".join(runs.detail_lines(entries[BLESSED_RUN], home))
    assert "preset     guide · config_hash 12345\n" in shown and "pretrain   12.5 s, 1 x cpu" in shown
    assert "finetune" not in shown and "gate       not gated" not in shown, shown
    assert runs.table_lines(list(entries.values()))  # and the table too
    assert "gate       NOT BLESSED" in runs.detail_lines(entries[REJECTED_RUN], home)
    # MLflow's stores are read from the same summaries: a list, a string registry, a number for a URI.
    for name, value in cli.INTERACTIVE_MLFLOW.items():  # the unreachable server: one retry, not minutes
        monkeypatch.setenv(name, value)
    for odd in (["not", "an", "object"], {"registry": "v1"}, {"registry": {"tracking_uri": 5}}):
        (blessed / "summary.json").write_text(json.dumps(odd))
        aliased, said, stores = runs.aliased_versions(home)
        assert aliased is None and said.startswith(
            "MLflow could not be asked: the MLflow server at http://mlflow:5000 "
        ), said
        assert stores == {STORE}


def test_runs_of_several_models_are_told_apart_and_can_be_listed_alone(recorded, capsys, monkeypatch):
    """A home with your own data's model beside SST-2's listed three BLESSED v1 champions in one
    accuracy column, each of another task, with no model named."""
    from encoderflow import cli

    home, _ = recorded
    entries = _entries(home, None)
    assert runs.table_lines(list(entries.values()))[0].split()[-1] == "version"  # one model: no column for it
    summary = layout.run_dir(REJECTED_RUN) / "summary.json"
    data = json.loads(summary.read_text())
    data["registry"]["registered_model"] = "tickets"
    summary.write_text(json.dumps(data))
    # A run that failed before registering names its model in the config check_params resolved.
    layout.write_json(
        layout.run_dir(FAILED_RUN) / layout.RESOLVED_FILE, {"config": {"gate": {"registered_model": "tickets"}}}
    )
    entries = _entries(home, None)
    lines = runs.table_lines(list(entries.values()))
    assert lines[0].split()[-2:] == ["model", "version"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[REJECTED_RUN][-2:] == ["tickets", "v2"] and rows[BLESSED_RUN][-2:] == [MODEL, "v1"]
    assert rows[FAILED_RUN][-2:] == ["tickets", "–"]
    monkeypatch.setattr(runs, "aliased_versions", lambda home: (None, "MLflow: not asked", ()))
    capsys.readouterr()
    assert cli.main(["runs", "--model", "tickets", "--limit", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in out if line.startswith(("manual__", "scheduled__"))]
    assert sorted(listed) == sorted([REJECTED_RUN, FAILED_RUN])
    assert cli.main(["runs", "--model", "nosuch"]) == 2
    said = capsys.readouterr().err
    assert f"no run in {home} trains model 'nosuch' (the runs here train {MODEL}, tickets)" in said


def test_an_unchanged_run_says_why_nothing_trained(encoderflow_home):
    folder = layout.run_dir("manual__2026-12-01T00:00:00+00:00")
    message = "nothing changed since champion v4"
    layout.write_json(
        folder / "summary.json",
        {"run_id": "manual__2026-12-01T00:00:00+00:00", "preset": "guide", "unchanged": {"message": message}},
    )
    [entry] = runs.collect_runs(encoderflow_home)
    assert runs.verdict_of(entry) == "SKIPPED"
    [line] = [line for line in runs.detail_lines(entry, encoderflow_home) if line.startswith("gate ")]
    # a summary written before skips said why reads as the champion's lineage, the only skip there was then
    assert line.startswith(f"gate       SKIPPED: {message} (data, code and config hashes equal the champion's;"), line
    assert line.endswith("; set force to train anyway"), line


def test_airflows_empty_dates_read_as_none_and_its_runs_merge_newest_first(encoderflow_home, monkeypatch):
    answers = {
        "a": [
            {
                "run_id": "r1",
                "state": "success",
                "run_after": "2026-12-01T00:00:00+00:00",
                "start_date": "2026-12-01T00:00:01+00:00",
                "end_date": "",
            }
        ],
        "b": [
            {
                "run_id": "r2",
                "state": "queued",
                "run_after": "2026-12-02T00:00:00+00:00",
                "start_date": "",
                "end_date": "",
            }
        ],
    }
    monkeypatch.setattr(runs, "_airflow_envs", lambda home: ([("a", {"n": "a"}), ("b", {"n": "b"})], None))
    monkeypatch.setattr(runs, "_start_list_runs", lambda env, dag_id: lambda: answers[env["n"]])
    said = runs.dag_runs(encoderflow_home)
    assert said.asked and said.said == "Airflow a: 1 runs; b: 1 runs"
    assert [r["run_id"] for r in said.runs] == ["r2", "r1"]
    assert said.runs[0]["start_date"] is None and said.runs[1]["end_date"] is None
    assert runs.ask_airflow(encoderflow_home).in_flight == ["r2"]


def test_airflow_is_asked_while_mlflow_is_and_every_airflow_at_once(recorded, monkeypatch, capsys):
    # Each Airflow CLI takes seconds to start: asked one after the other, a reader would wait for their sum.
    started, mlflow_asked = [], []

    def start(env, dag_id):
        started.append(env["n"])

        def answered():
            if len(started) < 2 or not mlflow_asked:
                return f"awaited with {started} started and MLflow {'asked' if mlflow_asked else 'not asked'}"
            return [{"run_id": BLESSED_RUN, "state": "success", "start_date": "2026-11-25T10:00:01+00:00"}]

        return answered

    def aliased_versions(home):
        mlflow_asked.append(True)
        return [], "MLflow (x): no aliased version", set()

    monkeypatch.setattr(runs, "_airflow_envs", lambda home: ([("a", {"n": "a"}), ("b", {"n": "b"})], None))
    monkeypatch.setattr(runs, "_start_list_runs", start)
    monkeypatch.setattr(runs, "aliased_versions", aliased_versions)
    assert cli.main(["runs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "Airflow a: 1 runs; b: 1 runs", out


INTERRUPTED = r"""
import os, sys
from encoderflow import runs
sys.executable = sys.argv[1]  # the Airflow CLI it starts: a script that sleeps
answered = runs._start_list_runs(dict(os.environ), "encoder_pretraining")
while not os.path.exists(sys.argv[3]):  # the CLI has started and said its pid
    pass
print("waiting", flush=True)
if sys.argv[2] == "reads":
    answered()
"""


@pytest.mark.parametrize("reader", ["reads", "exits without reading"])
def test_an_interrupted_reader_ends_at_once_and_takes_airflows_cli_with_it(tmp_path, reader):
    """A SIGINT to the reader alone (kill -INT, a supervisor): it used to wait out Airflow's CLI, up to 300 s.
    Whether it was waiting for the answer or still asking MLflow, the CLI goes with it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "cli.pid"
    sleeper = tmp_path / "airflow-cli"
    # As long as Airflow's CLI may take (300 s): a reader that waited it out would not end in the wait below.
    sleeper.write_text(f"#!/bin/sh\necho $$ > {pid_file}.tmp\nmv {pid_file}.tmp {pid_file}\nexec sleep 300\n")
    sleeper.chmod(0o755)
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED, str(sleeper), reader.split()[0], str(pid_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "waiting\n"
    cli_pid = int(pid_file.read_text())
    if reader == "reads":
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)  # ends on the signal (about a second), far short of the CLI's 300 s
    assert ("KeyboardInterrupt" in proc.stderr.read()) == (reader == "reads")
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(cli_pid, 0)  # killed and reaped by the reader, not left running


def test_a_run_triggered_in_the_ui_shows_its_preset_and_log_before_it_reports(recorded, tmp_path):
    # make airflow / make stack: Airflow writes the log under its base_log_folder, not the run folder,
    # and a run that failed before report has no summary: its failure record says both.
    home, log = recorded
    log.unlink()
    folder = layout.run_dir(FAILED_RUN)
    failure = json.loads((folder / "failure.json").read_text())
    url = f"http://localhost:8080/dags/encoder_pretraining/runs/{FAILED_RUN}/tasks/validate_labeled?try_number=2"
    logs = tmp_path / "airflow" / "logs"
    failure |= {"preset": "smoke", "log_url": url, "log_folder": str(logs), "dag_id": "encoder_pretraining"}
    (folder / "failure.json").write_text(json.dumps(failure))
    entry = _entries(home, [])[FAILED_RUN]
    assert entry["preset"] == "smoke"
    assert [line.split()[2] for line in runs.table_lines([entry])[1:]] == ["smoke"]
    detail = "\n".join(runs.detail_lines(entry, home))
    assert f"           log: {url} (Airflow UI)\n" in detail
    airflow_log = (
        logs / "dag_id=encoder_pretraining" / f"run_id={FAILED_RUN}" / "task_id=validate_labeled" / "attempt=2.log"
    )
    airflow_log.parent.mkdir(parents=True)
    airflow_log.write_text("ValidationFailed: ...\n")
    assert f"           log: {airflow_log}\n" in "\n".join(runs.detail_lines(_entries(home, [])[FAILED_RUN], home))


def test_a_run_stopped_before_or_between_tasks_names_no_task(encoderflow_home):
    """A Ctrl-C in a run's first seconds read "failed at a task, try ?"."""
    from encoderflow import airflow_adapter as af

    run_id = "manual__2026-12-07T09:46:40.000000+00:00"
    cause = errors.Cause("Interrupted", "Ctrl-C between tasks", af.rerun_fix(None), expected=True)
    errors.record_failure(run_id, cause, dag_id=DAG_ID, run_id=run_id, preset="smoke")
    [entry] = runs.collect_runs(encoderflow_home)
    lines = runs.detail_lines(entry, encoderflow_home)
    assert "failed     Interrupted: Ctrl-C between tasks" in lines and entry["preset"] == "smoke"
    assert "           fix: run it again: what finished is reused" in lines  # no backup to resume from
    assert runs.failed_at({"task_id": "build_shard", "map_index": 3, "try_number": 2}) == "build_shard[3], try 2"
    assert af.rerun_fix("pretrain").endswith("and pretraining resumes from its last backup")
    # A backup taken by other code (an upgrade since) is not resumed: the record promised hours it did not keep.
    from encoderflow.train.pretrain import BACKUP_CODE

    backups = layout.run_dir(run_id) / "pretrain" / "backup"
    backups.mkdir(parents=True)
    (backups / BACKUP_CODE).write_text(layout.code_hash() + "\n")
    assert af.rerun_fix("pretrain", run_id).endswith("and pretraining resumes from its last backup")
    (backups / BACKUP_CODE).write_text("0" * 64 + "\n")
    assert af.rerun_fix("pretrain", run_id) == (
        "run it again: what finished is reused; pretraining starts over: its backup was taken by other code "
        "(the code changed since), which this code does not resume"
    )


def test_a_cleared_run_keeps_its_trigger_time_beside_airflows_start_date(encoderflow_home):
    """A clear resets Airflow's start_date: the cleared run read as started at the clear, 20 s long."""
    entry = {
        "run_id": "manual__2026-12-07T10:39:50+00:00",
        "state": "success",
        "run_after": "2026-12-07T10:39:50+00:00",
        "start_date": "2026-12-07T10:44:37+00:00",
        "end_date": "2026-12-07T10:44:57+00:00",
    }
    assert "2026-12-07 10:39:50" in runs.table_lines([entry])[1]
    [state] = [line for line in runs.detail_lines(entry, encoderflow_home) if line.startswith("state ")]
    times = "triggered 2026-12-07 10:39:50 · started 2026-12-07 10:44:37 · ended 2026-12-07 10:44:57"
    assert state == f"state      success · {times}"
    # Who asked for it, as check_params recorded it (resolved.json): a team reading the list asks first.
    [state] = [
        line
        for line in runs.detail_lines({**entry, "triggered_by": "alice"}, encoderflow_home)
        if line.startswith("state ")
    ]
    assert state == f"state      success · {times.replace('10:39:50', '10:39:50 by alice', 1)}"


def test_a_run_says_what_it_set_and_when_it_started_after_airflow_forgot_it(encoderflow_home):
    """After weeks, "which run was the lr=0.002 one?" had no answer outside old task logs; and after
    `airflow db clean` the started column read "–" though the time is in the run id."""
    run_id = "manual__2026-12-07T15:20:15.461561+00:00"
    layout.write_json(
        layout.run_dir(run_id) / layout.RESOLVED_FILE,
        {"preset": "smoke", "set": {"finetune.learning_rate": 0.002, "model.padding_mask": False}},
    )
    [entry] = runs.collect_runs(encoderflow_home)
    assert entry["settings"] == {"finetune.learning_rate": 0.002, "model.padding_mask": False}
    assert entry["run_after"] == "2026-12-07T15:20:15"  # from the folder's name: no Airflow record
    assert "2026-12-07 15:20:15" in runs.table_lines([entry])[1]
    lines = runs.detail_lines(entry, encoderflow_home)
    assert "set        finetune.learning_rate=0.002 model.padding_mask=false" in lines
    assert lines[1] == "state      unknown* · triggered 2026-12-07 15:20:15"
    # A run of the preset's values says so; one recorded before resolved.json kept them says nothing.
    assert runs.settings_text({}) == "nothing (the preset's values)"
    assert not any(line.startswith("set ") for line in runs.detail_lines({**entry, "settings": None}, encoderflow_home))
    assert runs.time_in_run_id("scheduled__2026-11-26T03:00:00+00:00") == "2026-11-26T03:00:00"
    assert runs.time_in_run_id("my-own-run") is None


def test_a_run_in_flight_with_its_airflow_away_keeps_its_id_its_figures_and_no_verdict(
    encoderflow_home, monkeypatch, capsys
):
    """The stack's PostgreSQL down mid-run: `runs` listed the run under its folder's name, "not gated", and
    `encoderflow runs manual__2026-12-07T21:34` (the id as Airflow spells it) found no run. Its pretraining's
    MLM accuracy showed only once report had run."""
    run_id = "manual__2026-12-07T21:34:18.315172+00:00"
    folder = layout.run_dir(run_id)
    layout.write_json(folder / layout.RESOLVED_FILE, {"run_id": run_id, "preset": "smoke", "set": {}})
    layout.write_json(folder / "pretrain" / "result.json", {"mlm_val_accuracy": 0.0648})
    layout.write_json(folder / "baseline" / "result.json", {"baseline_val_accuracy": 0.7523})
    [entry] = runs.collect_runs(encoderflow_home)
    assert entry["run_id"] == run_id and runs.verdict_of(entry) == "unknown"
    assert entry["metrics"] == {"mlm_val_accuracy": 0.0648, "baseline_val_accuracy": 0.7523}
    assert runs.find([entry], "manual__2026-12-07T21:34") is entry
    assert runs.find([entry], "manual__2026-12-07T21:34:18.315172+00:00") is entry
    # The one-run view explains its star as the list does, with why no Airflow was asked.
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", raising=False)
    assert cli.main(["runs", "manual__2026-12-07T21:34"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("state      unknown* · triggered 2026-12-07 21:34:18"), out
    assert out[2].startswith("           * Airflow not asked: no Airflow metadata DB found for this home"), out
    assert out[2].endswith(": the state is what its folder says"), out
    # A folder's own resolved.json names only its own run: one copied from another folder is not believed.
    other = encoderflow_home / "runs" / "copied"
    other.mkdir()
    layout.write_json(other / layout.RESOLVED_FILE, {"run_id": run_id})
    assert {e["run_id"] for e in runs.collect_runs(encoderflow_home)} == {run_id, "copied"}
    # Once gated, the gate's figures join pretraining's.
    layout.write_json(folder / "gate.json", {"blessed": True, "reasons": [], "candidate": 0.797, "baseline": 0.75})
    [entry] = [e for e in runs.collect_runs(encoderflow_home) if e["run_id"] == run_id]
    assert entry["metrics"]["val_accuracy"] == 0.797 and entry["metrics"]["mlm_val_accuracy"] == 0.0648


def test_a_stopped_stack_worker_is_named_where_runs_say_in_flight(tmp_path):
    """A stopped worker left its queue's tasks queued while `runs` said only "in flight" (stack-status told)."""
    from encoderflow.stack import Stack

    home = tmp_path / "home"
    st = Stack(home)
    st._want("worker-gpu", True)  # started once, and not stopped since; no supervisor here to restart it
    said = runs.idle_queues(home)
    assert said == (
        " (waiting for a worker: worker-default (queue default) is stopped: python -m encoderflow.stack start "
        "worker-default, or make stack; worker-gpu (queue gpu) is stopped: python -m encoderflow.stack start "
        "worker-gpu, or make stack; a queue's tasks wait for its worker)"
    ), said


def test_the_one_run_view_names_the_stopped_worker_its_tasks_wait_for(tmp_path, monkeypatch, capsys):
    """`encoderflow runs <run>` said only "gate in flight" while pretrain sat queued for a stopped gpu worker."""
    from encoderflow.stack import Stack

    home = tmp_path / "home"
    monkeypatch.setenv("ENCODERFLOW_HOME", str(home))
    Stack(home)._want("worker-gpu", True)
    run_id = "manual__2026-12-07T21:36:00+00:00"
    layout.write_json(layout.run_dir(run_id) / layout.RESOLVED_FILE, {"run_id": run_id, "preset": "smoke"})
    listed = [{"run_id": run_id, "state": "running", "start_date": "2026-12-07T21:36:01+00:00"}]
    waiting = runs.idle_queues(home)
    said = "Airflow make stack (PostgreSQL): 1 runs" + waiting
    monkeypatch.setattr(runs, "asking_airflow", lambda home: lambda: runs.DagRuns(listed, True, said, waiting))
    monkeypatch.setattr(runs, "aliased_versions", lambda home: ([], "MLflow (x): no aliased version", set()))
    assert cli.main(["runs", run_id]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == (
        "workers    waiting for a worker: worker-default (queue default) is stopped: python -m encoderflow.stack "
        "start worker-default, or make stack; worker-gpu (queue gpu) is stopped: python -m encoderflow.stack start "
        "worker-gpu, or make stack; a queue's tasks wait for its worker"
    ), out
