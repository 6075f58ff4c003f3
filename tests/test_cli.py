"""The command-line contract: clear refusals before any work, exit codes that mean something."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from encoderflow import cli, errors, layout, runs
from encoderflow.config import ConfigError, from_params
from encoderflow.train.callbacks import NonFiniteLoss

REPO = Path(__file__).resolve().parents[1]


def test_config_prints_resolved_values(capsys, tmp_path):
    assert cli.main(["config", "--preset", "smoke", "--set", "model.num_layers=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "smoke" and out["model"]["num_layers"] == 2 and len(out["config_hash"]) == 64
    # As the usage writes it, several after one --set (it was "unrecognized arguments"), or repeated.
    assert cli.main(["config", "--set", "model.num_layers=2", "finetune.epochs=3", "--set", "data.seed=9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model"]["num_layers"], out["finetune"]["epochs"], out["data"]["seed"]) == (2, 3, 9)
    # A data file's sections are config too; --set still wins over them.
    data_file = tmp_path / "data.yaml"
    data_file.write_text("labeled: tickets/\ninputs: {text_column: body}\nmodel: {num_layers: 3, num_heads: 2}\n")
    assert cli.main(["config", "--preset", "smoke", "--data-file", str(data_file), "--set", "model.num_layers=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["inputs"]["text_column"], out["model"]["num_layers"], out["model"]["num_heads"]) == ("body", 2, 2)


def test_run_help_is_the_form_declarations(monkeypatch, capsys):
    """Each source and run option is declared once (config.Sources, config.RunOptions): the trigger form's
    description is the flag's help; --data-dir, --mirror and --sources-file had help of their own."""
    import re
    from dataclasses import fields

    from encoderflow.config import RunOptions, Sources

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in (*fields(Sources), *fields(RunOptions)):
        said = " ".join(f.metadata["description"].split())
        # The CLI resolves a relative path itself: the form's "Absolute path" is "Path" here.
        said = re.sub(r"^Absolute path", "Path", said).replace("an absolute path or", "a path or")
        assert said in text, f.name


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.layers=2", "model.layers"),
        ("model.num_layers=two", "model.num_layers"),
        ("pretrain.learning_rate=-1", "pretrain.learning_rate"),
        ("nosection", "nosection"),
    ],
)
def test_bad_override_is_refused_naming_the_key(override, named, capsys):
    assert cli.main(["config", "--set", override]) == 2
    assert named in capsys.readouterr().err


def test_run_refuses_a_bad_override_before_starting_airflow(capsys):
    assert cli.main(["run", "--preset", "smoke", "--set", "data.mask_rate=1.5"]) == 2
    err = capsys.readouterr().err
    assert "data.mask_rate" in err


