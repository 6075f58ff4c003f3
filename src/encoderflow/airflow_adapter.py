"""Airflow glue, all of it: the DAG files import this module, and the CLI for its Airflow commands.

For the DAG: the trigger form built from the config declarations, failure handling (the cause and
fix once, no retry for bad data, bad config or diverged training), retry and pool presets, the
assets other DAGs schedule on. For ``encoderflow run`` and ``make airflow``: the ``gpu`` pool, the
DAG run in-process with ``dag.test`` and its per-task log files (the CLI sets the embedded Airflow's
environment before it imports this module). ``encoderflow.steps`` stays free of Airflow.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from airflow.listeners import hookimpl
from airflow.sdk import Asset, AssetAlias, Param

from encoderflow import DAG_ID as DAG_ID  # re-exported: the DAG files read their names here
from encoderflow import config, errors, layout
from encoderflow.config import ROLES as ROLES
from encoderflow.errors import EncoderflowError

REGISTERED_MODEL = config.GateConfig().registered_model
log = logging.getLogger("encoderflow.dag")


def retry_delay() -> timedelta:
    """The first pause before a retry: ``ENCODERFLOW_RETRY_DELAY_SECONDS`` (default 30), read at parse time."""
    raw = os.environ.get("ENCODERFLOW_RETRY_DELAY_SECONDS", "30")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise ValueError(f"ENCODERFLOW_RETRY_DELAY_SECONDS={raw!r}: give seconds between 0 and 3600 (default 30)")
    return timedelta(seconds=seconds)


# Network-bound tasks: transient outages are worth waiting out, with growing pauses.
NETWORK = {
    "retries": 3,
    "retry_delay": retry_delay(),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}
# One training job at a time on the accelerator; the `gpu` pool holds one slot.
GPU = {"queue": "gpu", "pool": "gpu", "pool_slots": 1}

# Other DAGs schedule on these, e.g. ``@dag(schedule=CHAMPION)`` to run on every new champion.
SHARDS = Asset(name="encoderflow_shards", uri="x-encoderflow://shards/sealed", group="encoderflow")
CHAMPION_MOVES = AssetAlias(name="encoderflow_champion_moves", group="encoderflow")


# The roles a run reads (download_<role>, validate_<role>); the first two can be your own folders.
WATCHED = ("corpus", "labeled")
# One asset per watched role; `encoderflow_sources` adds an event, through the alias, only on a change.
SOURCE_ASSETS = {
    role: Asset(name=f"encoderflow_source_{role}", uri=f"x-encoderflow://sources/{role}", group="encoderflow")
    for role in WATCHED
}
SOURCE_CHANGES = AssetAlias(name="encoderflow_source_changes", group="encoderflow")
SOURCES_DAG_ID = "encoderflow_sources"


def champion_asset(model: str = REGISTERED_MODEL) -> Asset:
    """The ``champion`` alias of a registered model, as an Airflow asset (one event per move)."""
    return Asset(name=f"{model}@champion", uri=f"x-encoderflow://registry/{model}/champion", group="encoderflow")


CHAMPION = champion_asset()


def champion_inlets() -> list[Asset]:
    """``evaluate_and_gate``'s inlets: the champion assets of the default model and of the model this
    process runs for, so Airflow knows each before ``promote``'s first event through the alias (an
    undeclared asset is created then, with two Airflow warnings in a successful run's log).

    That model is ``ENCODERFLOW_REGISTERED_MODEL`` (``encoderflow run`` sets it from the run's config)
    or the ``gate.registered_model`` of ``ENCODERFLOW_DATA_FILE`` (a deployment's scheduled runs).
    """
    names = [REGISTERED_MODEL, os.environ.get("ENCODERFLOW_REGISTERED_MODEL", "").strip()]
    if data_file := os.environ.get("ENCODERFLOW_DATA_FILE", "").strip():
        try:
            names.append(str(config.read_data_file(data_file)[1].get("gate.registered_model") or ""))
        except config.ConfigError:
            pass  # check_params names the file and its fix when a run reads it; a parse must not fail on it
    return [champion_asset(name) for name in dict.fromkeys(names) if name]


def schedule_from_env() -> Any:
    """``ENCODERFLOW_SCHEDULE``: a cron expression or preset (``@daily``); ``assets``: on every change
    the source checker records to your corpus or labeled data; ``assets|<cron>``: either;
    empty/``off`` = manual only. Anything else fails the DAG's import, naming the variable."""
    kind, cron = config.training_schedule()
    if kind != "assets":
        return cron
    assets = SOURCE_ASSETS["corpus"] | SOURCE_ASSETS["labeled"]
    if cron is None:
        return assets
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=assets)


def source_check_schedule() -> str | None:
    """``ENCODERFLOW_SOURCE_CHECK_SCHEDULE`` (a cron or preset); default ``@hourly`` when the training
    DAG is scheduled on assets, else manual only."""
    value = os.environ.get("ENCODERFLOW_SOURCE_CHECK_SCHEDULE", "").strip()
    if value.lower() in ("none", "off", "manual"):
        return None
    if value:
        return config.checked_cron(
            value,
            "ENCODERFLOW_SOURCE_CHECK_SCHEDULE",
            fix="give a cron expression ('*/30 * * * *') or a preset (@hourly)",
        )
    return "@hourly" if config.training_schedule()[0] == "assets" else None


def source_params() -> dict[str, Param]:
    """The source checker's form: where the watched data is (the training form's fields of the same name)."""
    return {
        f.name: Param(_source_default(f.name), type=["null", "string"], **f.metadata)
        for f in fields(config.Sources)
        if f.name in (*WATCHED, "data_file")
    }


def record_source(outlet_events, checked: dict[str, Any]) -> None:
    """One ``encoderflow_source_<role>`` event when, and only when, the source changed."""
    if checked.get("changed"):
        outlet_events[SOURCE_CHANGES].add(
            SOURCE_ASSETS[checked["role"]],
            extra={"location": checked["location"], "fingerprint_sha256": checked["fingerprint_sha256"]},
        )


def _source_default(name: str) -> str | None:
    """A scheduled run has no form: its data declaration is ``ENCODERFLOW_DATA_FILE`` (read at parse time)."""
    value = os.environ.get("ENCODERFLOW_DATA_FILE", "").strip() if name == "data_file" else ""
    # The form's field takes absolute paths only: a relative one is taken from the dag-processor's folder.
    return os.path.abspath(value) if value else None


_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}


