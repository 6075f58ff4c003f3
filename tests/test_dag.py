"""The DAG parses cleanly and without importing the heavy ML stack (thin-DAG rule)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from encoderflow import config

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter so nothing a previous test imported can hide a parse-time import.
PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
heavy = ("tensorflow", "keras", "keras_hub", "jax", "great_expectations", "mlflow", "pandas")
before = {m for m in heavy if m in sys.modules}
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("encoder_pretraining")
watcher = bag.dags.get("encoderflow_sources")
print(json.dumps({
    "dag_ids": sorted(bag.dags),
    "watcher_tasks": sorted(watcher.task_ids) if watcher else [],
    "watcher_schedule": str(watcher.schedule) if watcher else None,
    "schedule": type(dag.timetable).__name__ if dag else None,
    "schedule_assets": sorted(a.name for a in getattr(dag.timetable.asset_condition, "objects", ()))
        if dag and getattr(dag.timetable, "asset_condition", None) is not None else [],
    "data_file_default": dag.params.get_param("data_file").value if dag else None,
    "errors": {k: str(v)[-500:] for k, v in bag.import_errors.items()},
    "heavy": sorted(m for m in heavy if m in sys.modules and m not in before),
    "task_ids": sorted(dag.task_ids) if dag else [],
    "params": sorted(dag.params.keys()) if dag else [],
    "schemas": {k: dag.params.get_param(k).schema for k in dag.params} if dag else {},
    "max_active_runs": dag.max_active_runs if dag else None,
    "catchup": dag.catchup if dag else None,
    "download_retries": dag.get_task("download_labeled").retries if dag else None,
    "check_params_retries": dag.get_task("check_params").retries if dag else None,
    "preset_default": dag.params.get_param("preset").value if dag else None,
    "queues": {t.task_id: [t.queue, t.pool] for t in dag.tasks} if dag else {},
    "baseline_after": sorted(dag.get_task("train_baseline").upstream_task_ids) if dag else [],
    "return_value_logged": sorted(t.task_id for t in dag.tasks if getattr(t, "show_return_value_in_logs", False))
        if dag else None,
}))
"""


def _probe(tmp_path, **extra_env: str) -> dict:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ENCODERFLOW_")},
        **extra_env,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}",
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "dags")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dagbag_parses_without_heavy_imports(tmp_path):
    result = _probe(tmp_path)
    assert result["errors"] == {}
    # What keeps parsing fast on the scheduler: no ML library is imported at parse time.
    assert result["heavy"] == [], f"imported at parse time: {result['heavy']}"
    # Steps log their outputs; Airflow's dump of each returned dict would repeat them on one long line.
    assert result["return_value_logged"] == []
    assert result["max_active_runs"] == 1
    assert result["catchup"] is False
    assert result["download_retries"] >= 2
    # A run whose corpus or vocabulary fails validation fails: its baseline trained anyway, for nothing.
    assert result["baseline_after"] == ["validate_corpus", "validate_labeled", "validate_vocab"]
    # Both training stages run on the gpu queue, one at a time through the gpu pool; nothing else does.
    on_gpu = sorted(t for t, (queue, pool) in result["queues"].items() if queue == "gpu" and pool == "gpu")
    assert on_gpu == ["finetune", "pretrain"], result["queues"]
    assert not any("gpu" in (queue, pool) for t, (queue, pool) in result["queues"].items() if t not in on_gpu)
    assert {
        "check_params",
        "download_corpus",
        "download_labeled",
        "download_vocab",
        "check_lineage",
        "validate_corpus",
        "validate_labeled",
        "validate_vocab",
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
    } == set(result["task_ids"])
    assert {
        "preset",
        "data_dir",
        "mirror",
        "pretrain_epochs",
        "finetune_learning_rate",
        "gate_min_accuracy",
        "gate_max_regression",
        "gate_require_significant_gain",
        "force",
        "corpus",
        "labeled",
        "data_file",
        "inputs_text_column",
        "inputs_label_column",
        "inputs_vocab",
    } <= set(result["params"])
    # What check_params accepts in a trigger's conf is what the trigger form holds.
    assert sorted(result["params"]) == sorted(config.param_names())
    # Manual only by default, for the training DAG and its source watcher alike.
    assert result["dag_ids"] == ["encoder_pretraining", "encoderflow_sources"]
    assert result["schedule"] == "NullTimetable" and result["watcher_tasks"] == ["check_corpus", "check_labeled"]
    assert result["watcher_schedule"] == "None" and result["data_file_default"] is None
    assert result["schemas"]["gate_require_significant_gain"]["type"] == ["null", "boolean"]
    assert result["schemas"]["force"]["type"] == "boolean"


