"""Airflow glue for the ``encoder_pretraining`` DAG; only the DAG file imports this module.

Here: the trigger form built from the config declarations, failure handling (one line per
failure, no retry for bad data, bad config or diverged training), retry and pool presets, the
assets other DAGs schedule on. ``encoderflow.steps`` stays free of Airflow.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import fields
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetAlias, Param

from encoderflow import DAG_ID as DAG_ID  # re-exported: the DAG files read their names here
from encoderflow import config, errors
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


def schedule_from_env() -> Any:
    """``ENCODERFLOW_SCHEDULE``: a cron expression or preset (``@daily``); ``assets``: on every change
    the source checker records to your corpus or labeled data; ``assets|<cron>``: either;
    empty/``off`` = manual only."""
    value = os.environ.get("ENCODERFLOW_SCHEDULE", "").strip()
    if value.lower() in ("", "none", "off", "manual"):
        return None
    kind, _, cron = value.partition("|")
    if kind.strip().lower() != "assets":
        return value
    assets = SOURCE_ASSETS["corpus"] | SOURCE_ASSETS["labeled"]
    if not cron.strip():
        return assets
    from airflow.timetables.assets import AssetOrTimeSchedule
    from airflow.timetables.trigger import CronTriggerTimetable

    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron.strip(), timezone="UTC"), assets=assets)


def source_check_schedule() -> str | None:
    """``ENCODERFLOW_SOURCE_CHECK_SCHEDULE`` (a cron or preset); default ``@hourly`` when the training
    DAG is scheduled on assets, else manual only."""
    value = os.environ.get("ENCODERFLOW_SOURCE_CHECK_SCHEDULE", "").strip()
    if value.lower() in ("none", "off", "manual"):
        return None
    if value:
        return value
    return "@hourly" if os.environ.get("ENCODERFLOW_SCHEDULE", "").strip().lower().startswith("assets") else None


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


def params() -> dict[str, Param]:
    """The trigger form: preset, where the data comes from, the declared form fields, free overrides."""
    form = [k for k in config.knobs() if k.form is not None]
    form.sort(key=lambda k: config.FORM_SECTIONS.index(k.form))
    return {
        "preset": Param(
            "guide",
            type="string",
            enum=sorted(config.PRESETS),
            title="Preset",
            values_display={
                "guide": "guide: the Keras guide's numbers (GPU)",
                "recipe": "recipe: the guide's model, a better training recipe (GPU)",
                "smoke": "smoke: tiny model, minutes on a CPU",
            },
            description="Hyperparameters every empty field below falls back to. guide: 3 layers, dim "
            "256, 8 pretraining epochs (needs a GPU). recipe: the same model with packed and task-adaptive "
            "text, pre-norm, schedules and weight decay (README, Model quality). smoke: 1 layer, dim 32, a "
            "plumbing check in minutes on a CPU.",
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
            items={"type": "string", "pattern": r"^[a-z_]+\.[a-z_]+=.*$"},
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
    label = ti.task_id if map_index == -1 else f"{ti.task_id}[{map_index}]"
    max_tries = (getattr(ti, "max_tries", 0) or 0) + 1
    no_retry = isinstance(exc, AirflowFailException)
    attempt = f"try={ti.try_number}, no retry" if no_retry else f"try={ti.try_number}/{max_tries}"
    error = errors.cause_of(exc).error
    log.error("encoderflow FAILED %s.%s run=%s %s: %s", ti.dag_id, label, ti.run_id, attempt, error)
    _record_failure(ti, map_index, max_tries, exc, no_retry=no_retry)


def _record_failure(ti, map_index: int, max_tries: int, exc: BaseException | None, no_retry: bool) -> None:
    from datetime import UTC, datetime

    try:
        errors.record_failure(
            ti.run_id,
            errors.cause_of(exc),
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
            map_index=map_index,
            try_number=ti.try_number,
            max_tries=max_tries,
            no_retry=no_retry,
            failed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
    except OSError as e:
        # The failure line above is the record that matters; a read-only run folder must not hide it.
        log.warning("could not keep the failure in %s: %s", errors.failure_path(ti.run_id), e)


DEFAULT_ARGS = {
    "retries": 1,
    "retry_delay": retry_delay(),
    "execution_timeout": timedelta(hours=1),
    "on_failure_callback": log_failure,
}


def expected_failures(fn):
    """Bad data, bad config or diverged training fails the task once, without retry, saying what is
    wrong and the fix (:func:`errors.told`) in the exception Airflow logs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from airflow.sdk.exceptions import AirflowFailException

        try:
            return fn(*args, **kwargs)
        except EncoderflowError as exc:
            # The message is the diagnosis; the stack below it (TF, GX, MLflow) only hides it.
            raise AirflowFailException(errors.told(exc)) from None

    return wrapper


def record_shards(outlet_events, sealed: dict[str, Any]) -> None:
    """The ``encoderflow_shards`` asset event carries the manifest and its sha256."""
    outlet_events[SHARDS].extra = {"manifest": sealed["manifest"], "manifest_sha256": sealed["manifest_sha256"]}


def record_champion(outlet_events, promoted: dict[str, Any], val_accuracy: float | None) -> None:
    """One ``<model>@champion`` asset event when, and only when, the champion moved."""
    if promoted.get("promoted"):
        outlet_events[CHAMPION_MOVES].add(
            champion_asset(promoted["registered_model"]),
            extra={"version": promoted["version"], "run_id": promoted.get("run_id"), "val_accuracy": val_accuracy},
        )