def form_param(k: config.Knob) -> Param:
    """A trigger-form field for a declared config field: empty means the preset's value."""
    extra: dict[str, Any] = {}
    if k.choices:
        extra["enum"] = [None, *k.choices]
        extra["values_display"] = {"null": "the preset's value", **(k.display or {})}
    if k.minimum is not None:
        extra["exclusiveMinimum" if k.exclusive_minimum else "minimum"] = k.minimum
    if k.maximum is not None:
        extra["maximum"] = k.maximum
    if k.form:
        extra["section"] = k.form
    return Param(
        None,
        type=["null", _JSON_TYPES[k.type]],
        title=k.title,
        description=f"{k.description} Empty: the preset's value ({config.preset_hint(k)}).",
        **extra,
    )


def _shape(preset: str) -> str:
    """A preset's model and pretraining length as the form says them, from the preset itself (they were
    written here by hand)."""
    c = config.from_overrides(preset, {})
    layers, epochs = c.model.num_layers, c.pretrain.epochs
    return (
        f"{layers} layer{'s' * (layers != 1)}, dim {c.model.model_dim}, {epochs} pretraining epoch{'s' * (epochs != 1)}"
    )


def params() -> dict[str, Param]:
    """The trigger form: preset, where the data comes from, the declared form fields, free overrides."""
    form = [k for k in config.knobs() if k.form is not None]
    form.sort(key=lambda k: config.FORM_SECTIONS.index(k.form))
    return {
        "preset": Param(
            config.deployment_preset(),
            type="string",
            enum=sorted(config.PRESETS),
            title="Preset",
            values_display={
                "guide": "guide: the Keras guide's numbers (GPU)",
                "recipe": "recipe: the guide's model, a better training recipe (GPU)",
                "smoke": "smoke: tiny model, minutes on a CPU",
            },
            description=f"Hyperparameters every empty field below falls back to. guide: {_shape('guide')} "
            "(needs a GPU). recipe: the same model with packed and task-adaptive text, pre-norm, schedules "
            f"and weight decay (README, Model quality). smoke: {_shape('smoke')}, a plumbing check in minutes "
            "on a CPU.",
        ),
        **{
            f.name: Param(_source_default(f.name), type=["null", "string"], **f.metadata)
            for f in fields(config.Sources)
        },
        **{f.name: Param(f.default, type="boolean", **f.metadata) for f in fields(config.RunOptions)},
        **{config.param_name(k): form_param(k) for k in form},
        "overrides": Param(
            None,
            type=["null", "array"],
            # A line not shaped section.key=value, or of no section, is refused at trigger time (HTTP 400)
            # under this short pattern; an unknown key by check_params, which names the nearest keys
            # (a pattern listing every key made a 3 KB error message with no suggestion).
            items={"type": "string", "pattern": "^(" + "|".join(config.SECTIONS) + r")\.[a-z0-9_]+=.*$"},
            title="Other overrides",
            section="Advanced",
            description="One section.key=value per line for any other config value, e.g. "
            "model.num_layers=2 (list: docs/parameters.md or `encoderflow config`). "
            "Applied after the fields above.",
        ),
    }


def log_failure(context) -> None:
    """on_failure_callback: one line that says which task of which run failed, on which try, and the
    error's type: a line to grep for. The cause and its fix are the exception's own record, just
    above it in the task log; saying them again here would say them twice.

    The cause (error, one-line message, fix) is also kept in ``runs/<run id>/failure.json``, the
    run's first failure only, for the run summary and anyone reading the run folder.
    """
    from airflow.sdk.exceptions import AirflowFailException

    ti, exc = context["ti"], context.get("exception")
    map_index = getattr(ti, "map_index", -1)
    map_index = -1 if map_index is None else map_index
    label = errors.task_label(ti.task_id, map_index)
    max_tries = (getattr(ti, "max_tries", 0) or 0) + 1
    no_retry = isinstance(exc, AirflowFailException)
    attempt = f"try={ti.try_number}, no retry" if no_retry else f"try={ti.try_number}/{max_tries}"
    # failure.json is what the runs page shows: its fix names the form's fields as the task log's does.
    cause = errors.cause_of(exc)
    cause = replace(cause, fix=in_form_words(cause.fix))
    if _ACTIVE_LOGS is not None:  # encoderflow run: the cause goes above this line, as a worker's log has it
        _ACTIVE_LOGS.write_exception(ti, exc)
    log.error("encoderflow FAILED %s.%s run=%s %s: %s", ti.dag_id, label, ti.run_id, attempt, cause.error)
    preset = (context.get("params") or {}).get("preset")
    _record_failure(ti, map_index, max_tries, cause, no_retry=no_retry, preset=preset)