def test_assets_schedule_runs_on_source_changes(tmp_path):
    """ENCODERFLOW_SCHEDULE=assets: the DAG runs on the source watcher's events, which run hourly; a
    scheduled run has no form, so its data declaration is ENCODERFLOW_DATA_FILE's."""
    assets = ["encoderflow_source_corpus", "encoderflow_source_labeled"]
    data_file = str(tmp_path / "data.yaml")
    result = _probe(tmp_path, ENCODERFLOW_SCHEDULE="assets", ENCODERFLOW_DATA_FILE=data_file)
    assert result["errors"] == {}
    assert result["schedule"] == "AssetTriggeredTimetable" and result["schedule_assets"] == assets
    assert result["watcher_schedule"] == "@hourly" and result["data_file_default"] == data_file
    both = _probe(tmp_path, ENCODERFLOW_SCHEDULE="assets|0 3 * * *", ENCODERFLOW_SOURCE_CHECK_SCHEDULE="*/10 * * * *")
    assert both["schedule"] == "AssetOrTimeSchedule" and both["schedule_assets"] == assets
    assert both["watcher_schedule"] == "*/10 * * * *"


def test_a_schedule_airflow_cannot_run_fails_the_import_naming_the_variable(tmp_path):
    """'every day' failed with croniter's "Exactly 5, 6 or 7 columns" and took manual triggers away;
    behind assets| it parsed, never fired, and logged a traceback every 30 s."""
    for value in ("every day", "assets,@daily", "assets|every day", "assets|", "@nightly", "assets|@once"):
        errors = _probe(tmp_path, ENCODERFLOW_SCHEDULE=value)["errors"]
        # Both DAGs read it (the source watcher runs hourly for assets): both say it.
        assert sorted(Path(f).name for f in errors) == ["encoder_pretraining.py", "encoder_sources.py"], errors
        for error in errors.values():
            assert f"ConfigError: ENCODERFLOW_SCHEDULE={value!r}" in error and "fix: give a cron" in error, error
    result = _probe(tmp_path, ENCODERFLOW_SCHEDULE="assets", ENCODERFLOW_SOURCE_CHECK_SCHEDULE="hourly")
    (error,) = result["errors"].values()
    assert "ENCODERFLOW_SOURCE_CHECK_SCHEDULE='hourly' is not a schedule" in error
    assert _probe(tmp_path, ENCODERFLOW_SCHEDULE="@weekly")["errors"] == {}


def test_scheduled_runs_train_with_the_deployments_preset_and_ride_out_a_late_api_server(tmp_path):
    """A scheduled run has no form: its preset is the form's default, ENCODERFLOW_PRESET (guide unset).
    check_params retries like a network task: a scheduled run's first try died when the api-server was
    not up yet (a bad trigger still fails once: expected failures are not retried)."""
    result = _probe(tmp_path)
    assert result["preset_default"] == "guide" and result["check_params_retries"] >= 2
    assert _probe(tmp_path, ENCODERFLOW_PRESET="smoke")["preset_default"] == "smoke"
    (error,) = _probe(tmp_path, ENCODERFLOW_PRESET="tiny")["errors"].values()
    assert "ENCODERFLOW_PRESET='tiny' is no preset; fix: set it to one of guide, recipe, smoke" in error


def test_every_param_maps_to_a_config_key(tmp_path):
    """A DAG param the config does not know would be silently ignored: forbid it.

    Walks the params the parsed DAG really has, not the map it is built from.
    """

    form_only = {"preset", "overrides"} | {
        f.name for cls in (config.Sources, config.RunOptions) for f in dataclasses.fields(cls)
    }
    keyed = set(_probe(tmp_path)["params"]) - form_only
    assert keyed, "the DAG has no config params at all"
    for name in keyed:
        assert config.param_keys().get(name) in config.keys(), name


def test_form_fields_carry_the_declared_bounds(tmp_path):
    """The trigger form's bounds are the config's: one declaration, no second copy to drift."""

    schemas = _probe(tmp_path)["schemas"]
    assert schemas["seq_length"]["minimum"] == 8 and schemas["seq_length"]["maximum"] == 512
    for k in config.knobs():
        if k.form is None:
            continue
        schema = schemas[config.param_name(k)]
        bound = "exclusiveMinimum" if k.exclusive_minimum else "minimum"
        assert schema.get(bound) == k.minimum and schema.get("maximum") == k.maximum, k.key
        assert schema["title"] == k.title and schema.get("section") == (k.form or None), k.key