def test_validate_names_the_missing_offline_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["validate", "--preset", "smoke", "--data-dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "SST-2/train.tsv" in err


@pytest.mark.parametrize("flag", ["--corpus", "--labeled", "--sources-file"])
def test_run_refuses_a_path_that_does_not_exist_before_starting_airflow(tmp_path, flag, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["run", "--preset", "smoke", flag, str(missing)]) == 2
    kind = "file" if flag == "--sources-file" else "folder"
    assert (
        f"ConfigError: {flag} {missing}: does not exist; fix: give {flag} an existing {kind}" in capsys.readouterr().err
    )


def test_run_refuses_an_offline_folder_lacking_a_file_before_starting_airflow(tmp_path, capsys):
    from tests.fixtures_pipeline import write_tree

    tree = write_tree(tmp_path / "data")
    (tree / "SST-2" / "dev.tsv").unlink()
    assert cli.main(["run", "--preset", "smoke", "--data-dir", str(tree)]) == 2
    err = capsys.readouterr().err
    assert (
        f"DataError: offline data folder {tree}: missing SST-2/dev.tsv; fix: put the missing file(s) under {tree}"
        in err
    )
    # A folder that is not there lists what this run reads: smoke never reads WikiText's train split.
    assert cli.main(["run", "--preset", "smoke", "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "does not exist; a run here reads:" in err and "wiki.test.raw" in err and "wiki.train.raw" not in err
    assert not (layout.airflow_home() / "airflow.db").exists()  # refused before Airflow's DB was made


def test_run_refuses_a_data_files_missing_folder_naming_the_file(tmp_path, capsys):
    data_file = tmp_path / "data.yaml"
    data_file.write_text("corpus: nowhere/\ngate:\n  registered_model: t\n")
    assert cli.main(["run", "--preset", "smoke", "--data-file", str(data_file)]) == 2
    assert (
        f"ConfigError: corpus (declared in {data_file}) {tmp_path / 'nowhere'}: does not exist; "
        f"fix: give --corpus an existing folder, or correct {data_file}"
    ) in capsys.readouterr().err


def test_run_refuses_labeled_data_of_your_own_without_a_model_name(tmp_path, capsys):
    assert cli.main(["run", "--preset", "smoke", "--labeled", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"ConfigError: gate.registered_model: labeled data of your own ({tmp_path}) would be registered" in err
    assert "fix: name this task's model: --set gate.registered_model=<name>" in err


def test_predict_without_a_store_says_where_it_looked(capsys):
    assert cli.main(["predict", "a fine film"]) == 2
    assert "no MLflow store at " in capsys.readouterr().err


def test_predict_scores_sentences_with_the_champion(tmp_path, capsys, monkeypatch):
    """A real bundle registered and promoted: each line is label, confidence, sentence, as the Scorer says."""
    from encoderflow import bundle, registry
    from tests import fixtures_pipeline
    from tests.test_bundle import _classifier

    (tmp_path / "in").mkdir()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(fixtures_pipeline.vocab_tokens()) + "\n")
    sentences = ["a fine film", "a dull film", "the plot is thin"]
    texts = [*sentences, "the cast shines", " ".join(["fine"] * 40)]
    # The in-memory classifier's P(positive) per text, on the bundle's tokenization: not the Scorer's.
    cfg, classifier, encoder_path, probs = _classifier(tmp_path, vocab, texts)
    probs = probs.reshape(-1)
    path = bundle.write(tmp_path / "bundle", classifier, encoder_path, vocab, cfg, 0.5)
    name = cfg.gate.registered_model
    decision = {"blessed": True, "reasons": [], "candidate": 0.5, "checks": []}
    version = registry.log_candidate(name, path, cfg.to_dict(), {"val_accuracy": 0.5}, {}, {}, decision)["version"]
    registry.promote(name, version, reason="test")
    capsys.readouterr()

    # One row per input line, blank ones too (marked -), so row n answers line n; the header goes to stderr.
    (tmp_path / "more.txt").write_text("the cast shines\n\n" + " ".join(["fine"] * 40) + "\n")
    assert cli.main(["predict", *sentences, "--file", str(tmp_path / "more.txt"), "--model", name]) == 0
    captured = capsys.readouterr()
    out, err = captured.out.splitlines(), captured.err
    serving = layout.home() / "serving" / name / f"v{version}"
    assert f"model: models:/{name}@champion (v{version}), {serving}" in err
    assert "predict: 1 empty text(s) not scored: their rows read -" in err
    assert "predict: 1 of 5 text(s) longer than the model's 32 tokens: only their first tokens were scored" in err
    predicted, confidence = bundle.Scorer(path).predict(texts)
    expected = [
        f"{['negative', 'positive'][int(i)]}\t{p:.4f}\t{s}"
        for s, i, p in zip(texts, predicted, confidence, strict=True)
    ]
    assert out == expected[:4] + ["-\t-\t"] + expected[4:]
    # Each printed row against the classifier itself: the label the 0.5 threshold gives (0.5 is negative,
    # as fine-tuning's binary accuracy counts it), the confidence that label's probability (to 4 places).
    scored = [line.split("\t") for line in out if not line.startswith("-\t")]
    assert [text for _, _, text in scored] == texts
    for (label, shown, text), p in zip(scored, probs, strict=True):
        assert label == ("positive" if p > 0.5 else "negative"), (text, p)
        assert abs(float(shown) - (p if p > 0.5 else 1 - p)) <= 5e-5 + 1e-6, (text, shown, p)

    # The verified copy in serving/<model>/v<N> is served again, not downloaded again; stdin is "-".
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    with monkeypatch.context() as mp:
        mp.setattr(registry, "download_version", no_download)
        mp.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a fine film\n")))
        assert cli.main(["predict", "--file", "-", "--model", name]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"
    # An altered copy is not served: it is downloaded again.
    (serving / "vocab.txt").write_text("[PAD]\n")
    assert cli.main(["predict", "a fine film", "--model", name]) == 0
    assert capsys.readouterr().out == expected[0] + "\n" and bundle.verify(serving)
    # Another model whose labels are 0 and 1 too (is it a review?) prints them as they are, not as sentiment.
    version = registry.log_candidate("is-review", path, cfg.to_dict(), {"val_accuracy": 0.5}, {}, {}, decision)
    registry.promote("is-review", version["version"], reason="test")
    assert cli.main(["predict", "a fine film", "--model", "is-review"]) == 0
    assert capsys.readouterr().out == f"{int(predicted[0])}\t{confidence[0]:.4f}\ta fine film\n"
    # A tab or line break inside a text made a fourth field or another row ("row n answers line n").
    assert cli.main(["predict", "a fine\tfilm", "two\nlines\r", "--model", name]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split("\t")[2] for row in rows] == ["a fine\\tfilm", "two\\nlines\\r"]
    assert all(len(row.split("\t")) == 3 for row in rows)


def test_promote_takes_a_version_as_runs_prints_it_or_as_its_number(tmp_path, capsys):
    """QA: `encoderflow promote --version v3` failed with argparse's "invalid int value: 'v3'", though
    `encoderflow runs` prints versions as v3."""
    from encoderflow import registry
    from tests.test_bundle import fake_bundle

    name = "encoderflow-sst2"
    decision = {"blessed": True, "reasons": [], "checks": []}
    for tag in "123":
        tags = {"airflow.run_id": f"run-{tag}"}
        registry.log_candidate(name, fake_bundle(tmp_path / tag, tag), {}, {}, {}, tags, decision)
    for given, champion in (("v3", "3"), ("2", "2"), ("V1", "1")):
        assert cli.main(["promote", "--version", given, "--reason", "hand-checked", "--who", "bob"]) == 0
        assert registry.champion(name)["version"] == champion
    assert capsys.readouterr().out.splitlines()[-1] == f"{name}: champion v2 -> v1 by bob: hand-checked"
    # From Python too, as download_version takes it.
    assert registry.promote(name, "v3", "again", who="bob")["to"] == "3"
    # Not a version: one line naming what to give, before MLflow is asked.
    for given in ("x3", "v", "3.0", "@champion"):
        with pytest.raises(SystemExit):
            cli.main(["promote", "--version", given, "--reason", "x"])
        assert f"argument --version: {given!r} is not a version: give its number, 3 or v3" in capsys.readouterr().err
    # A number that is no version is named with the versions there are.
    assert cli.main(["promote", "--version", "v9", "--reason", "x"]) == 2
    assert "encoderflow-sst2: no version 9 in " in capsys.readouterr().err


def test_predict_names_a_file_it_cannot_read_and_the_fix(tmp_path, capsys, monkeypatch):
    assert cli.main(["predict", "--file", str(tmp_path / "nope.txt")]) == 2
    assert f"predict --file {tmp_path / 'nope.txt'}: no such file; fix: give an existing file, or - for stdin" in (
        capsys.readouterr().err
    )
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    assert cli.main(["predict", "--file", str(tmp_path / "latin1.txt")]) == 2
    err = capsys.readouterr().err
    assert f"predict --file {tmp_path / 'latin1.txt'}: not UTF-8 (byte 4: b'\\xe9'); fix: convert it first" in err
    assert cli.main(["predict"]) == 2
    assert (
        "predict: no text given; fix: give sentences as arguments, or --file FILE (- for stdin)"
        in capsys.readouterr().err
    )
    # The same bytes from stdin, or as an argument (Python's lone surrogate for each), failed with a
    # TensorFlow traceback once the model had loaded.
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("ok\ncafé\n".encode("latin-1"))))
    assert cli.main(["predict", "--file", "-"]) == 2
    assert "predict --file -: standard input is not UTF-8 (byte 7: b'\\xe9'); fix: convert it first" in (
        capsys.readouterr().err
    )
    assert cli.main(["predict", "fine", "caf\udce9"]) == 2
    assert "predict: sentence 2 is not UTF-8 (character 4: b'\\xe9'); fix: give UTF-8 text" in capsys.readouterr().err
    # A model name in such bytes read as an MLflow outage ("check that the server is up").
    for command in (["predict", "fine"], ["promote", "--version", "1", "--reason", "ok"], ["rollback"]):
        assert cli.main([*command, "--model", "m\udce9"]) == 2
        assert "--model is not UTF-8 (character 2: b'\\xe9'); fix: give the registered model" in capsys.readouterr().err
    assert cli.main(["predict", "--file", str(tmp_path)]) == 2
    assert f"predict --file {tmp_path}: cannot read it (Is a directory); fix:" in capsys.readouterr().err
    # A batch whose input happens to be empty scores nothing and says so; it is not a failure.
    (tmp_path / "empty.txt").write_text("")
    assert cli.main(["predict", "--file", str(tmp_path / "empty.txt")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"--file {tmp_path / 'empty.txt'} holds no lines: nothing scored" in captured.err


def test_dag_params_become_config_values():
    cfg = from_params(
        {
            "preset": "smoke",
            "pretrain_epochs": 3,
            "gate_min_accuracy": 0.6,
            "finetune_learning_rate": None,
            "overrides": ["model.num_heads=4"],
        }
    )
    assert cfg.pretrain.epochs == 3 and cfg.gate.min_accuracy == 0.6 and cfg.model.num_heads == 4
    assert cfg.finetune.learning_rate == 1e-3  # None keeps the preset's value
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        from_params({"preset": "smoke", "pretrain_epochs": -1})  # 0 is allowed: no pretraining


def test_validate_passes_offline_without_a_train_split_and_fails_on_bad_data(tmp_path, capsys, caplog):
    from tests.fixtures_pipeline import write_tree

    tree = write_tree(tmp_path / "data")
    (tree / "wikitext-103-raw" / "wiki.train.raw").unlink()
    caplog.clear()
    assert cli.main(["validate", "--preset", "smoke", "--data-dir", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "wiki.train.raw not in" in out and "all datasets passed" in out
    # Each result once: the summary's "labeled: PASSED (...)", not also the validation module's log lines.
    assert out.count("labeled: PASSED") == 1
    assert [r.getMessage() for r in caplog.records if r.name == "encoderflow.data.validation"] == []

    dev = tree / "SST-2" / "dev.tsv"
    dev.write_text(dev.read_text().replace("\t1\n", "\t2\n", 1))
    assert cli.main(["validate", "--preset", "smoke", "--data-dir", str(tree)]) == 1
    out = capsys.readouterr().out
    assert f"sst2: {dev}: expect_column_values_to_be_in_set(column='label'" in out
    assert "validate: FAILED" in out


# --- a failed run's summary: the first failure's cause, its fix and its task's log ----------------------------

TOY_DAG = """
import logging, os
from datetime import datetime

from airflow.sdk import dag, task

from encoderflow import airflow_adapter as af
from encoderflow.data.sources import DataError

log = logging.getLogger("encoderflow.toy")


@dag(dag_id=af.DAG_ID, schedule=None, start_date=datetime(2026, 1, 1), catchup=False, default_args=af.DEFAULT_ARGS)
def toy():
    @task(retries=0)
    def fetch():
        log.info("fetch: a line of the first task")
        return 1

    @task(retries=0)
    @af.expected_failures
    def train(x):
        log.info("train: a line of the failing task, input %s", x)
        if os.environ["TOY_FAILURE"] == "interrupt":  # a long step, until Ctrl-C
            open(os.environ["TOY_MARKER"], "w").close()
            import time
            time.sleep(300)
        if os.environ["TOY_FAILURE"] == "bug":
            raise ValueError("disk full\\n  while writing shard 3")
        raise DataError("download http://127.0.0.1:9/SST-2.zip: too slow: 12 bytes in the last 60.2s",
                        fix="use a nearer --mirror or an offline --data-dir")

    @task
    def relay(y):
        return y

    @task
    def report(y):
        return y

    report(relay(train(fetch())))  # two tasks downstream of the failure: dag.test marks one per pass


toy()
"""


def _run_toy(tmp_path: Path, home: Path, failure: str) -> subprocess.CompletedProcess:
    dags = tmp_path / "dags"
    dags.mkdir(parents=True)
    (dags / "toy.py").write_text(TOY_DAG)
    env = {**os.environ, "ENCODERFLOW_HOME": str(home), "ENCODERFLOW_DAGS_FOLDER": str(dags), "TOY_FAILURE": failure}
    cmd = [sys.executable, "-m", "encoderflow.cli", "run", "--preset", "smoke"]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["expected", "bug"])
def test_a_failed_run_ends_with_the_cause_the_fix_and_the_task_log(tmp_path, encoderflow_home, failure):
    proc = _run_toy(tmp_path, encoderflow_home, failure)

    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1] == "=" * 72
    first, cause, fix, log_line = lines[-5:-1]
    run_id = next(line for line in lines if line.startswith("encoderflow run ")).split()[2].rstrip(":")
    if failure == "expected":
        assert first == "  first failure: train, try 1 (no retry)"
        assert (
            cause == "  cause: DataError: download http://127.0.0.1:9/SST-2.zip: too slow: 12 bytes in the last 60.2s"
        )
        assert fix == "  fix:   use a nearer --mirror or an offline --data-dir"
    else:
        assert first == "  first failure: train, try 1 of 1"
        assert cause == "  cause: ValueError: disk full while writing shard 3"
        assert fix == "  fix:   not an expected failure (a bug or an outage): the traceback is in the task log"

    # The printed log exists, under the run folder, and holds the task's own lines and the cause.
    assert log_line.startswith("  log:   ")
    log_file = Path(log_line.removeprefix("  log:   "))
    assert log_file == layout.run_dir(run_id) / "logs" / "task_id=train" / "attempt=1.log"
    text = log_file.read_text()
    assert "INFO encoderflow.toy: train: a line of the failing task, input 1" in text
    assert "fetch: a line of the first task" not in text  # that one is in fetch's own log
    assert "a line of the first task" in (log_file.parents[1] / "task_id=fetch" / "attempt=1.log").read_text()
    assert f"encoderflow FAILED encoder_pretraining.train run={run_id}" in text
    if failure == "expected":
        assert "DataError: download http://127.0.0.1:9/SST-2.zip: too slow" in text
        assert "Traceback" not in text  # an expected failure is its message
        said = text.index("DataError: download http://127.0.0.1:9/SST-2.zip: too slow")
    else:
        assert "Traceback (most recent call last)" in text and "ValueError: disk full" in text
        said = text.index("Traceback (most recent call last)")
    # As in a worker's log (docs/operations.md): the cause, once, then the line to grep for below it.
    assert said < text.index("encoderflow FAILED") and text.count("Traceback (most recent call last)") <= 1

    # The failure callback kept the cause in the run folder.
    record = json.loads((layout.run_dir(run_id) / "failure.json").read_text())
    assert {k: record[k] for k in ("task_id", "map_index", "try_number", "run_id")} == {
        "task_id": "train",
        "map_index": -1,
        "try_number": 1,
        "run_id": run_id,
    }
    assert record["error"] == cause.removeprefix("  cause: ").split(":")[0]
    assert record["fix"] == fix.removeprefix("  fix:   ")

    # The terminal carries the tasks' own lines, not Airflow's INFO chatter around each call, and says
    # the cause once, in the summary (the task runner's record of it repeated it with Airflow's stack).
    output = proc.stdout + proc.stderr
    assert "fetch: a line of the first task" in output and "[DAG TEST] starting task_id=train" in output
    for chatter in (
        "Pushing xcom",
        "Task instance state updated",
        "::group::",
        "::endgroup::",
        "Task failed with",
        "No tasks to run",
    ):
        assert chatter not in output, chatter
    assert output.count(cause.removeprefix("  cause: ").split(": ", 1)[1]) == 1, output[-3000:]


@pytest.mark.slow
def test_a_run_is_refused_while_a_scheduler_runs_on_the_same_airflow(tmp_path, encoderflow_home):
    """With `encoderflow airflow` up on the same home, its scheduler queued the tasks of `encoderflow run`'s
    DAG run too and ran them a second time; when it lost the race the run failed, blaming a worker."""
    import sqlite3
    from datetime import timedelta

    from tests.fixtures_runs import beat_a_scheduler

    first = _run_toy(tmp_path / "first", encoderflow_home, "expected")  # makes the metadata DB
    assert first.returncode == 1
    db = encoderflow_home / "airflow" / "airflow.db"
    # A run of that Airflow left running (its standalone killed): `runs` and `prune` said "in flight", and
    # prune kept everything, with no word that no scheduler was there to finish it.
    with sqlite3.connect(db) as con:
        con.execute("update dag_run set state = 'running'")
    said = runs.asking_airflow(encoderflow_home)().said
    assert "(no scheduler alive on it: its runs in flight wait until that Airflow runs again" in said
    beat = beat_a_scheduler(db)
    assert "no scheduler alive" not in runs.asking_airflow(encoderflow_home)().said
    with sqlite3.connect(db) as con:
        con.execute("update dag_run set state = 'failed'")
    refused = _run_toy(tmp_path / "beside", encoderflow_home, "expected")
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert refused.stderr.startswith(
        "encoderflow run: SchedulerRunning: an Airflow scheduler is running on this home's Airflow "
        f"({encoderflow_home / 'airflow'}; on teamhost as alice, since "
    )
    assert "it would run this run's tasks too, a second time beside this process; fix: trigger the run in" in (
        refused.stderr
    )
    assert "[DAG TEST]" not in refused.stdout + refused.stderr  # no task ran
    # A second standalone on the same home: its scheduler shared the first one's runs.
    env = {**os.environ, "ENCODERFLOW_HOME": str(encoderflow_home), "AIRFLOW__API__PORT": "1"}
    cmd = [sys.executable, "-m", "encoderflow.cli", "airflow"]
    second = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = second.communicate(timeout=180)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    assert second.returncode == 2 and "Airflow standalone" not in out, out[-2000:] + err[-2000:]
    assert err.startswith("encoderflow airflow: SchedulerRunning: an Airflow scheduler is running on this home's ")
    assert "a second standalone's scheduler would share its runs' tasks; fix: use the Airflow that runs" in err
    # A scheduler that stopped beating (killed with its standalone) holds nothing back.
    with sqlite3.connect(db) as con:
        con.execute(
            "update job set latest_heartbeat = ? where hostname = 'teamhost'", (f"{beat - timedelta(hours=2)}",)
        )
    again = _run_toy(tmp_path / "after", encoderflow_home, "expected")
    assert again.returncode == 1 and "SchedulerRunning" not in again.stderr, again.stderr[-3000:]


SUPERVISED = """
import subprocess, sys
from encoderflow import cli
# A stand-in for airflow standalone: a process with a child of its own, as its components are.
tree = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
    "time.sleep(300)"])
other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # the MLflow UI
print(tree.pid, other.pid, flush=True)
sys.exit(cli.supervise(tree, other, grace_s=10))
"""


def test_sigterm_to_encoderflow_airflow_stops_everything_it_started(tmp_path):
    """A SIGTERM to `encoderflow airflow` (timeout, systemd, kill) ended only standalone's own process: its
    scheduler, api-server (its port taken), workers and the MLflow UI ran on."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    tree_pid, other_pid = map(int, proc.stdout.readline().split())
    deadline = time.monotonic() + 60
    while len(psutil.Process(tree_pid).children()) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    started = [psutil.Process(tree_pid), *psutil.Process(tree_pid).children(recursive=True), psutil.Process(other_pid)]
    assert len(started) == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    _, alive = psutil.wait_procs(started, timeout=10)
    assert alive == []


@pytest.mark.slow
def test_a_dag_an_encoderflow_run_created_is_not_paused_for_the_standalone(tmp_path, encoderflow_home):
    """`encoderflow run` before `encoderflow airflow` created the DAG paused: every trigger in the standalone
    started after it waited in 'queued' with no word why."""
    import sqlite3

    assert _run_toy(tmp_path, encoderflow_home, "expected").returncode == 1
    with sqlite3.connect(encoderflow_home / "airflow" / "airflow.db") as con:
        assert con.execute("select dag_id, is_paused from dag").fetchall() == [("encoder_pretraining", 0)]
        con.execute("update dag set is_paused = 1")  # a person paused it: the standalone says so at start
    asked = "from encoderflow import cli; cli.init_airflow(); from encoderflow import airflow_adapter as af; "
    asked += "print(af.paused_dags())"
    env = {**os.environ, "ENCODERFLOW_HOME": str(encoderflow_home)}
    said = subprocess.run([sys.executable, "-c", asked], env=env, cwd=REPO, capture_output=True, text=True)
    assert said.stdout.strip().splitlines()[-1] == "['encoder_pretraining']", said.stdout + said.stderr[-2000:]


def _start_toy_until_training(tmp_path: Path, home: Path) -> tuple[subprocess.Popen, Path]:
    """The toy DAG under ``encoderflow run``, returned once its train task is in its long step."""
    dags = tmp_path / "dags"
    dags.mkdir(exist_ok=True)
    (dags / "toy.py").write_text(TOY_DAG)
    marker = tmp_path / "training"
    env = {
        **os.environ,
        "ENCODERFLOW_HOME": str(home),
        "ENCODERFLOW_DAGS_FOLDER": str(dags),
        "TOY_FAILURE": "interrupt",
        "TOY_MARKER": str(marker),
    }
    cmd = [sys.executable, "-m", "encoderflow.cli", "run", "--preset", "smoke"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate(timeout=60)
    return proc, marker


def _airflow_states(home: Path, run_id: str) -> tuple[str, dict[str, str]]:
    import sqlite3

    with sqlite3.connect(home / "airflow" / "airflow.db") as con:
        (run_state,) = con.execute("select state from dag_run where run_id=?", (run_id,)).fetchone()
        states = dict(con.execute("select task_id, state from task_instance where run_id=?", (run_id,)).fetchall())
    return run_state, states


@pytest.mark.slow
def test_a_killed_run_is_marked_failed_by_the_next_one(tmp_path, encoderflow_home):
    """kill -9 left the run and its task 'running' in Airflow for good."""

    proc, _ = _start_toy_until_training(tmp_path, encoderflow_home)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    [claim] = (encoderflow_home / "airflow" / "encoderflow-runs").iterdir()
    run_id = claim.read_text()
    assert _airflow_states(encoderflow_home, run_id)[0] == "running"
    # Before the next run, `runs` and `prune` said "in flight" for it, and prune kept every folder for it.
    assert layout.stopped_runs() == {run_id}
    asked = runs.asking_airflow(encoderflow_home)()
    assert [r["state"] for r in asked.runs if r["run_id"] == run_id] == ["stopped"]
    assert runs.airflow_states(asked).in_flight == []
    proc = _run_toy(tmp_path / "again", encoderflow_home, "expected")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        f"encoderflow run: run {run_id} stopped without finishing (its process is gone): marked failed "
        "(train failed, relay upstream_failed, report upstream_failed)"
    ) in proc.stderr
    assert _airflow_states(encoderflow_home, run_id) == (
        "failed",
        {"fetch": "success", "train": "failed", "relay": "upstream_failed", "report": "upstream_failed"},
    )
    assert list((encoderflow_home / "airflow" / "encoderflow-runs").iterdir()) == []
    # Its record says where it stopped and what to do ("FAILED", and nothing else, before).
    record = errors.read_failure(run_id)
    assert (record["task_id"], record["try_number"], record["error"]) == ("train", 1, "Stopped")
    assert record["preset"] == "smoke"  # pruned, a killed run read "–" for its preset
    assert record["message"] == (
        "the encoderflow run process that ran it ended during train without finishing (killed, or its machine stopped)"
    )


@pytest.mark.slow
@pytest.mark.parametrize("signum, by", [(2, "Ctrl-C"), (15, "SIGTERM")], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_run_there_and_marks_it_failed(tmp_path, encoderflow_home, signum, by):
    """Ctrl-C used to raise KeyboardInterrupt inside the task: a retry, or training went on and promoted.
    SIGTERM (systemd, `timeout`, a CI cancel) was caught by Airflow's task runner, which only called the
    operator's on_kill: the run went on to the gate and the registry."""
    proc, _ = _start_toy_until_training(tmp_path, encoderflow_home)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    assert (
        f"INTERRUPTED ({by}) during train: nothing after it runs, the run is marked failed; run it again: "
        "what finished is reused\n" in err  # pretraining's backup is only named when pretrain was stopped
    )
    assert "[DAG TEST] starting task_id=relay" not in out + err and "KeyboardInterrupt" not in out + err
    run_id = json.loads(next((encoderflow_home / "runs").glob("*/failure.json")).read_text())["run_id"]
    log = (layout.run_dir(run_id) / "logs" / "task_id=train" / "attempt=1.log").read_text()
    assert "train: a line of the failing task" in log and f"encoderflow INTERRUPTED ({by}) during train" in log
    record = json.loads((layout.run_dir(run_id) / "failure.json").read_text())
    assert (record["task_id"], record["error"], record["message"]) == ("train", "Interrupted", f"{by} during train")
    # The detached marker sets the Airflow run's states once the interrupted process has gone.
    deadline = time.monotonic() + 120
    while (states := _airflow_states(encoderflow_home, run_id))[0] != "failed" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert states == (
        "failed",
        {"fetch": "success", "train": "failed", "relay": "upstream_failed", "report": "upstream_failed"},
    )
    while list((encoderflow_home / "airflow" / "encoderflow-runs").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)  # the marker removes the interrupted process's claim once it is done
    assert list((encoderflow_home / "airflow" / "encoderflow-runs").iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_before_the_first_task_names_the_run_and_leaves_it_failed_not_in_flight(tmp_path, encoderflow_home):
    """Ctrl-C in a run's first seconds said "encoderflow run : INTERRUPTED ... marked failed" with no run
    id, and the run stayed running in Airflow (in flight for `runs`, and prune kept every folder for it)."""

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "toy.py").write_text(TOY_DAG)
    env = {**os.environ, "ENCODERFLOW_HOME": str(encoderflow_home), "ENCODERFLOW_DAGS_FOLDER": str(dags)}
    env["TOY_FAILURE"] = "expected"
    claims = encoderflow_home / "airflow" / "encoderflow-runs"
    cmd = [sys.executable, "-m", "encoderflow.cli", "run", "--preset", "smoke"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (claimed := [p.read_text() for p in claims.glob("*")] if claims.is_dir() else []) or not claimed[0]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # the run id is claimed before dag.test starts the run
    out, err = proc.communicate(timeout=60)
    [run_id] = claimed
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    assert f"encoderflow run {run_id}: INTERRUPTED (Ctrl-C) " in err, err[-2000:]
    deadline = time.monotonic() + 120
    while list(claims.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)  # the detached marker is done
    import sqlite3

    with sqlite3.connect(encoderflow_home / "airflow" / "airflow.db") as con:
        state = con.execute("select state from dag_run where run_id=?", (run_id,)).fetchone()
    assert state in (None, ("failed",)), state  # not made yet, or marked failed: never running for good
    assert layout.stopped_runs() == set()


def test_ctrl_c_ends_any_other_command_with_one_line_not_a_traceback(tmp_path, encoderflow_home):
    """`encoderflow doctor` waiting on a mirror that never answers: Ctrl-C there used to print
    Python's traceback of wherever it was (26 lines, ending in threading's lock.acquire)."""
    import socket
    import threading

    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(120)

        def hold() -> None:  # accept, then say nothing: the probe waits for its answer
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

        threading.Thread(target=hold, daemon=True).start()
        mirror = f"http://127.0.0.1:{server.getsockname()[1]}/"
        cmd = [sys.executable, "-m", "encoderflow.cli", "doctor", "--mirror", mirror, "--timeout", "120"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not held and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            assert held, "doctor never asked the mirror"
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            for conn in held:
                conn.close()
    assert proc.returncode == errors.INTERRUPTED_EXIT, out[-2000:] + err[-2000:]
    assert err.strip().splitlines()[-1] == "encoderflow doctor: interrupted (Ctrl-C)", err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


def test_a_retry_wait_is_said_once_not_every_second():
    """Waiting out a retry printed dag.test's "No tasks to run" warning once a second, 30 lines a wait."""
    import logging

    from encoderflow.airflow_adapter import UnrunnableFilter

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("airflow", logging.WARNING, __file__, 1, message, None, None)

    run = "manual__2026-12-07T09:22:02.123456+00:00"
    waiting = (
        f"No tasks to run. unrunnable tasks: {{<TaskInstance: encoder_pretraining.pretrain {run} [up_for_retry] "
        "ti_id=019a-7c3e>, <TaskInstance: encoder_pretraining.report " + run + " [None] ti_id=019a-7c3f>}"
    )
    downstream = "No tasks to run. unrunnable tasks: {<TaskInstance: encoder_pretraining.report x [None] ti_id=1>}"
    mapped = (
        f"No tasks to run. unrunnable tasks: {{<TaskInstance: d.build_shard {run} map_index=3 [up_for_retry] ti_id=2>}}"
    )
    f = UnrunnableFilter()
    kept = []
    for m in [waiting] * 30 + [downstream, "pretrain: epoch 1/2", waiting.replace("pretrain", "finetune"), mapped]:
        if f.filter(said := record(m)):
            kept.append(said.getMessage())
    # Once, and as the task that waits: each task instance's repr made it a line of 800 characters.
    assert kept == [
        "waiting: pretrain (up_for_retry); a retry starts after its delay",
        "pretrain: epoch 1/2",
        "waiting: finetune (up_for_retry); a retry starts after its delay",
        "waiting: build_shard[3] (up_for_retry); a retry starts after its delay",
    ]


def _summary(capsys, run_id: str, state: str, states) -> list[str]:
    cli.print_summary(run_id, state, states, 12.0)
    return capsys.readouterr().out.rstrip().splitlines()


def test_a_successful_summary_has_no_failure_block(capsys):
    out = _summary(capsys, "manual__1", "success", [("report", -1, "success")])
    assert out[-2:] == [f"  run folder: {layout.run_dir('manual__1')}", "=" * 72]
    assert not [line for line in out if "first failure" in line or "fix:" in line]


def test_a_summary_of_a_run_that_did_not_pretrain_says_so_in_the_dags_order(capsys):
    """finetune.init_from=champion: the files listed "encoder   None", and the stages came finetune first."""
    summary = {
        "metrics": {"val_accuracy": 0.8, "mlm_val_accuracy": None},
        "runtime": {
            "finetune": {"device": "1 x cpu", "dtype_policy": "float32", "seconds": 3.0},
            "pretrain": {"skipped": "finetune.init_from=champion: fine-tuning continues champion v1"},
        },
        "gate": {"blessed": True, "reasons": []},
        "registry": {"registered_model": "m", "version": "2", "champion_version": "2", "tracking_uri": "sqlite:///x"},
        "artifacts": {"encoder": None, "bundle": "/b"},
    }
    layout.write_json(layout.run_dir("manual__3") / "summary.json", summary)
    out = _summary(capsys, "manual__3", "success", [("report", -1, "success")])
    stages = [line.split()[0] for line in out if line.startswith(("  pretrain ", "  finetune "))]
    assert stages == ["pretrain", "finetune"], out
    assert (
        "  pretrain                         not run: finetune.init_from=champion: fine-tuning continues champion v1"
        in out
    )
    assert not any(line.split()[:1] == ["encoder"] for line in out) and "  bundle                           /b" in out


def test_a_failed_summary_without_a_log_file_says_where_the_lines_are(capsys):
    cause = errors.cause_of(NonFiniteLoss("pretrain: loss became nan at step 7; lower the learning rate"))
    errors.record_failure("manual__2", cause, task_id="build_shard", map_index=3, try_number=2, max_tries=2)
    out = _summary(capsys, "manual__2", "failed", [("build_shard", 3, "failed")])
    assert out[-5:] == [
        "  first failure: build_shard[3], try 2 of 2",
        "  cause: NonFiniteLoss: pretrain: loss became nan at step 7",
        "  fix:   lower the learning rate",
        "  log:   none written for this try; its lines are in the output above",
        "=" * 72,
    ]


def test_a_failed_summary_without_any_record_names_the_failed_tasks(capsys):
    out = _summary(capsys, "manual__3", "failed", [("a", -1, "failed"), ("b", -1, "upstream_failed")])
    assert out[-2:] == ["  a failed, and no cause was recorded: see the lines above", "=" * 72]


@pytest.mark.slow
def test_make_airflow_starts_an_mlflow_ui_and_points_the_runs_page_at_it(tmp_path, monkeypatch):
    import socket
    import urllib.request

    monkeypatch.setenv("ENCODERFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for _ in range(3):  # a free port can be taken by another program before the UI binds it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("ENCODERFLOW_MLFLOW_PORT", str(port))
        monkeypatch.delenv("ENCODERFLOW_MLFLOW_UI_URL", raising=False)
        url, proc = cli.start_mlflow_ui()
        if proc is not None:
            break
    try:
        assert url == f"http://localhost:{port}" and os.environ["ENCODERFLOW_MLFLOW_UI_URL"] == url
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "home" / "airflow" / "mlflow-ui.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the MLflow UI did not answer in 120 s"
                time.sleep(0.5)
        # A second `make airflow` while the first runs: the port is taken, nothing more is started.
        again, none = cli.start_mlflow_ui()
        assert none is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_validate_ends_your_own_datas_failures_with_the_fix_a_run_would_give(tmp_path, capsys):
    from tests.data.fixtures_own import write_labeled
    from tests.fixtures_pipeline import write_tree

    tree, labeled = write_tree(tmp_path / "data"), write_labeled(tmp_path / "tickets")
    own = ["--labeled", str(labeled), "--set", "inputs.text_column=body", "--set", "gate.registered_model=tickets"]
    args = ["validate", "--preset", "smoke", "--data-dir", str(tree), *own, "--set", "inputs.label_column=categry"]
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert (
        "  fix: name the label column: --set inputs.label_column=<one of ['id', 'body', 'category']> (now 'categry')"
        in out
    )


def test_run_names_a_data_file_that_does_not_exist_as_such(tmp_path, capsys):
    missing = tmp_path / "data.yaml"
    assert cli.main(["run", "--preset", "smoke", "--data-file", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"ConfigError: data file {missing}: no such file; fix: give --data-file (or DATA_FILE) the path" in err


def test_output_piped_into_a_reader_that_leaves_early_ends_quietly(tmp_path):
    """`encoderflow config | head -1`: a BrokenPipeError traceback after the line the reader wanted."""
    env = {**os.environ, "ENCODERFLOW_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "encoderflow.cli", "config", "--preset", "smoke"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader leaves before the output is written (its imports take a second)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_make_airflow_signs_tokens_with_a_key_pyjwt_accepts_kept_across_starts(tmp_path):
    """Airflow's generated jwt_secret (16 bytes) made PyJWT warn 4-9 times a `make airflow` start."""
    path = tmp_path / "airflow" / "jwt_secret"
    path.parent.mkdir()
    key = cli.kept_secret(path)
    assert len(key) >= 64 and cli.kept_secret(path) == key  # the same key next start: signed-in users stay
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    path.write_text("short\n")  # one kept by an older version: replaced
    assert len(cli.kept_secret(path)) >= 64


def test_download_fetches_every_role_from_a_mirror_once_and_names_what_an_offline_copy_would_hash(
    tmp_path, encoderflow_home, capsys
):
    """`encoderflow download`: each role's dataset fetched (from a loopback mirror serving the archives),
    verified and extracted under the home; a second call reuses it; the same files offline hash the same."""
    import re

    from tests.fixtures_pipeline import serve, write_archives, write_tree

    tree = write_tree(tmp_path / "tree")
    sources_file = write_archives(tree, tmp_path / "www")

    def said() -> dict[str, tuple[str, str, Path, str]]:
        out = {}
        for line in capsys.readouterr().out.splitlines():
            if m := re.fullmatch(r"(corpus|labeled|vocab): (\w+) (\w+) (\S+) content_hash=([0-9a-f]{64})", line):
                out[m[1]] = (m[2], m[3], Path(m[4]), m[5])
        return out

    with serve(tmp_path / "www") as (url, requests):
        args = ["download", "--preset", "smoke", "--mirror", url + "/", "--sources-file", str(sources_file)]
        assert cli.main(args) == 0
        fetched = said()
        assert sorted(requests) == ["/SST-2.zip", "/bert_vocab_uncased.txt", "/wikitext-103-raw-v1.zip"]
        assert cli.main(args) == 0  # verified copies under the home: nothing asked for again
        assert said() == fetched and len(requests) == 3
    assert {role: (d, s) for role, (d, s, _, _) in fetched.items()} == {
        "corpus": ("wikitext", "download"),
        "labeled": ("sst2", "download"),
        "vocab": ("vocab", "download"),
    }
    data = encoderflow_home / "data"
    # What each archive held, extracted under the home's data folder as the tree had it.
    for role, member in (
        ("corpus", "wikitext-103-raw/wiki.valid.raw"),
        ("labeled", "SST-2/train.tsv"),
        ("vocab", "bert_vocab_uncased.txt"),
    ):
        root = fetched[role][2]
        assert root.is_relative_to(data), root
        assert (root / member).read_bytes() == (tree / member).read_bytes(), role

    assert cli.main(["download", "--preset", "smoke", "--data-dir", str(tree)]) == 0
    offline = said()
    for role in ("corpus", "labeled", "vocab"):
        assert offline[role][1:3] == ("offline", tree)
        assert offline[role][3] == fetched[role][3], role  # the same files: the same content hash