def _record_failure(
    ti, map_index: int, max_tries: int, cause: errors.Cause, no_retry: bool, preset: str | None
) -> None:
    from datetime import UTC, datetime

    from airflow.sdk import conf

    if layout.run_folder_owner(ti.run_id):  # check_params refused it: that folder is another run's
        return
    try:
        errors.record_failure(
            ti.run_id,
            cause,
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
            map_index=map_index,
            try_number=ti.try_number,
            max_tries=max_tries,
            no_retry=no_retry,
            failed_at=datetime.now(UTC).isoformat(timespec="seconds"),
            # A run that fails before it reports has no summary: where a reader finds the preset,
            # the try's log in the UI, and the folder Airflow's file logs are under.
            preset=preset,
            # encoderflow run (dag.test) keeps its logs in the run folder and serves no UI to link to.
            log_url=None if os.environ.get("ENCODERFLOW_CLI_RUN") else getattr(ti, "log_url", None),
            log_folder=conf.get("logging", "base_log_folder", fallback=None),
        )
    except OSError as e:
        # The failure line above is the record that matters; a read-only run folder must not hide it.
        log.warning("could not keep the failure in %s: %s", errors.failure_path(ti.run_id), e)


def forget_failure(context) -> None:
    """on_success_callback: a task that failed the run, cleared and now done, is no longer its failure
    (the runs page and ``encoderflow runs`` would tell the user to fix what they fixed)."""
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    try:
        if errors.forget_failure(ti.run_id, ti.task_id, -1 if map_index is None else map_index):
            log.info("%s failed this run before and is done now: its failure is no longer the run's", ti.task_id)
    except OSError as e:
        log.warning("could not remove the failure kept in %s: %s", errors.failure_path(ti.run_id), e)


# While `encoderflow run` runs the DAG in its own process: what SIGTERM does there (stop the run as Ctrl-C does),
# and the task logs it writes (TaskLogs).
_IN_PROCESS_STOP: Any = None
_ACTIVE_LOGS: Any = None


def keep_stop_on_sigterm(context) -> None:
    """on_execute_callback: Airflow's task runner points SIGTERM at the operator's ``on_kill`` (a no-op
    here) as each task starts. A worker's supervisor then stops the task; under ``encoderflow run``,
    whose tasks run in its own process, a SIGTERM (systemd, ``timeout``, a CI cancel) was ignored and
    the run went on to promote. There it stops the run, as Ctrl-C does; on a worker nothing changes."""
    if _IN_PROCESS_STOP is not None:
        signal.signal(signal.SIGTERM, _IN_PROCESS_STOP)


DEFAULT_ARGS = {
    "retries": 1,
    "retry_delay": retry_delay(),
    "execution_timeout": timedelta(hours=1),
    "on_failure_callback": log_failure,
    "on_success_callback": forget_failure,
    "on_execute_callback": keep_stop_on_sigterm,
    # Each step logs its outputs itself, one line each; Airflow's dump of the whole returned dict
    # (up to kilobytes on one line) repeated them. The value stays in XCom and the UI.
    "show_return_value_in_logs": False,
}