def test_retry_delay_comes_from_the_environment_and_refuses_nonsense(monkeypatch):
    from datetime import timedelta

    import pytest

    from encoderflow import airflow_adapter as af

    monkeypatch.delenv("ENCODERFLOW_RETRY_DELAY_SECONDS", raising=False)
    assert af.retry_delay() == timedelta(seconds=30)
    monkeypatch.setenv("ENCODERFLOW_RETRY_DELAY_SECONDS", "5")
    assert af.retry_delay() == timedelta(seconds=5)
    for bad in ("soon", "-1", "7200"):
        monkeypatch.setenv("ENCODERFLOW_RETRY_DELAY_SECONDS", bad)
        with pytest.raises(ValueError, match="ENCODERFLOW_RETRY_DELAY_SECONDS"):
            af.retry_delay()


def test_a_promotion_names_who_started_the_run(monkeypatch):
    """Every gate promotion was recorded as made by "airflow", a terminal run and a person's trigger alike."""
    from types import SimpleNamespace

    from airflow.utils.types import DagRunType

    from encoderflow import airflow_adapter as af

    monkeypatch.delenv("ENCODERFLOW_CLI_RUN", raising=False)
    assert af.triggered_by(SimpleNamespace(triggering_user_name="admin", run_type=DagRunType.MANUAL)) == "admin"
    assert af.triggered_by(SimpleNamespace(triggering_user_name=None, run_type=DagRunType.SCHEDULED)) == (
        "the schedule"
    )
    assert af.triggered_by(SimpleNamespace(triggering_user_name=None, run_type=DagRunType.ASSET_TRIGGERED)) == (
        "an asset update"
    )
    assert af.triggered_by(None) == "airflow"
    # dag.test calls every run's user "dag_test": the terminal's user is who ran it.
    monkeypatch.setenv("ENCODERFLOW_CLI_RUN", "1")
    monkeypatch.setenv("ENCODERFLOW_USER", "carol")
    assert af.triggered_by(SimpleNamespace(triggering_user_name="dag_test")) == "carol (encoderflow run)"


def test_more_shards_than_airflow_maps_fail_naming_the_setting_and_the_fix(monkeypatch):
    """Airflow refuses a mapped list over [core] max_map_length only after the push, naming neither."""
    from encoderflow import airflow_adapter as af
    from encoderflow import errors
    from encoderflow.config import ConfigError

    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "4")
    assert af.mappable([1, 2, 3, 4], "shards", fix="lower data.num_shards") == [1, 2, 3, 4]
    with pytest.raises(ConfigError) as err:
        af.mappable([1, 2, 3, 4, 5], "shards", fix="lower data.num_shards")
    cause = errors.cause_of(err.value)
    assert cause.message == "5 shards to map, more than Airflow maps in one run ([core] max_map_length = 4)"
    assert cause.fix == "lower data.num_shards, or raise AIRFLOW__CORE__MAX_MAP_LENGTH on every Airflow component"


def test_the_champion_asset_of_the_model_a_run_or_deployment_names_is_declared(monkeypatch, tmp_path):
    """An asset first met through the alias is created by Airflow with two warnings in a successful
    run's log: evaluate_and_gate declares the default model's and the named model's."""
    from encoderflow import airflow_adapter as af

    monkeypatch.delenv("ENCODERFLOW_REGISTERED_MODEL", raising=False)
    monkeypatch.delenv("ENCODERFLOW_DATA_FILE", raising=False)
    assert [a.name for a in af.champion_inlets()] == ["encoderflow-sst2@champion"]
    monkeypatch.setenv("ENCODERFLOW_REGISTERED_MODEL", "tickets")
    data_file = tmp_path / "data.yaml"
    data_file.write_text("gate:\n  registered_model: reviews\n")
    monkeypatch.setenv("ENCODERFLOW_DATA_FILE", str(data_file))
    assert [a.name for a in af.champion_inlets()] == [
        "encoderflow-sst2@champion",
        "tickets@champion",
        "reviews@champion",
    ]
    monkeypatch.setenv("ENCODERFLOW_DATA_FILE", str(tmp_path / "missing.yaml"))  # the run names it, not the parse
    assert [a.name for a in af.champion_inlets()] == ["encoderflow-sst2@champion", "tickets@champion"]


