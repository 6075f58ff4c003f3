"""The whole DAG through Airflow (``encoderflow run`` → ``dag.test()``) on fixtures served over HTTP.

The download code runs for real against a loopback server; nothing is mocked. Three runs: the
first trains and becomes champion; the second is deliberately untrained (a vanishing learning
rate) and must be registered but leave ``champion`` where it was; the third diverges (its loss
turns NaN) and must fail in ``pretrain`` with nothing downstream run and nothing registered.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import fixtures_pipeline as fixtures_data

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MODEL = "encoderflow-sst2"


def _run(home: Path, mirror: str, sources: Path, *sets: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENCODERFLOW_HOME": str(home)}
    cmd = [
        sys.executable,
        "-m",
        "encoderflow.cli",
        "run",
        "--preset",
        "smoke",
        "--mirror",
        mirror,
        "--sources-file",
        str(sources),
        "--set",
        "data.pretrain_split=train",
        "--set",
        "finetune.steps_per_epoch=40",
    ]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def _query(home: Path, sql: str, *args) -> list[tuple]:
    """Rows from the Airflow metadata DB that ``encoderflow run`` used under ``home``."""
    db = sqlite3.connect(home / "airflow" / "airflow.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _task_states(home: Path) -> dict[str, list[tuple[str, int, str]]]:
    out: dict[str, list] = {}
    for run_id, task_id, map_index, state in _query(
        home, "select run_id, task_id, map_index, state from task_instance"
    ):
        out.setdefault(run_id, []).append((task_id, map_index, state))
    return out


def _run_id(proc: subprocess.CompletedProcess) -> str:
    run_line = next(line for line in proc.stdout.splitlines() if line.startswith("encoderflow run "))
    return run_line.split()[2].rstrip(":")


def _summary(proc: subprocess.CompletedProcess, home: Path) -> dict:
    run_id = _run_id(proc)
    from encoderflow import layout

    return run_id, json.loads((layout.run_dir(run_id) / "summary.json").read_text())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixtures")
    tree = fixtures_data.write_tree(root / "tree")
    sources = fixtures_data.write_archives(tree, root / "www")
    with fixtures_data.serve(root / "www") as (url, requests):
        yield url, requests, sources


def test_two_runs_through_airflow(served, encoderflow_home, capsys):
    url, requests, sources = served
    home = encoderflow_home

    t0 = time.monotonic()
    first = _run(home, url, sources)
    first_s = time.monotonic() - t0
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    run1, summary1 = _summary(first, home)
    # The champion asset is evaluate_and_gate's inlet, so Airflow knows it before promote adds its
    # first event: no "AssetModel ... not found" or "inactive AssetModel" warning, nor any other.
    warned = [ln for ln in (first.stdout + first.stderr).splitlines() if "[warning" in ln.lower()]
    assert not warned, "\n".join(warned)
    events = "select count(*) from asset_event e join asset a on a.id = e.asset_id where a.name = ?"
    assert summary1["gate"]["blessed"] and _query(home, events, f"{MODEL}@champion") == [(1,)]

    # Every task instance of the run succeeded, mapped shards included.
    states = _task_states(home)[run1]
    assert states and all(state == "success" for _, _, state in states), states
    task_ids = {t for t, _, _ in states}
    assert {
        "download_corpus",
        "validate_labeled",
        "prepare_vocab",
        "plan_shards",
        "build_shard",
        "seal_shards",
        "train_baseline",
        "pretrain",
        "finetune",
        "evaluate_and_gate",
        "promote",
        "report",
    } <= task_ids
    mapped = sorted(m for t, m, _ in states if t == "build_shard")
    assert mapped == list(range(len(mapped))) and len(mapped) >= 2
    # The summary lists the tasks in the DAG's order (it was alphabetical: check_lineage first, finetune
    # after evaluate_and_gate), so where a run stopped reads top to bottom.
    listed = [ln.split()[0] for ln in first.stdout.split(": SUCCESS in ", 1)[1].splitlines()[2:] if ln.startswith("  ")]
    listed = list(dict.fromkeys(t.split("[")[0] for t in listed if t.split("[")[0] in task_ids))
    assert listed[:2] == ["check_params", "download_corpus"] and listed[-3:] == [
        "evaluate_and_gate",
        "promote",
        "report",
    ]
    assert listed.index("pretrain") < listed.index("finetune"), listed

    # The downloads really went over HTTP, once per file.
    assert sorted(requests) == ["/SST-2.zip", "/bert_vocab_uncased.txt", "/wikitext-103-raw-v1.zip"]

    # The manifest lists every shard that exists, with matching hashes.
    manifest_path = Path(summary1["artifacts"]["shards_manifest"])
    manifest = json.loads(manifest_path.read_text())
    on_disk = sorted(p.name for p in manifest_path.parent.glob("*.tfrecord"))
    assert sorted(s["file"] for s in manifest["shards"]) == on_disk
    assert len(on_disk) == len(mapped)
    from encoderflow import layout

    for shard in manifest["shards"]:
        assert layout.sha256_file(manifest_path.parent / shard["file"]) == shard["sha256"]
    assert manifest["seq_length"] == 32 and manifest["predictions_per_seq"] == 6

    # The first candidate learned the fixture and became champion, with the decision on the version.
    assert summary1["metrics"]["val_accuracy"] > 0.8, summary1
    assert summary1["gate"]["blessed"] is True
    from mlflow import MlflowClient

    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    v1 = client.get_model_version_by_alias(MODEL, "champion")
    assert v1.tags["gate.blessed"] == "true"
    # Artifacts live beside the embedded store, never in ./mlruns of the working directory.
    assert v1.source.startswith((home / "mlflow" / "artifacts").as_uri()), v1.source
    assert not (REPO / "mlruns").exists()
    assert v1.tags["airflow.run_id"] == run1
    # Who ran it, on the version and on the champion's move (every gate move used to say "airflow").
    import getpass

    who = f"{os.environ.get('ENCODERFLOW_USER') or getpass.getuser()} (encoderflow run)"
    assert v1.tags["airflow.triggered_by"] == who
    assert json.loads(client.get_registered_model(MODEL).tags["champion.move.000001"])["who"] == who
    assert json.loads((layout.run_dir(run1) / "registered.json").read_text())["version"] == str(v1.version)
    assert v1.tags["gate.check.floor"].startswith("pass")
    assert v1.tags["shards.manifest_sha256"] == layout.sha256_file(manifest_path)

    # The gate's bootstrap intervals: in gate.json, on the version and in the task log. No champion
    # yet, so no difference; the baseline's come from its own per-sentence dev predictions.
    gate1 = json.loads((layout.run_dir(run1) / "gate.json").read_text())
    iv1 = gate1["intervals"]
    assert (iv1["examples"], iv1["resamples"], iv1["seed"], iv1["confidence"]) == (64, 2000, 42, 0.95)
    assert iv1["champion"] is None and iv1["candidate_minus_champion"] is None
    for name, metric in (("candidate", "val_accuracy"), ("baseline", "baseline_val_accuracy")):
        interval = iv1[name]
        assert interval["low"] <= interval["estimate"] <= interval["high"] and interval["high"] - interval["low"] > 0
        # Scored per sentence: the step's accuracy, within one sentence (fine-tuning evaluates in length buckets).
        assert interval["estimate"] == pytest.approx(summary1["metrics"][metric], abs=1 / 64 + 1e-6), name
    assert v1.tags["gate.val_accuracy_ci"] == f"[{iv1['candidate']['low']:.4f}, {iv1['candidate']['high']:.4f}]"
    assert "gate.baseline_val_accuracy_ci" in v1.tags and "gate.candidate_minus_champion_ci" not in v1.tags
    gate_log = (layout.run_dir(run1) / "logs" / "task_id=evaluate_and_gate" / "attempt=1.log").read_text()
    assert (
        "gate intervals (95% paired bootstrap over 64 dev sentences, 2000 resamples, seed 42): candidate " in gate_log
    )
    # The last task's log says the outcome, for whoever reads it in the Airflow UI.
    report_log = (layout.run_dir(run1) / "logs" / "task_id=report" / "attempt=1.log").read_text()
    m1 = summary1["metrics"]
    assert (
        f"report: BLESSED; val_accuracy {m1['val_accuracy']:.4f} (baseline_val_accuracy "
        f"{m1['baseline_val_accuracy']:.4f}, champion_val_accuracy -, mlm_val_accuracy "
    ) in report_log and f"{MODEL} v1 registered, champion v1" in report_log
    # Each step names what it wrote with its hash (docs/operations.md, "Logs"); the bundle's is the registry's.
    summary_sha = layout.sha256_file(layout.run_dir(run1) / "summary.json")
    assert f"report output summary: {layout.run_dir(run1) / 'summary.json'} (sha256 {summary_sha})" in report_log
    finetune_log = (layout.run_dir(run1) / "logs" / "task_id=finetune" / "attempt=1.log").read_text()
    assert f"(sha256 {v1.tags['bundle.sha256']})" in finetune_log

    # A second, untrained candidate: registered, not blessed, champion unchanged; it must also show
    # a significant gain, and its paired interval says it is significantly worse. It pretrains with
    # the recipe preset's switches (task-adaptive shards, no dropout, schedules, decay), so they run
    # through Airflow too, and starts from the champion's encoder (a warm start).
    trains2 = (
        "finetune.learning_rate=1e-9",
        "finetune.steps_per_epoch=1",
        "data.task_adaptive=true",
        "data.sequence_mode=packed",
        "pretrain.init_from=champion",
        "pretrain.dropout_off=true",
        "pretrain.lr_schedule=warmup_cosine",
        "pretrain.weight_decay=0.01",
        "finetune.lr_schedule=warmup_cosine",
    )
    second = _run(home, url, sources, *trains2, "gate.require_significant_gain=true")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    run2, summary2 = _summary(second, home)
    assert run2 != run1
    manifest2 = json.loads(Path(summary2["artifacts"]["shards_manifest"]).read_text())
    tapt = [e for e in manifest2["shards"] if e.get("source") == "sst2"]
    assert tapt and all(e["split"] == "train" and e["records"] > 0 for e in tapt)
    assert any(entry[1].endswith("SST-2/train.tsv") for entry in manifest2["inputs"])
    assert summary2["gate"]["blessed"] is False
    assert any(r.startswith("champion:") for r in summary2["gate"]["reasons"]), summary2["gate"]
    assert any(r.startswith("significance: vs champion v") for r in summary2["gate"]["reasons"]), summary2["gate"]
    iv2 = json.loads((layout.run_dir(run2) / "gate.json").read_text())["intervals"]
    diff = iv2["candidate_minus_champion"]
    assert iv2["champion"]["estimate"] == pytest.approx(summary2["metrics"]["champion_val_accuracy"])
    assert diff["estimate"] == pytest.approx(iv2["candidate"]["estimate"] - iv2["champion"]["estimate"])
    assert diff["low"] <= diff["estimate"] <= diff["high"] < 0, diff
    # The champion was re-evaluated on this run's data, not copied from its stored number.
    assert summary2["metrics"]["champion_val_accuracy"] == pytest.approx(summary1["metrics"]["val_accuracy"])
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1.version
    v2 = client.get_model_version(MODEL, summary2["registry"]["version"])
    assert v2.tags["lineage.parent"] == str(v1.version) and "lineage.parent" not in v1.tags
    assert v2.tags["lineage.starts_from"] == str(v1.version) and "lineage.starts_from" not in v1.tags
    pretrain_log = (layout.run_dir(run2) / "logs" / "task_id=pretrain" / "attempt=1.log").read_text()
    assert f"warm start from pretrain.init_from=champion v{v1.version}" in pretrain_log
    assert v2.tags["gate.blessed"] == "false"
    assert "champion" in v2.tags["gate.reasons"]
    assert v2.tags["gate.candidate_minus_champion_ci"] == f"[{diff['low']:+.4f}, {diff['high']:+.4f}]"
    assert v2.tags["gate.check.significance"].startswith("FAIL: vs champion v")
    # The runs page shows them from gate.json: error bars on the gate chart, the paired margin in the gate cell.
    sys.path.insert(0, str(REPO / "plugins"))
    import encoderflow_runs_page as page

    from encoderflow.runs import collect_runs

    runs = {r["run_id"]: r for r in collect_runs(home)}
    html = page.render(list(runs.values()), {"champion": None, "history": []}, MODEL, None)
    assert runs[run2]["gate_chart"]["intervals"]["candidate_minus_champion"] == diff
    assert f"candidate - champion {diff['estimate']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]" in html
    assert f"data-low='{diff['low']:+.4f}' data-high='{diff['high']:+.4f}'" in html  # the chart's difference line
    assert html.count("class='ef-ci'") == 5  # run 1: candidate and baseline; run 2: and the champion
    # Verified data was reused: the second run made no new request.
    assert len(requests) == 3
    assert "NOT BLESSED" in second.stdout

    # A diverging candidate: float16 activations overflow at learning rate 1.0 and the loss turns
    # NaN. pretrain fails once (no retry), nothing downstream runs, nothing is registered.
    versions = {v.version for v in client.search_model_versions(f"name='{MODEL}'")}
    third = _run(home, url, sources, "pretrain.precision=mixed_float16", "pretrain.learning_rate=1.0")
    assert third.returncode == 1, third.stdout[-3000:] + third.stderr[-5000:]
    run3 = _run_id(third)
    states3 = {(t, m): state for t, m, state in _task_states(home)[run3]}
    assert states3[("pretrain", -1)] == "failed", states3
    for task in ("finetune", "evaluate_and_gate", "promote", "report"):
        assert states3[(task, -1)] == "upstream_failed", (task, states3)
    [(tries,)] = _query(home, "select try_number from task_instance where run_id=? and task_id='pretrain'", run3)
    assert tries == 1  # a diverged loss is not worth a retry
    output = third.stdout + third.stderr
    assert "NonFiniteLoss: pretrain: loss became nan" in output, output[-5000:]
    # The summary ends with the first failure's cause, its fix and its task's log (which holds the cause).
    tail = third.stdout.rstrip().splitlines()[-5:]
    assert tail[0] == "  first failure: pretrain, try 1 (no retry)", tail
    assert tail[1].startswith("  cause: NonFiniteLoss: pretrain: loss became nan"), tail
    assert tail[2] == "  fix:   lower pretrain.learning_rate (now 1) or check the input data", tail
    assert tail[3].startswith("  log:   ") and tail[4] == "=" * 72, tail
    task_log = Path(tail[3].removeprefix("  log:   "))
    assert task_log.is_relative_to(layout.run_dir(run3)), task_log
    assert "NonFiniteLoss: pretrain: loss became nan" in task_log.read_text()
    assert json.loads((layout.run_dir(run3) / "failure.json").read_text())["task_id"] == "pretrain"
    assert not (layout.run_dir(run3) / "pretrain" / "encoder.keras").exists()
    assert {v.version for v in client.search_model_versions(f"name='{MODEL}'")} == versions
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1.version

    # The first run's data, config and code again: nothing would change, so check_lineage
    # short-circuits: every later task is skipped (not failed), nothing is registered, and the
    # summary, the runs page and the exit code say so. Its wall time is printed for the README.
    t0 = time.monotonic()
    again = _run(home, url, sources)
    again_s = time.monotonic() - t0
    print(f"\nunchanged re-run: {again_s:.1f} s (first run {first_s:.1f} s, {again_s / first_s:.0%})")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    run4, summary4 = _summary(again, home)
    states4 = {(t, m): state for t, m, state in _task_states(home)[run4]}
    assert states4[("check_lineage", -1)] == "success", states4
    trained = [k for k in states4 if k[0].startswith(("check_params", "download_", "check_lineage")) is False]
    assert trained and all(states4[k] == "skipped" for k in trained), states4
    assert summary4["unchanged"]["message"] == f"nothing changed since champion v{v1.version}"
    assert "nothing changed since champion v" in again.stdout and "--force" in again.stdout
    assert {v.version for v in client.search_model_versions(f"name='{MODEL}'")} == versions
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1.version
    html = page.render(collect_runs(home), {"champion": None, "history": []}, MODEL, None)
    assert f"nothing changed since champion v{v1.version}" in html

    # Run 2's training with only a gate setting changed: its encoder and bundle are copied from run 2's
    # folder (checked first), nothing is pretrained or fine-tuned, and the same candidate is gated again.
    regate = _run(home, url, sources, *trains2)
    assert regate.returncode == 0, regate.stdout[-3000:] + regate.stderr[-5000:]
    run5, summary5 = _summary(regate, home)
    folder2 = layout.safe_run_id(run2)
    assert summary5["runtime"]["pretrain"]["reused_from"] == folder2 == summary5["runtime"]["finetune"]["reused_from"]
    assert f"in run {folder2}, reused" in regate.stdout
    assert summary5["metrics"]["val_accuracy"] == summary2["metrics"]["val_accuracy"]
    assert summary5["gate"]["blessed"] is False
    assert not any(r.startswith("significance") for r in summary5["gate"]["reasons"]), summary5["gate"]
    logs5 = {
        t: (layout.run_dir(run5) / "logs" / f"task_id={t}" / "attempt=1.log").read_text()
        for t in ("pretrain", "finetune")
    }
    assert f"pretrain: reusing the encoder run {folder2} trained from" in logs5["pretrain"]
    assert f"finetune: reusing the bundle run {folder2} trained from" in logs5["finetune"]
    assert "steps/epoch" not in logs5["pretrain"] and "finetune: device" not in logs5["finetune"]
    # Run 2's model again: no second version. Run 5's MLflow run records its reuse and decision.
    assert summary5["registry"]["version"] == summary2["registry"]["version"]
    assert summary5["registry"]["registered_by"] == run2
    assert f"v{summary2['registry']['version']} (this model, registered by {run2})" in regate.stdout
    assert {v.version for v in client.search_model_versions(f"name='{MODEL}'")} == versions
    tags5 = client.get_run(summary5["registry"]["run_id"]).data.tags
    assert tags5["pretrain.reused_from"] == folder2 == tags5["finetune.reused_from"]
    assert tags5["registry.version"] == summary2["registry"]["version"]

    # `encoderflow prune` asks this Airflow and MLflow: it keeps the champion's run and the newest, and
    # the newest run, whose results are links to run 2's files, still holds a sound bundle.
    from encoderflow import bundle, cli

    assert cli.main(["prune", "--keep", "1", "--older-than", "0"]) == 0
    out = capsys.readouterr().out
    assert "runs; none in flight" in out and f"{MODEL} v{v1.version} (champion)" in out, out
    assert f"runs/{layout.safe_run_id(run1)}: registered {MODEL} v{v1.version} (champion)" in out, out
    # Run 3 stays if its diverged pretraining left a sound backup (taken before the loss turned NaN): the
    # next run of its key would resume it.
    from encoderflow import prune

    resumable = prune._resumable(layout.run_dir(run3), layout.code_hash()) is not None
    left = (run1, run5, run3) if resumable else (run1, run5)
    assert sorted(p.name for p in (home / "runs").iterdir()) == sorted(map(layout.safe_run_id, left))
    for run in (run2, run4) if resumable else (run2, run3, run4):
        assert f"removed       run     runs/{layout.safe_run_id(run)}: Airflow: " in out, out
    bundle.verify(summary5["artifacts"]["bundle"])
    # The runs page still shows a pruned run's decision and metrics, from the record prune kept.
    shown = {r["run_id"]: r for r in collect_runs(home)}[run2]
    assert shown["pruned_at"] and shown["metrics"] == summary2["metrics"], shown
    assert Path(summary5["artifacts"]["shards_manifest"]).exists()
    assert {v.version for v in client.search_model_versions(f"name='{MODEL}'")} == versions

    # `encoderflow runs` tells it in a terminal: this Airflow's states, the champion, a failure's fix, a pruned run.
    assert cli.main(["runs"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("manual__", "scheduled__"))}
    assert set(rows) == {run1, run2, run3, run4, run5}, out
    assert rows[run1].split()[1] == "success" and rows[run1].endswith(f"v{v1.version} champion"), out
    assert " BLESSED " in rows[run1] and "NOT BLESSED" in rows[run2] and " SKIPPED " in rows[run4], out
    assert rows[run3].split()[1] == "failed" and " FAILED " in rows[run3], out
    assert cli.main(["runs", run3]) == 0
    detail = capsys.readouterr().out
    assert "failed     at pretrain, try 1: NonFiniteLoss: pretrain: loss became nan" in detail, detail
    assert "           fix: lower pretrain.learning_rate (now 1) or check the input data\n" in detail, detail
    assert cli.main(["runs", run2]) == 0
    detail = capsys.readouterr().out
    assert "folder     pruned " in detail and f"val_accuracy {summary2['metrics']['val_accuracy']:.4f}" in detail


def test_your_own_corpus_and_labels_through_airflow(tmp_path, encoderflow_home, caplog):
    """A corpus folder (local) and a 3-class JSONL under other column names (over HTTP, from its
    manifest), declared in a YAML data file with a vocabulary trained on the corpus: end to end.
    Then data lands: the watcher sees a touched file, but only new content makes the lineage differ."""
    from tests.data import fixtures_own as own

    home = encoderflow_home
    corpus = own.write_corpus(tmp_path / "corpus", n_files=24)
    www = tmp_path / "www"
    tickets = own.write_labeled(www / "tickets")
    (tickets / "manifest.json").write_text(json.dumps({"files": ["train.jsonl", "dev.jsonl"]}))
    with fixtures_data.serve(www) as (url, requests):
        data_file = own.write_data_file(
            tmp_path / "repo" / "data.yaml",
            corpus,
            f"{url}/tickets",
            vocab="trained",
            vocab_size=100,  # what 24 small files hold (78 tokens): more would be warned about
            documents="blank_line",
        )
        sets = ["data.sequence_mode=packed", "gate.registered_model=tickets", "finetune.steps_per_epoch=60"]
        env = {**os.environ, "ENCODERFLOW_HOME": str(home), "ENCODERFLOW_DATA_FILE": str(data_file)}
        cmd = [sys.executable, "-m", "encoderflow.cli", "run", "--preset", "smoke"]
        cmd += [a for s in sets for a in ("--set", s)]

        # A dev label train never had: the run stops at validate_labeled, naming the file; nothing trains.
        good_dev = (tickets / "dev.jsonl").read_bytes()
        (tickets / "dev.jsonl").write_bytes(good_dev + b'{"body": "where is my parcel", "category": "shipping"}\n')
        bad = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-5000:]
        bad_states = {t: state for t, _, state in _task_states(home)[_run_id(bad)]}
        assert bad_states["validate_labeled"] == "failed", bad_states
        assert {bad_states[t] for t in ("plan_shards", "pretrain", "finetune", "promote")} == {"upstream_failed"}
        assert (
            f"labeled: {url}/tickets/dev.jsonl: expect_column_values_to_be_in_set(column='category', "
            "value_set=['billing', 'bug', 'praise']) failed, observed 1 unexpected of 49, e.g. ['shipping']"
        ) in bad.stdout + bad.stderr
        (tickets / "dev.jsonl").write_bytes(good_dev)
        requests.clear()

        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert sorted(set(requests)) == ["/tickets/dev.jsonl", "/tickets/manifest.json", "/tickets/train.jsonl"]
        # tickets@champion is declared for this run too: its first event raises no Airflow warning.
        warned = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "[warning" in ln.lower()]
        assert not warned, "\n".join(warned)
        events = "select count(*) from asset_event e join asset a on a.id = e.asset_id where a.name = ?"
        assert _query(home, events, "tickets@champion") == [(1,)]
        run_id, summary = _summary(proc, home)
        states = _task_states(home)[run_id]
        assert states and all(state == "success" for _, _, state in states), states
        assert {"download_corpus", "validate_labeled", "prepare_vocab", "pretrain", "promote"} <= {
            t for t, _, _ in states
        }

        # Three classes learned on a trained vocabulary, well above chance (a third).
        from encoderflow import layout

        assert summary["metrics"]["val_accuracy"] > 0.6, summary
        bundle = json.loads((Path(summary["artifacts"]["bundle"]) / "bundle.json").read_text())
        assert bundle["labels"] == ["billing", "bug", "praise"]
        manifest = json.loads(Path(summary["artifacts"]["shards_manifest"]).read_text())
        [trained] = list((home / "data" / "vocab-trained").glob("*/vocab.txt"))
        assert manifest["vocab_sha256"] == bundle["files"]["vocab.txt"] == layout.sha256_file(trained)
        assert manifest["vocab_size"] == bundle["vocab_size"] <= 100
        validate_log = (layout.run_dir(run_id) / "logs" / "task_id=validate_labeled" / "attempt=1.log").read_text()
        assert "3 classes ['billing', 'bug', 'praise'] (from train)" in validate_log
        from mlflow import MlflowClient

        from encoderflow import steps

        uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
        v1 = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("tickets", "champion")
        assert v1.tags["data.corpus.content_hash"] and "data.wikitext.content_hash" not in v1.tags
        params = {"preset": "smoke", "data_file": str(data_file), "overrides": sets}
        assert steps.check_source("corpus", params)["changed"] is True  # the watcher's first sight
        doc = corpus / "doc-001.txt"
        os.utime(doc, ns=(doc.stat().st_atime_ns, doc.stat().st_mtime_ns + 10**9))
        assert steps.check_source("corpus", params)["changed"] is True  # touched: an event, so a run...
        caplog.set_level("INFO")
        same = {role: steps.download(role, params) for role in ("corpus", "labeled", "vocab")}
        assert steps.check_lineage(same, params, "touched") is False  # ...that finds the same bytes: skipped
        doc.write_text(doc.read_text() + "\nnew text landed in the corpus today .\n")
        assert steps.check_source("corpus", params)["changed"] is True
        landed = {**same, "corpus": steps.download("corpus", params)}
        assert steps.check_lineage(landed, params, "landed") is True  # new content: the next run trains
        assert f"changed since champion v{v1.version}: data.corpus.content_hash; training" in caplog.text