def expected_failures(fn):
    """Bad data, bad config or diverged training fails the task once, without retry, saying what is
    wrong and the fix (:func:`errors.told`) in the exception Airflow logs. Each try is recorded
    (:class:`TryRecord`): a retry's log first says what became of the try before it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from airflow.sdk.exceptions import AirflowFailException

        record = TryRecord.begin()
        try:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if (full := errors.storage_error(exc)) is None:
                    raise
                raise full from None
        except EncoderflowError as exc:
            record.end(exc)
            # The message is the diagnosis; the stack below it (TF, GX, MLflow) only hides it.
            raise AirflowFailException(in_form_words(errors.told(exc))) from None
        except BaseException as exc:
            record.end(exc)
            raise
        record.end(None)
        return result

    return wrapper


class TryRecord:
    """``runs/<run>/tries/<task>[.<map index>].json``: this try's number, start and, once it ends, how.

    A try killed with its worker (SIGKILL, a lost heartbeat) never ends it: its log just stops, and the
    cause is only in the scheduler's log. The next try finds the record and says so first.
    """

    def __init__(self, path: Path | None, record: dict[str, Any]):
        self.path, self.record = path, record

    @classmethod
    def begin(cls) -> TryRecord:
        try:
            from airflow.sdk import get_current_context

            ti = get_current_context()["ti"]
        except RuntimeError:  # not in a task: a test calls the body itself
            return cls(None, {})
        if getattr(ti, "dag_id", DAG_ID) != DAG_ID:  # the source checker's runs have no run folder
            return cls(None, {})
        map_index = -1 if getattr(ti, "map_index", None) is None else ti.map_index
        label = ti.task_id + (f".{map_index}" if map_index >= 0 else "")
        # A run id another run's folder has: check_params refuses it; nothing of it goes in that folder.
        if layout.run_folder_owner(ti.run_id):
            return cls(None, {})
        path = layout.run_dir(ti.run_id) / "tries" / f"{label}.json"
        n, tries = ti.try_number, (getattr(ti, "max_tries", 0) or 0) + 1
        before = layout.read_json_or_none(path)
        before = before if isinstance(before, dict) and isinstance(before.get("try"), int) else None
        if n > 1 and before and before["try"] == n - 1:
            log.info("%s", previous_try_line(before, n, max(n, tries)))
        # The tries before, each as it ended (or never did), for `encoderflow runs <run>`.
        earlier = [*before.pop("earlier", []), before] if before and before["try"] < n else []
        record = {
            "try": n,
            "began": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": os.uname().nodename,
            "pid": os.getpid(),
            **({"earlier": earlier} if earlier else {}),
        }
        try:
            layout.write_json(path, record)
        except OSError as e:  # the try's own work decides whether it fails, not its record
            log.warning("could not record this try in %s: %s", path, e)
            return cls(None, record)
        return cls(path, record)

    def end(self, exc: BaseException | None) -> None:
        if self.path is None:
            return
        ended = {"at": datetime.now(UTC).isoformat(timespec="seconds")}
        if exc is None:
            # Its work returned; Airflow may still fail the try after (storing its XCom).
            ended["as"] = "returned"
        else:
            cause = errors.cause_of(exc)
            ended |= {"as": "failed", "error": cause.error, "message": cause.message, "no_retry": cause.expected}
        with contextlib.suppress(OSError):
            layout.write_json(self.path, {**self.record, "ended": ended})


def previous_try_line(before: dict[str, Any], n: int, tries: int) -> str:
    """What the record of try ``n - 1`` says of it, for the first line of try ``n``'s log."""
    began = str(before.get("began", "?")).replace("T", " ").replace("+00:00", " UTC")
    where = f"began {began} on {before.get('host', '?')}, pid {before.get('pid', '?')}"
    ended = before.get("ended")
    if not ended:
        return (
            f"try {n} of {tries}: try {n - 1} ({where}) never ended: its process was killed (its worker stopped, "
            "or it lost its heartbeat: the scheduler's log says which) or a person marked it failed; its log, "
            f"try {n - 1}, stops where it did"
        )
    at = str(ended.get("at", "?")).replace("T", " ").replace("+00:00", " UTC")
    if ended.get("as") in ("returned", "success"):
        return (
            f"try {n} of {tries}: try {n - 1} ({where}) ran its work to the end at {at}; this try runs it again "
            f"(a person cleared it, or Airflow failed try {n - 1} after its work: its log says)"
        )
    cleared = " (it fails without retry: a person cleared it)" if ended.get("no_retry") else ""
    failed = f"{ended.get('error')}: {ended.get('message')}"
    return f"try {n} of {tries}: try {n - 1} ({where}) failed at {at}: {failed}{cleared}"


def in_form_words(told: str) -> str:
    """A fix that names CLI flags (``--data-dir``, ``--set``), as read by someone who triggered from the
    form: the fields they are there, added once at the end. ``encoderflow run`` (``ENCODERFLOW_CLI_RUN``)
    keeps the flags alone."""
    # Once only: the failure callback may be handed this very text again (the exception's context lost).
    if os.environ.get("ENCODERFLOW_CLI_RUN") or "(trigger form: " in told:
        return told
    titles = {f"--{f.name.replace('_', '-')}": f.metadata["title"] for f in fields(config.Sources)}
    titles |= {f"--{f.name}": f.metadata["title"] for f in fields(config.RunOptions)}
    named = [f"{flag} is '{t}'" for flag, t in titles.items() if re.search(rf"{re.escape(flag)}(?![\w-])", told)]
    # A key with a field of its own is set there; any other through the free overrides.
    fields_of = {k.key: k.title for k in config.knobs() if k.form is not None}
    keys = list(dict.fromkeys(re.findall(r"--set ([a-z_]+\.[a-z0-9_]+)=", told)))
    named += [f"--set {key} is '{fields_of[key]}'" for key in keys if key in fields_of]
    if re.search(r"--set(?![\w-])", told) and not (keys and all(key in fields_of for key in keys)):
        named.append("--set is 'Other overrides (section.key=value)'")
    return f"{told} (trigger form: {'; '.join(named)})" if named else told


def mappable(items: list, what: str, fix: str) -> list:
    """``items``, for a mapped task to expand over, if Airflow will map that many.

    Airflow refuses a list longer than ``[core] max_map_length`` (default 1024) only after the task
    returns, as a failed XCom push that names neither the setting nor the count; this says both.

    Raises:
        config.ConfigError: more items than ``max_map_length``; the message carries ``fix``.
    """
    from airflow.sdk import conf

    limit = conf.getint("core", "max_map_length", fallback=1024)
    if len(items) > limit:
        raise config.ConfigError(
            f"{len(items)} {what} to map, more than Airflow maps in one run ([core] max_map_length = {limit})",
            fix=f"{fix}, or raise AIRFLOW__CORE__MAX_MAP_LENGTH on every Airflow component",
        )
    return items


def record_shards(outlet_events, sealed: dict[str, Any]) -> None:
    """The ``encoderflow_shards`` asset event carries the manifest and its sha256."""
    outlet_events[SHARDS].extra = {"manifest": sealed["manifest"], "manifest_sha256": sealed["manifest_sha256"]}


# Who starts a run that no person triggered, as the champion's move record says it.
_STARTED_BY = {"scheduled": "the schedule", "asset_triggered": "an asset update", "backfill": "a backfill"}