def test_a_fix_naming_cli_flags_names_the_trigger_forms_fields_outside_encoderflow_run(monkeypatch):
    from encoderflow import airflow_adapter as af

    told = "DataError: dev.tsv missing; fix: pass a reachable --mirror or an offline --data-dir, or --set data.x=1"
    monkeypatch.delenv("ENCODERFLOW_CLI_RUN", raising=False)
    assert af.in_form_words(told) == (
        f"{told} (trigger form: --data-dir is 'Offline data folder'; --mirror is 'Mirror URL'; "
        "--set is 'Other overrides (section.key=value)')"
    )
    assert af.in_form_words("ConfigError: x; fix: lower it") == "ConfigError: x; fix: lower it"
    # A key with a field of its own is named by that field, not by the free overrides.
    split = "DataError: missing wiki.train.raw; fix: use a split it holds: --set data.pretrain_split=test (make run)"
    assert (
        af.in_form_words(split)
        == f"{split} (trigger form: --set data.pretrain_split is 'WikiText split to pretrain on')"
    )
    both = "ConfigError: x; fix: --set data.pretrain_split=test or --set model.num_layers=2"
    assert af.in_form_words(both) == (
        f"{both} (trigger form: --set data.pretrain_split is 'WikiText split to pretrain on'; "
        "--set is 'Other overrides (section.key=value)')"
    )
    monkeypatch.setenv("ENCODERFLOW_CLI_RUN", "1")
    assert af.in_form_words(told) == told


class _Events(list):
    """Airflow's inlet-events accessor as the promote task reads it (newest first, limited)."""

    def ascending(self, ascending=True):
        return _Events(sorted(self, key=lambda e: e.timestamp, reverse=not ascending))

    def limit(self, n):
        return _Events(self[:n])


class _Outlet:
    def __init__(self):
        self.added = []

    def add(self, asset, extra=None):
        self.added.append((asset.uri, extra))


def test_a_cleared_promote_announces_a_champion_move_once(monkeypatch):
    """A DAG scheduled on `<model>@champion` runs once per move: a cleared promote whose earlier try of
    this run moved and announced the champion adds no second event; one whose earlier try died before
    its event (the move made, nothing announced) announces it."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from encoderflow import airflow_adapter as af

    uri = af.champion_asset("encoderflow-sst2").uri
    promoted = {"registered_model": "encoderflow-sst2", "version": "1", "run_id": "abc"}
    moved = {**promoted, "promoted": {"to": "1", "already": False}}
    again = {**promoted, "promoted": {"to": "1", "already": True}}

    def event(run_id, version, asset_uri=uri, minute=0):
        return SimpleNamespace(
            source_run_id=run_id,
            asset=SimpleNamespace(uri=asset_uri),
            extra={"version": version},
            timestamp=datetime(2026, 12, 7, 6, minute, tzinfo=UTC),
        )

    outlets = {af.CHAMPION_MOVES: _Outlet()}
    af.record_champion(outlets, moved, 0.8, {af.CHAMPION_MOVES: _Events()}, "run-a")
    assert outlets[af.CHAMPION_MOVES].added == [(uri, {"version": "1", "run_id": "abc", "val_accuracy": 0.8})]

    announced = _Events([event("run-a", "1", minute=13), event("run-b", "2", minute=20)])
    outlets = {af.CHAMPION_MOVES: _Outlet()}
    af.record_champion(outlets, again, 0.8, {af.CHAMPION_MOVES: announced}, "run-a")
    assert outlets[af.CHAMPION_MOVES].added == []
    # Not announced by this run (another run's event, another model's, another version): announced now.
    for events in (
        [event("run-b", "1")],
        [event("run-a", "1", asset_uri=af.champion_asset("tickets").uri)],
        [event("run-a", "3")],
        [],
    ):
        outlets = {af.CHAMPION_MOVES: _Outlet()}
        af.record_champion(outlets, again, 0.8, {af.CHAMPION_MOVES: _Events(events)}, "run-a")
        assert len(outlets[af.CHAMPION_MOVES].added) == 1, events
    outlets = {af.CHAMPION_MOVES: _Outlet()}
    af.record_champion(outlets, {**promoted, "promoted": None}, 0.8, {af.CHAMPION_MOVES: announced}, "run-a")
    assert outlets[af.CHAMPION_MOVES].added == []  # not blessed: no move, no event


def test_the_preset_fields_description_says_each_presets_own_shape():
    """It said "guide: 3 layers, dim 256, 8 pretraining epochs" by hand: a preset changed, the form did not."""
    from encoderflow import airflow_adapter as af

    said = af.params()["preset"].description
    for name in ("guide", "smoke"):
        c = config.from_overrides(name, {})
        assert (
            f"{name}: {c.model.num_layers} layer" in said and f"dim {c.model.model_dim}, {c.pretrain.epochs} " in said
        )