def triggered_by(dag_run) -> str:
    """Who started ``dag_run``, for the records a promotion leaves: the person at the terminal for
    ``encoderflow run`` (``ENCODERFLOW_USER``, else the login), the user who triggered it in the UI or
    the REST API, or what started it (the schedule, an asset update). Every gate promotion used to
    say "airflow"."""
    if os.environ.get("ENCODERFLOW_CLI_RUN"):  # dag.test names every run's user "dag_test"
        import getpass

        return f"{os.environ.get('ENCODERFLOW_USER') or getpass.getuser()} (encoderflow run)"
    if user := getattr(dag_run, "triggering_user_name", None):
        return str(user)
    run_type = str(getattr(getattr(dag_run, "run_type", None), "value", getattr(dag_run, "run_type", "")))
    return _STARTED_BY.get(run_type, "airflow")


def record_champion(
    outlet_events, promoted: dict[str, Any], val_accuracy: float | None, inlet_events=None, run_id: str | None = None
) -> None:
    """One ``<model>@champion`` asset event when, and only when, the champion moved: a cleared ``promote``
    whose earlier try of this run moved the champion and announced it announces nothing again (a DAG
    scheduled on the asset would run twice); one whose earlier try died before its event announces it."""
    move = promoted.get("promoted")
    if not move:
        return
    asset = champion_asset(promoted["registered_model"])
    if move.get("already") and (when := _announced(inlet_events, asset, str(move["to"]), run_id)):
        log.info("promote: this run announced %s v%s at %s already; no second event", asset.name, move["to"], when)
        return
    outlet_events[CHAMPION_MOVES].add(
        asset, extra={"version": promoted["version"], "run_id": promoted.get("run_id"), "val_accuracy": val_accuracy}
    )


def _announced(inlet_events, asset: Asset, version: str, run_id: str | None) -> str | None:
    """When this run's earlier event put ``version`` on ``asset``, from the newest events through the alias."""
    if inlet_events is None or run_id is None:
        return None
    for event in inlet_events[CHAMPION_MOVES].ascending(False).limit(100):
        extra = event.extra or {}
        if event.source_run_id == run_id and event.asset.uri == asset.uri and str(extra.get("version")) == version:
            return event.timestamp.isoformat(timespec="seconds")
    return None


# --- the embedded Airflow: ``encoderflow run`` (dag.test) and ``make airflow`` (standalone) ---------------------
# Its environment (AIRFLOW_HOME, the SQLite DB, this repo's DAG and plugin folders) is set by the CLI
# before it imports this module (cli.airflow_env, cli.init_airflow), since Airflow reads it on import.


def load_dag(dag_folder: Path):
    """The training DAG as parsed from ``dag_folder``; import errors end the command with their text."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dag_folder))
    if bag.import_errors:
        raise SystemExit("DAG import errors:\n" + "\n".join(f"{k}: {v}" for k, v in bag.import_errors.items()))
    dag = bag.get_dag(DAG_ID)
    if dag is None:
        raise SystemExit(f"no DAG {DAG_ID!r} in {dag_folder}")
    return dag


class TaskLogs:
    """One log file per task instance while ``dag.test`` runs the DAG in this process.

    A worker's supervisor writes each task's log file; ``dag.test`` runs tasks in-process and
    writes none, so their lines would only scroll past on the terminal. An Airflow listener marks
    where each task instance starts and ends, and a handler on the root logger copies the records
    in between (encoderflow's lines, the libraries', the failure callback's) to
    ``runs/<run id>/logs/task_id=<task>/[map_index=<i>/]attempt=<try>.log``. Airflow's own
    structured lines (task runner, execution API) bypass the logging module and stay on the
    terminal; so the failure Airflow logs (an expected failure's text, or the traceback of an
    unexpected one) is written to the file when its task fails.

    Attributes:
        paths: the log file of each task instance that ran, by (task_id, map_index, try_number).
        failed: each failed try's (task_id, map_index, try_number) and cause, in order: the
            summary's fallback when the failure callback recorded none.
    """

    def __init__(self) -> None:
        self.paths: dict[tuple[str, int, int], Path] = {}
        self.failed: list[tuple[tuple[str, int, int], errors.Cause]] = []
        self.run_id: str | None = None  # the run's: set before it starts (run_dag), or by its first task
        self.running: tuple[str, int, int] | None = None  # the task instance running now
        self.claim = None  # an open file: this process's claim on the run (see _claimed)
        self._written: set[tuple[str, int, int]] = set()  # the tries whose exception is in their log
        self._file = None
        self._handler = _TeeHandler(self)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def __enter__(self) -> TaskLogs:
        from airflow.sdk.listener import get_listener_manager

        global _ACTIVE_LOGS
        _ACTIVE_LOGS = self
        get_listener_manager().add_listener(self)
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, *exc_info) -> None:
        from airflow.sdk.listener import get_listener_manager

        global _ACTIVE_LOGS
        _ACTIVE_LOGS = None
        logging.getLogger().removeHandler(self._handler)
        manager = get_listener_manager()
        if manager.pm.is_registered(self):
            manager.pm.unregister(self)
        self._close()

    @staticmethod
    def key(ti) -> tuple[str, int, int]:
        return ti.task_id, -1 if ti.map_index is None else ti.map_index, ti.try_number

    def _open(self, ti) -> None:
        path = layout.task_log_path(ti.run_id, *self.key(ti))
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._handler.lock:  # records may come from other threads (data loaders, TF)
            self._close()
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open from start to end of a task
        self.paths[self.key(ti)] = path
        if self.claim is not None and ti.run_id != self.run_id:
            self.claim.seek(0)
            self.claim.truncate()
            self.claim.write(ti.run_id)
            self.claim.flush()
        self.run_id, self.running = ti.run_id, self.key(ti)

    def _close(self) -> None:
        with self._handler.lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self.running = None

    def write(self, text: str) -> None:
        with self._handler.lock:
            if self._file is not None:
                self._file.write(text if text.endswith("\n") else text + "\n")
                self._file.flush()

    # Airflow listener hooks, matched by name against Airflow's task-instance listener spec.
    @hookimpl
    def on_task_instance_running(self, previous_state, task_instance) -> None:
        self._open(task_instance)

    @hookimpl
    def on_task_instance_success(self, previous_state, task_instance) -> None:
        self._close()

    @hookimpl
    def on_task_instance_skipped(self, previous_state, task_instance) -> None:
        self._close()

    @hookimpl
    def on_task_instance_failed(self, previous_state, task_instance, error) -> None:

        if self._file is None:  # failed before it ran (e.g. while rendering templates)
            self._open(task_instance)
        cause = errors.cause_of(error)
        self.failed.append((self.key(task_instance), cause))
        self.write_exception(task_instance, error)
        self._close()

    def write_exception(self, ti, error) -> None:
        """What a worker's log holds in Airflow's exception record (an expected failure's text, cause and
        fix; an unexpected one's traceback), once per try. The failure callback writes it before its
        "encoderflow FAILED" line, as on a worker: the cause is the record just above that line."""
        import traceback

        key = self.key(ti)
        if key in self._written or not isinstance(error, BaseException):
            return
        self._written.add(key)
        self.write(str(error) if errors.cause_of(error).expected else "".join(traceback.format_exception(error)))


class _TeeHandler(logging.Handler):
    def __init__(self, logs: TaskLogs):
        super().__init__()
        self.logs = logs
        self.said = False  # that a line could not be written

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.logs.write(self.format(record))
        except Exception as exc:
            # A full disk failed every later line too, each with logging's "--- Logging error ---"
            # traceback on the terminal: say it once; the terminal keeps the lines.
            if not self.said:
                self.said = True
                sys.stderr.write(
                    f"encoderflow: could not write the task log ({exc}); its lines stay on this terminal\n"
                )


class RunOutcome(NamedTuple):
    run_id: str
    state: str
    states: list[tuple[str, int, str]]
    logs: TaskLogs


class UnrunnableFilter(logging.Filter):
    """dag.test's "No tasks to run. unrunnable tasks: {...}" warnings, as a reader needs them.

    After a failure, dag.test's loop sees the tasks downstream of it for a moment before it marks
    them upstream_failed, and warns naming one of them: a task that is not the failure, in a run
    whose summary names the failure: dropped. A task waiting out a retry's delay (or deferred) is
    worth the line, the run is waiting, not stuck: once, not every second of the wait.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None

    # A task instance as dag.test prints it: "<TaskInstance: dag.task run_id [map_index=N ][state] ti_id=...>".
    _TI = re.compile(r"<TaskInstance: (?:[\w.-]+\.)?([\w-]+)(?: \S+)?(?: map_index=(\d+))? \[(\w+)\]")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("No tasks to run."):
            return True
        if not any(state in message.lower() for state in ("up_for_retry", "deferred")) or message == self.last:
            return False
        self.last = message
        # Each task instance's repr (dag, run id, ti id) made this one line of 800 characters: say who waits.
        waiting = [
            f"{task}{f'[{index}]' if index else ''} ({state})"
            for task, index, state in self._TI.findall(message)
            if state.lower() in ("up_for_retry", "deferred")
        ]
        if waiting:
            record.msg, record.args = f"waiting: {', '.join(waiting)}; a retry starts after its delay", None
        return True


def run_dag(conf: dict[str, Any], dag_folder: Path) -> RunOutcome:
    """Run the DAG once through Airflow (``dag.test``); return run id, state, task states and task logs.

    The embedded Airflow's environment must be set (``cli.init_airflow``) before this module is
    imported: Airflow reads its configuration, the metadata DB's address included, when first imported.
    """
    refuse_beside_scheduler(
        "it would run this run's tasks too, a second time beside this process",
        fix=f"trigger the run in that Airflow (its UI, or POST /api/v2/dags/{DAG_ID}/dagRuns with this "
        "conf), or stop it first, or run with another ENCODERFLOW_HOME",
    )
    dag = load_dag(dag_folder)
    for run_id, changed in sweep_stopped_runs():
        if changed:  # a run Ctrl-C stopped was marked already
            said = ", ".join(f"{errors.task_label(t, m)} {s}" for t, m, s in sorted(changed, key=_failed_first))
            sys.stderr.write(
                f"encoderflow run: run {run_id} stopped without finishing (its process is gone): marked failed "
                f"({said})\n"
            )
    test_loop = logging.getLogger(type(dag).test.__module__)
    unrunnable = UnrunnableFilter()
    test_loop.addFilter(unrunnable)
    from airflow.models.dagrun import DagRun
    from airflow.utils.types import DagRunType

    # The run id dag.test will give its run, known before it starts: a Ctrl-C or TERM in its first
    # seconds (before a task starts) said "marked failed" and left the run running, in flight for good.
    now = datetime.now(UTC)
    run_id = DagRun.generate_run_id(run_type=DagRunType.MANUAL, logical_date=now, run_after=now)
    try:
        with TaskLogs() as logs, _claimed(logs, run_id), _stopped_by_ctrl_c(logs, conf.get("preset")):
            dr = dag.test(run_conf=conf, logical_date=now, run_after=now)
    finally:
        test_loop.removeFilter(unrunnable)
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == dr.run_id).all()
        # In the DAG's order (check_params first, report last), where a run stopped reads top to bottom.
        order = {task.task_id: i for i, task in enumerate(dag.topological_sort())}
        states = sorted(
            ((ti.task_id, ti.map_index, str(ti.state)) for ti in tis),
            key=lambda s: (order.get(s[0], len(order)), s[0], s[1]),
        )
    return RunOutcome(dr.run_id, str(dr.state), states, logs)


def rerun_fix(task: str | None, run_id: str | None = None) -> str:
    """What to do about a run stopped in ``task`` (None: between tasks); with ``run_id``, a pretraining
    backup taken by other code (the code changed since: an upgrade) is not promised as resumed."""
    resumes = ""
    if task == "pretrain":
        resumes = " and pretraining resumes from its last backup"
        if run_id is not None:
            from encoderflow.train.pretrain import backup_code

            taken = backup_code(layout.run_dir(run_id) / "pretrain")
            if taken is not None and taken != layout.code_hash():
                resumes = (
                    "; pretraining starts over: its backup was taken by other code (the code changed since), "
                    "which this code does not resume"
                )
    return f"run it again: what finished is reused{resumes}"


def _failed_first(ti: tuple[str, int, str]) -> tuple[bool, str, int]:
    """The task that was running (failed) first, then those that never ran, each in task and index order."""
    task, index, state = ti
    return state != "failed", task, index


@contextlib.contextmanager
def _stopped_by_ctrl_c(logs: TaskLogs, preset: str | None = None) -> Iterator[None]:
    """Ctrl-C stops the run, there and then, and nothing after the running task runs.

    Left to Python, SIGINT raises KeyboardInterrupt wherever the main thread is: a task fails with it
    and is retried, or training swallows it and the run goes on to promote a model. SIGTERM does the
    same as Ctrl-C (:func:`keep_stop_on_sigterm`). This handler
    writes the interruption into the task's log and the run's ``failure.json`` and ends the process
    (what a retry or re-run finds is what a kill leaves: finished, renamed outputs). A detached
    process then marks the Airflow run failed, once this one has exited and released the metadata DB.
    """

    def stop(signum, frame) -> None:
        for each in STOP_SIGNALS:  # a second Ctrl-C (or a TERM after it) must not cut this short
            signal.signal(each, signal.SIG_IGN)
        by = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        task = errors.task_label(*logs.running[:2]) if logs.running else None
        where = f"during {task}" if task else "between tasks"
        fix = rerun_fix(logs.running[0] if logs.running else None)
        if logs.run_id:
            logs.write(f"encoderflow INTERRUPTED ({by}) {where}: the run stops here; {fix}")
            cause = errors.Cause("Interrupted", f"{by} {where}", fix, expected=True)
            where_ids = dict(zip(("task_id", "map_index", "try_number"), logs.running or (), strict=False))
            errors.record_failure(logs.run_id, cause, dag_id=DAG_ID, run_id=logs.run_id, preset=preset, **where_ids)
            subprocess.Popen(
                [sys.executable, "-m", __name__, "fail-run", logs.run_id, str(os.getpid())],
                env=os.environ.copy(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        logs._close()
        sys.stderr.write(
            f"\nencoderflow run {logs.run_id or ''}: INTERRUPTED ({by}) {where}: nothing after it runs, the run "
            f"is marked failed; {fix}\n"
        )
        sys.stderr.flush()
        os._exit(errors.INTERRUPTED_EXIT)

    global _IN_PROCESS_STOP
    previous = {each: signal.signal(each, stop) for each in STOP_SIGNALS}
    _IN_PROCESS_STOP = stop
    try:
        yield
    finally:
        _IN_PROCESS_STOP = None
        for each, handler in previous.items():
            signal.signal(each, handler)


# What stops `encoderflow run` there and then: Ctrl-C, and a service manager's or `timeout`'s TERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _claims() -> Path:
    return layout.run_claims()


@contextlib.contextmanager
def _claimed(logs: TaskLogs, run_id: str) -> Iterator[None]:
    """While this process runs the DAG, ``airflow/encoderflow-runs/<pid>`` holds its run id under an
    exclusive ``flock``; the kernel drops the lock when the process dies, however it dies. A later
    ``encoderflow run`` that can take the lock knows the run was stopped (:func:`sweep_stopped_runs`)."""
    import fcntl

    _claims().mkdir(parents=True, exist_ok=True)
    path = _claims() / str(os.getpid())
    with open(path, "w", encoding="utf-8") as claim:
        fcntl.flock(claim, fcntl.LOCK_EX)
        claim.write(run_id)
        claim.flush()
        logs.claim, logs.run_id = claim, run_id
        try:
            yield
        finally:
            logs.claim = None
            path.unlink(missing_ok=True)


def sweep_stopped_runs() -> list[tuple[str, list[tuple[str, int, str]]]]:
    """Runs whose ``encoderflow run`` died (a kill, a crash) stay ``running`` in Airflow, with their
    running task, and their MLflow run RUNNING: mark each failed (:func:`fail_run`). Returns each
    run id with the task instances changed."""

    swept = []
    for path in sorted(_claims().glob("*")) if _claims().is_dir() else []:
        with open(path, encoding="utf-8") as claim:
            if not _lock_within(claim, 0.5):
                continue  # its process is alive, running its DAG
            run_id = claim.read().strip()
            if run_id:
                swept.append((run_id, fail_run(run_id)))
            path.unlink(missing_ok=True)
    return swept


def _lock_within(claim, seconds: float) -> bool:
    """Take ``claim``'s exclusive lock, trying for ``seconds``: ``encoderflow runs`` and ``prune`` read a
    dead run's claim under a brief shared lock (layout.stopped_runs), and one try then skipped that run."""
    import fcntl
    import time

    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def fail_run(run_id: str, wait_for_pid: int | None = None, wait_s: float = 60.0) -> list[tuple[str, int, str]]:
    """Mark a stopped run failed: in the metadata DB its unfinished task instances failed (those
    running) or upstream_failed (those not started) and the run failed, and in MLflow a run it left
    RUNNING killed (``registry.close_stopped``). Waits for ``wait_for_pid`` (the interrupted
    process) to exit first. Returns the task instances it changed."""
    import time
    from datetime import UTC, datetime

    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    deadline = time.monotonic() + wait_s
    while wait_for_pid and time.monotonic() < deadline:
        try:
            os.kill(wait_for_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    started = {TaskInstanceState.RUNNING, TaskInstanceState.QUEUED, TaskInstanceState.UP_FOR_RETRY}
    changed, running, stopped = [], [], False
    with create_session() as session:
        for ti in session.query(TaskInstance).filter(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id):
            if ti.state == TaskInstanceState.RUNNING:
                running.append({"task_id": ti.task_id, "map_index": ti.map_index, "try_number": ti.try_number})
            if ti.state in started:
                ti.state, ti.end_date = TaskInstanceState.FAILED, datetime.now(UTC)
            elif ti.state in (None, TaskInstanceState.SCHEDULED):
                ti.state = TaskInstanceState.UPSTREAM_FAILED
            else:
                continue
            changed.append((ti.task_id, ti.map_index, str(ti.state)))
        dr = session.query(DagRun).filter(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id).one_or_none()
        # The record keeps the preset, as a Ctrl-C's does: a killed run, pruned, read "–" in `encoderflow runs`.
        preset = (dr.conf or {}).get("preset") if dr is not None else None
        if dr is not None and dr.state == DagRunState.RUNNING:
            dr.set_state(DagRunState.FAILED)
            stopped = True
    if stopped:  # a kill leaves no record of its own: `runs` showed "FAILED" and nothing about where or why
        where = running[0] if running else {}
        task = errors.task_label(where["task_id"], where["map_index"]) if where else None
        cause = errors.Cause(
            "Stopped",
            f"the encoderflow run process that ran it ended {f'during {task}' if task else 'between tasks'} without "
            "finishing (killed, or its machine stopped)",
            rerun_fix(where.get("task_id"), run_id),
            expected=True,
        )
        with contextlib.suppress(OSError):  # an Interrupted record (Ctrl-C) of the same try stays first
            errors.record_failure(
                run_id, cause, dag_id=DAG_ID, run_id=run_id, **where, **({"preset": preset} if preset else {})
            )
    from encoderflow import registry

    registry.close_stopped(DAG_ID, run_id)
    return changed


class SchedulerRunning(EncoderflowError):
    """An Airflow scheduler is alive on the metadata DB a second Airflow process was about to use."""


def live_scheduler() -> str | None:
    """The scheduler alive on this Airflow's metadata DB (its heartbeat within Airflow's health
    threshold), described for a person; None when there is none."""
    from airflow.jobs.job import most_recent_job

    job = most_recent_job("SchedulerJob")
    if job is None or not job.is_alive():
        return None
    beat = (datetime.now(UTC) - job.latest_heartbeat).total_seconds()
    return f"on {job.hostname} as {job.unixname}, since {job.start_date:%Y-%m-%d %H:%M} UTC, heartbeat {beat:.0f} s ago"


def refuse_beside_scheduler(starting: str, fix: str) -> None:
    """Refuse to start ``starting`` on a metadata DB a live scheduler uses.

    ``dag.test`` makes an ordinary running DAG run: a scheduler on the same DB (``encoderflow airflow``
    on the same home) queued its tasks as well, and ran them a second time beside ``encoderflow run``.
    When it lost the race, the run failed with Airflow's "TI was not in the running state" and a cause
    that pointed at a worker. A second standalone's scheduler shared the first one's runs the same way.

    Raises:
        SchedulerRunning: one is alive.
    """
    if (scheduler := live_scheduler()) is not None:
        raise SchedulerRunning(
            f"an Airflow scheduler is running on this home's Airflow ({os.environ['AIRFLOW_HOME']}; {scheduler}): "
            f"{starting}",
            fix=fix,
        )


def paused_dags() -> list[str]:
    """This repository's DAGs that the metadata DB has paused (a trigger of one waits in 'queued')."""
    from airflow.models.dag import DagModel

    return [d for d in (DAG_ID, SOURCES_DAG_ID) if (m := DagModel.get_dagmodel(d)) is not None and m.is_paused]


def create_gpu_pool() -> None:
    """The ``gpu`` pool (one slot) pretrain and finetune run in; without it they would never be queued."""
    pool = subprocess.run(
        [sys.executable, "-m", "airflow", "pools", "set", "gpu", "1", "one training job on the accelerator at a time"],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
    )
    if pool.returncode != 0:
        sys.stderr.write(pool.stdout[-2000:] + pool.stderr[-2000:])
        raise SystemExit("airflow pools set gpu failed")


if __name__ == "__main__" and sys.argv[1:2] == ["fail-run"]:  # the detached half of _stopped_by_ctrl_c
    fail_run(sys.argv[2], int(sys.argv[3]))
    (_claims() / sys.argv[3]).unlink(missing_ok=True)
