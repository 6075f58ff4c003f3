"""What every run of ``encoder_pretraining`` did: its folder, Airflow's word on it, and the registry's.

One place reads the record of runs for everyone who shows it: the runs page (``plugins/``),
``encoderflow runs`` (a terminal's view of the same), and ``encoderflow prune`` (which must know
what is in flight and what a registry alias points to before it removes anything).

- **Folders**: ``runs/<folder>`` holds ``summary.json`` once a run reports, ``gate.json`` once it is
  gated, ``failure.json`` if a task failed, ``data_docs/`` once it is validated; a folder prune
  removed leaves ``pruned/<folder>.json`` with the first three.
- **Airflow**: every Airflow that writes into the home (the environment's, the embedded one of
  ``encoderflow run``, the native stack's), asked with Airflow's own CLI.
- **MLflow**: the versions the ``champion`` and ``previous`` aliases point to, in every store the
  runs registered in.

Plain Python at import (standard library and ``encoderflow``'s light modules); MLflow and Airflow
are asked only when a caller asks.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from encoderflow import DAG_ID, layout
from encoderflow.config import GateConfig, set_item
from encoderflow.errors import failure_outlived, task_label
from encoderflow.gate import METRICS as GATE_METRICS
from encoderflow.layout import read_json_or_none, safe_run_id
from encoderflow.results import current_names

FINISHED = ("success", "failed")
IN_FLIGHT = ("queued", "running")
# Airflow says running, but the `encoderflow run` process that ran it is gone (layout.stopped_runs).
STOPPED = "stopped"
ALIASES = ("champion", "previous")
# Not an alias: marks a version ``encoderflow prune --versions`` deleted, for ``runs`` to say so (a plain
# "v2" read as a version MLflow still holds). It protects nothing: prune keeps to :data:`ALIASES`.
DELETED = "deleted"
# Declared once, with the gate's other settings: gate.registered_model's default.
DEFAULT_MODEL = GateConfig().registered_model

# The run-folder stages that keep a per-epoch ``history`` in ``<stage>/result.json``, in page order.
STAGES = (
    ("pretrain", "Pretraining (MLM)"),
    ("finetune", "Fine-tuning"),
    ("baseline", "BoW baseline"),
)


@dataclass(frozen=True)
class AirflowRuns:
    """What the Airflows writing into this home say about the DAG's runs: ``states`` by run folder
    name; ``asked`` False when none could be asked (then nothing is known to be idle)."""

    states: dict[str, str]
    asked: bool
    said: str

    @property
    def in_flight(self) -> list[str]:
        return sorted(name for name, state in self.states.items() if state in IN_FLIGHT)


def _airflow_envs(home: Path) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
    """The Airflows whose runs write into ``home``, each as (label, environment), and why one that
    may hold runs cannot be asked (None: all can).

    The environment's own Airflow when it names one (``AIRFLOW_HOME`` or the metadata DB's
    settings: a deployment's container, the scheduler's host); and the embedded one of
    ``encoderflow run`` / ``make airflow`` (if its DB exists) and the native stack's (``make stack``),
    which use their own whatever the environment says.
    """
    from encoderflow.cli import airflow_env

    envs = []
    named = [k for k in os.environ if k == "AIRFLOW_HOME" or k.startswith("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")]
    if named:
        envs.append((f"of this environment ({', '.join(sorted(named))})", dict(os.environ)))
    embedded = layout.airflow_home() / "airflow.db"
    if embedded.exists() and os.environ.get("AIRFLOW_HOME") != str(layout.airflow_home()):
        envs.append((f"embedded ({embedded})", {**os.environ, **airflow_env()}))
    if (home / "stack" / "secrets.json").exists():
        from encoderflow.stack import Stack

        stack = Stack(home)
        if not stack.alive("postgres"):
            return envs, "make stack's PostgreSQL is not running, and its runs' states are there (make stack)"
        envs.append(("make stack (PostgreSQL)", stack.env("scheduler")))
    if not envs:
        return envs, (
            "no Airflow metadata DB found for this home: set AIRFLOW_HOME or "
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN to the one its runs used"
        )
    return envs, None


@dataclass(frozen=True)
class DagRuns:
    """Every run of the DAG the Airflows writing into a home know, newest first, each as
    ``airflow dags list-runs`` gives it (``run_id``, ``state``, ``start_date``, ``end_date``, ...);
    ``asked`` False when one of them could not be asked (then ``runs`` is empty), ``said``
    the line a report shows, and ``waiting`` the part of it that names a stopped stack worker the
    runs in flight wait for (:func:`idle_queues`; empty when none)."""

    runs: list[dict[str, Any]]
    asked: bool
    said: str
    waiting: str = ""


def dag_runs(home: Path, dag_id: str = DAG_ID) -> DagRuns:
    """The runs of ``dag_id`` that the Airflows writing into ``home`` know (``airflow dags
    list-runs``, Airflow's own CLI, in a subprocess: it works against any metadata DB Airflow
    supports, and a CLI reader needs no Airflow process of its own)."""
    return asking_airflow(home, dag_id)()


def asking_airflow(home: Path, dag_id: str = DAG_ID) -> Callable[[], DagRuns]:
    """Start asking the Airflows writing into ``home`` (:func:`dag_runs`) and return the call that
    waits for their answer. Each Airflow CLI takes seconds to start, so a reader asks MLflow
    meanwhile, and several Airflows are asked at once. The environments are read now: a caller
    may change ``os.environ`` (MLflow's settings) while Airflow is asked. A reader that exits
    without calling it kills the CLIs at exit."""
    envs, problem = _airflow_envs(home)
    if problem:
        unasked = DagRuns([], False, f"Airflow not asked: {problem}")
        return lambda: unasked
    # Each CLI in a process of its own, started now; nothing joins them at exit, so Ctrl-C ends the reader
    # at once (a thread waiting on one held the interpreter's exit for as long as Airflow took).
    asked = [(label, env, _start_list_runs(env, dag_id)) for label, env in envs]

    def answer() -> DagRuns:
        found: list[dict[str, Any]] = []
        said = []
        waiting = ""
        answers = [(label, env, answered()) for label, env, answered in asked]  # every CLI waited for
        for label, env, runs in answers:
            if isinstance(runs, str):
                return DagRuns([], False, f"Airflow {label}: could not list the runs of {dag_id} ({runs})")
            # Airflow's CLI writes "" for a date it does not have (a queued run's start); the page's ORM None.
            runs = mark_stopped(
                [{k: (None if v == "" and k.endswith("_date") else v) for k, v in r.items()} for r in runs]
            )
            found += runs
            said.append(f"{label}: {len(runs)} runs")
            in_flight = [r for r in runs if r.get("state") in IN_FLIGHT]
            if in_flight and {r.get("run_id") for r in in_flight} - layout.live_runs() and not _scheduler_alive(env):
                # Its standalone killed: its runs stay running, and prune keeps everything, until it is back.
                said[-1] += (
                    " (no scheduler alive on it: its runs in flight wait until that Airflow runs again, "
                    "encoderflow airflow or make stack, which then finishes or fails them)"
                )
            elif in_flight and label.startswith("make stack"):
                waiting = idle_queues(home)
                said[-1] += waiting
        found.sort(key=lambda r: str(r.get("run_after") or r.get("start_date") or ""), reverse=True)
        return DagRuns(found, True, "Airflow " + "; ".join(said), waiting)

    return answer


def idle_queues(home: Path) -> str:
    """What the runs line adds when a worker of ``home``'s make stack is not running: its queue's tasks
    wait ``queued``, and "in flight" alone did not say so (``stack-status`` did). Empty when both run."""
    from encoderflow.stack import WORKERS, Stack

    st = Stack(home)
    down = [name for name in WORKERS if not st.alive(name)]
    if not down:
        return ""
    restarting = st.supervisor_pid() is not None
    said = [
        f"{name} (queue {WORKERS[name][0]}) "
        + (
            "is being restarted by the supervisor"
            if restarting and st.wanted(name)
            else f"is stopped: python -m encoderflow.stack start {name}, or make stack"
        )
        for name in down
    ]
    # Not "not running": the runs are in flight; their tasks on that queue are what waits.
    return f" (waiting for a worker: {'; '.join(said)}; a queue's tasks wait for its worker)"


def mark_stopped(dag_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``dag_runs`` with :data:`STOPPED` for each run Airflow says is in flight whose ``encoderflow run``
    process is gone (:func:`encoderflow.layout.stopped_runs`): until the next run sweeps it, it read as in
    flight, and prune held every folder back for it. The CLI and the runs page both say it."""
    stopped = layout.stopped_runs()
    for run in dag_runs:
        if run.get("state") in IN_FLIGHT and run.get("run_id") in stopped:
            run["state"] = STOPPED
    return dag_runs


def ask_airflow(home: Path, dag_id: str = DAG_ID) -> AirflowRuns:
    """The state of every run of ``dag_id`` that the Airflows writing into ``home`` know, by run
    folder name (:func:`dag_runs`). Not asked (``asked`` False) when one of them cannot be: then
    no run is known not to be in flight."""
    return airflow_states(dag_runs(home, dag_id))


def airflow_states(answer: DagRuns) -> AirflowRuns:
    """:func:`dag_runs`'s answer as the state of each run folder."""
    states: dict[str, str] = {}
    for run in answer.runs:
        name = layout.safe_run_id(run["run_id"])
        if states.get(name) not in IN_FLIGHT:  # two run ids of one folder name: one in flight holds it
            states[name] = run["state"]
    return AirflowRuns(states, answer.asked, answer.said)


def _start_list_runs(env: dict[str, str], dag_id: str) -> Callable[[], list[dict[str, Any]] | str]:
    """Start ``airflow dags list-runs`` and return the call that waits for its JSON, or for why it
    could not be had. Airflow writes its own warnings to standard output too; the JSON is its one
    line that starts with ``[``. Its output goes to temporary files: a pipe would stall a long list
    until it was read."""
    cmd = [sys.executable, "-m", "airflow", "dags", "list-runs", dag_id, "-o", "json"]
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    # Its warnings (graphviz missing, say) would be lines of standard output too.
    proc = subprocess.Popen(cmd, env={**env, "PYTHONWARNINGS": "ignore"}, stdout=out, stderr=err, text=True)
    # A reader that exits before it reads the answer (interrupted while it asks MLflow) takes the CLI along.
    stop = functools.partial(_stop, proc)
    atexit.register(stop)

    said: list[list[dict[str, Any]] | str] = []  # the answer, once read: a second call gets it again

    def answered() -> list[dict[str, Any]] | str:
        if not said:
            said.append(_read_list_runs(proc, out, err, stop))
        return said[0]

    return answered


def _scheduler_alive(env: dict[str, str]) -> bool:
    """Whether a scheduler is alive on the Airflow ``env`` points at (``airflow jobs check``: its
    heartbeat in the job table); True when that cannot be told, as no claim is then made."""
    cmd = [sys.executable, "-m", "airflow", "jobs", "check", "--job-type", "SchedulerJob", "--limit", "1"]
    try:
        proc = subprocess.run(cmd, env={**env, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return True
    return proc.returncode == 0 or "No alive jobs found" not in proc.stdout + proc.stderr


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _read_list_runs(proc: subprocess.Popen, out, err, stop: Callable[[], None]) -> list[dict[str, Any]] | str:
    """Wait for :func:`_start_list_runs`'s CLI (killed on a timeout or an interrupt) and read its answer."""
    with out, err:
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            return "no answer in 300 s: is its metadata DB up?"
        finally:
            stop()  # timed out, or the reader was interrupted: no CLI left running
            atexit.unregister(stop)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        lines = stdout.splitlines()
        if proc.returncode == 0:
            for line in lines:
                if line.startswith("["):
                    with contextlib.suppress(ValueError):
                        return json.loads(line)
            if any("No data found" in line for line in lines):
                return []
    said = [line.strip() for line in (stdout + "\n" + stderr).splitlines() if line.strip()]
    errors = [line for line in said if "error" in line.lower()]
    return ((errors or said)[-1] if said else f"exit {proc.returncode}, no output")[:300]


def in_stage_order(by_stage: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``by_stage``'s items in :data:`STAGES`' order (pretrain before finetune), others after:
    ``summary.json`` keeps its keys sorted."""
    order = [stage for stage, _ in STAGES]
    return sorted(by_stage.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


@dataclass(frozen=True)
class Aliased:
    """A version some alias points to, the Airflow run (folder name) that registered it, and the
    tracking URI of the store it is in (each store numbers its versions from 1)."""

    model: str
    version: str
    alias: str
    run: str | None
    store: str = ""
    # The champion's: the last move of the alias (registry.moves_in), when it was the move onto it.
    moved: str = ""
    # The encoder its pretraining began from (lineage.parent), when that was a file: prune keeps it.
    parent: str = ""

    @property
    def why(self) -> str:
        return f"registered {self.model} v{self.version} ({self.alias})"

    @property
    def aliased(self) -> bool:
        """An alias points to it (not a :data:`DELETED` record)."""
        return self.alias in ALIASES


def aliased_versions(home: Path) -> tuple[list[Aliased] | None, str, set[str]]:
    """Every version the ``champion`` or ``previous`` alias of any registered model points to (and, as
    :data:`DELETED`, every version ``prune --versions`` deleted), and a line for the report, and the
    tracking URIs asked; None when an MLflow the runs registered in could not be asked (the caller then
    keeps every run that registered a version).

    Asked: the environment's MLflow (``MLFLOW_TRACKING_URI``), else the embedded store (if it
    exists) and the native stack's server (with the workers' login); and every other tracking URI a
    run folder's ``summary.json`` records.
    """
    from encoderflow import registry

    stores: dict[str, dict[str, str]] = {}  # tracking URI -> the environment to ask it with
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        stores[uri] = {}
    else:
        if not registry.no_store():
            stores[registry.embedded_uri()] = {}
        if (home / "stack" / "secrets.json").exists():
            from encoderflow.stack import Stack

            stack = Stack(home)
            if not stack.alive("mlflow"):
                return None, "MLflow of make stack: not running, not asked (make stack starts it)", set()
            env = stack.env("worker-default")
            stores[stack.mlflow_url] = {k: env[k] for k in env if k.startswith("MLFLOW_")}
    for summary in (home / "runs").glob("*/summary.json"):
        recorded = (_object((_object(layout.read_json_or_none(summary)) or {}).get("registry")) or {}).get(
            "tracking_uri"
        )
        if not isinstance(recorded, str):
            continue
        # A SQLite store that is gone holds no alias (and asking would create it empty).
        gone = recorded.startswith("sqlite:///") and not Path(recorded[len("sqlite:///") :]).exists()
        if recorded and recorded not in stores and not gone:
            stores[recorded] = {}
    found: list[Aliased] = []
    for uri, env in stores.items():
        with _environ({**env, "MLFLOW_TRACKING_URI": uri}):
            aliased, said = _aliased(registry, uri)
        if aliased is None:
            return None, said, set(stores)
        found += aliased
    # dict.fromkeys: a server over the embedded store's database lists the same aliases again.
    said = ", ".join(dict.fromkeys(f"{a.model} v{a.version} ({a.alias})" for a in found if a.aliased))
    said = said or "no aliased version"
    moves = dict.fromkeys(f"\n  {a.model} v{a.version} is champion since {a.moved}" for a in found if a.moved)
    return found, f"MLflow ({', '.join(stores) or 'no registry here yet'}): {said}{''.join(moves)}", set(stores)


def _moved(move: dict[str, Any]) -> str:
    """A champion move, as the runs header tells it: when, what, who, why."""
    at = str(move.get("at") or "")[:16].replace("T", " ")
    before = f" from v{move['from']}" if move.get("from") else ", the first champion"
    reason = str(move.get("reason") or "")
    reason = reason if len(reason) <= 120 else reason[:117] + "..."
    return f"{at} UTC ({move.get('action')}{before}, by {move.get('who')}: {reason!r})"


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _aliased(registry, store: str) -> tuple[list[Aliased] | None, str]:
    try:
        c = registry.client()
        found = []
        for model in c.search_registered_models():
            moves = registry.moves_in(model.tags)
            for alias, version in sorted(model.aliases.items()):
                if alias in ALIASES:
                    tags = c.get_model_version(model.name, version).tags
                    run, parent = tags.get("airflow.run_id"), tags.get("lineage.parent", "")
                    last = moves[-1] if moves and alias == "champion" else {}
                    moved = _moved(last) if str(last.get("to")) == str(version) else ""
                    found.append(
                        Aliased(
                            model.name,
                            str(version),
                            alias,
                            run and layout.safe_run_id(run),
                            store,
                            moved,
                            parent if parent.startswith("/") else "",
                        )
                    )
            found += [
                Aliased(model.name, number, DELETED, layout.safe_run_id(run) if isinstance(run, str) else None, store)
                for number, record in registry.pruned_in(model.tags).items()
                for run in [(record.get("tags") or {}).get("airflow.run_id")]
            ]
    except Exception as exc:  # any failure to ask: keep more, never less
        from encoderflow.errors import cause_of, one_line

        cause = cause_of(exc)
        if cause.error == "MlflowUnavailable":  # an outage, told as one (a 503 is its database, not MLflow, down)
            return None, f"MLflow could not be asked: {cause.message}"
        return None, f"MLflow at {registry.tracking_uri()}: could not be asked ({one_line(str(exc), 300)})"
    return found, ""


def data_docs(run_dir: Path) -> dict[str, str]:
    """dataset -> index.html path relative to the run folder, for every Data Docs site it holds."""
    root = run_dir / "data_docs"
    if not root.is_dir():
        return {}
    return {d.name: f"data_docs/{d.name}/index.html" for d in sorted(root.iterdir()) if (d / "index.html").is_file()}


DOCS_PAGES_SHOWN = 6


def data_docs_pages(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """dataset -> its files' validation result pages (file name, failed expectations, path relative to the
    run folder), failed files first, at most :data:`DOCS_PAGES_SHOWN`: a site's index lists them with
    scripts from CDNs that an offline browser cannot load, and a result page reads without them."""
    pages: dict[str, list[dict[str, Any]]] = {}
    for name in data_docs(run_dir):
        report = _object(read_json_or_none(run_dir / "data_docs" / name / "validation.json")) or {}
        listed = []
        for member, f in (report.get("files") or {}).items():
            page = Path(str(f.get("docs") or ""))
            try:
                rel = page.relative_to(run_dir).as_posix()
            except ValueError:  # written before result pages were recorded, or in another folder
                continue
            listed.append({"file": member.rsplit("/", 1)[-1], "failed": int(f.get("failed") or 0), "rel": rel})
        if listed:
            pages[name] = sorted(listed, key=lambda p: (-p["failed"], p["file"]))[:DOCS_PAGES_SHOWN]
    return pages


def collect_runs(home: Path, dag_runs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One entry per run: the Airflow run (if known) merged with its folder (if any), newest first.

    A run whose folder ``encoderflow prune`` removed shows what it decided and measured from the
    record prune kept (``pruned/<folder>.json``), with ``pruned_at``; its charts and Data Docs are gone.

    Args:
        home: ENCODERFLOW_HOME.
        dag_runs: Airflow runs of the DAG, newest first, as dicts with ``run_id``, ``state``,
            ``start_date``, ``end_date`` (strings), ``conf``.
    """
    runs: dict[str, dict[str, Any]] = {}
    runs_root = home / "runs"
    for dr in dag_runs or []:
        key = safe_run_id(dr["run_id"])
        owner = layout.recorded_run_id(runs_root / key)
        if key in runs or owner not in (None, dr["run_id"]):
            # Another run id with this folder name (check_params refused it): listed, with no folder of its own.
            key = "\0" + dr["run_id"]
        runs[key] = {**dr, "folder": None}
    # Dot names are not runs (encoderflow prune's .prune/); a folder may go while this reads.
    found = [(_mtime(p), p) for p in runs_root.iterdir() if not p.name.startswith(".")] if runs_root.is_dir() else []
    for mtime, folder in sorted((t, p) for t, p in found if t is not None and p.is_dir())[::-1]:
        entry = runs.setdefault(folder.name, _unknown(mtime))
        entry["folder"] = folder.name
        # A run cleared and finished since its failure shows none; one that failed after it finished
        # (a cleared task) shows that failure beside the summary it had.
        failure = _object(read_json_or_none(folder / "failure.json"))
        summary = _object(read_json_or_none(folder / "summary.json"))
        if failure and summary and failure_outlived(folder):
            failure = None
        gate = _object(read_json_or_none(folder / "gate.json"))
        _fill(entry, summary, gate, failure, folder.name, _object(read_json_or_none(folder / layout.REGISTERED_FILE)))
        if not summary:  # until report writes it (or in a run that failed later), each as its stage recorded it
            for stage, metric in (("pretrain", "mlm_val_accuracy"), ("baseline", "baseline_val_accuracy")):
                recorded = _object(read_json_or_none(folder / stage / "result.json")) or {}
                if finite(recorded.get(metric)) is not None and (entry.get("metrics") or {}).get(metric) is None:
                    entry["metrics"] = {**(entry.get("metrics") or {}), metric: recorded[metric]}
        entry["curves"] = read_curves(folder)
        entry["data_docs"] = data_docs(folder)
        entry["data_docs_pages"] = data_docs_pages(folder)
    pruned_root = home / "pruned"
    records = sorted(pruned_root.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in records if pruned_root.is_dir() else []:
        record = _object(read_json_or_none(path))
        if not record or runs.get(path.stem, {}).get("folder"):
            continue  # unreadable, or a run of that name wrote a folder again since
        entry = runs.setdefault(path.stem, _unknown(finite(record.get("folder_mtime")) or path.stat().st_mtime))
        summary, gate, failure, registered = (
            _object(record.get(k)) for k in ("summary", "gate", "failure", "registered")
        )
        _fill(entry, summary, gate, failure, path.stem, registered)
        entry["resolved"] = _object(record.get("resolved"))
        entry["pruned_at"] = record.get("pruned_at")
        entry["pruned_folder"] = path.stem
    # Airflow's runs first, newest first as given; then folders no Airflow run claims, newest first.
    out = list(runs.values())
    for entry in out:  # a run that stopped before it reported: its trigger's, its resolved config's, its failure's
        resolved = _Resolved(home, entry.get("folder"), entry.pop("resolved", None))
        entry["preset"] = (
            entry.get("preset")
            or (entry.get("conf") or {}).get("preset")
            or resolved.preset()
            or (entry.get("failure") or {}).get("preset")
        )
        # Which registered model the run trains for: one home may hold several (your own data beside SST-2).
        model = (entry.get("registry") or {}).get("registered_model") or resolved.model()
        entry["model"] = model if isinstance(model, str) else None  # a hand-edited file may hold anything
        who = resolved.triggered_by()
        entry["triggered_by"] = who if isinstance(who, str) else None
        # A run no Airflow asked knows, before it wrote a summary or failure: its folder named it, and
        # `encoderflow runs manual__2026-12-07T21:34` (the id as Airflow spells it) found nothing.
        if entry.get("folder") and entry.get("run_id") == entry["folder"] and (rid := resolved.run_id()):
            entry["run_id"] = rid if safe_run_id(rid) == entry["folder"] else entry["run_id"]
        # The overrides the run was triggered with, as check_params resolved them: the preset alone did not
        # tell a returning user which run was the lr=0.002 one.
        entry["settings"] = resolved.settings()
        if not (entry.get("run_after") or entry.get("start_date")):
            # Airflow's record cleaned (airflow db clean) or never made: a manual or scheduled run's id holds its time.
            entry["run_after"] = time_in_run_id(str(entry.get("run_id") or entry.get("folder") or ""))
    return out


def time_in_run_id(run_id: str) -> str | None:
    """The ISO time in an Airflow run id (``manual__2026-12-07T15:20:15.461561+00:00``, or its folder name
    ``manual__2026-12-07T15_20_15.461561_00_00``), or None."""
    found = re.search(r"__(\d{4}-\d\d-\d\d)T(\d\d)[:_](\d\d)[:_](\d\d)", run_id)
    return f"{found[1]}T{found[2]}:{found[3]}:{found[4]}" if found else None


class _Resolved:
    """What ``check_params`` resolved for the run in ``folder`` (``resolved.json``), read when first asked;
    a pruned run's from its record (``kept``)."""

    def __init__(self, home: Path, folder: str | None, kept: dict[str, Any] | None = None):
        self._path = home / "runs" / folder / layout.RESOLVED_FILE if folder else None
        self._read: dict[str, Any] | None = kept

    def _json(self) -> dict[str, Any]:
        if self._read is None:
            self._read = (_object(read_json_or_none(self._path)) if self._path else None) or {}
        return self._read

    def preset(self) -> str | None:
        return self._json().get("preset")

    def model(self) -> str | None:
        gate = _object((_object(self._json().get("config")) or {}).get("gate")) or {}
        return gate.get("registered_model")

    def triggered_by(self) -> str | None:
        return self._json().get("triggered_by")

    def run_id(self) -> str | None:
        """The run's id as Airflow spells it (recorded since 2026-12-07), or None."""
        run_id = self._json().get("run_id")
        return run_id if isinstance(run_id, str) else None

    def settings(self) -> dict[str, Any] | None:
        """The keys the run set (trigger form, ``--set``), as resolved; None when not recorded."""
        return _object(self._json().get("set"))


def _object(value: Any) -> dict[str, Any] | None:
    """A JSON object as read, or None for anything else (a list or string where an object belongs:
    a hand-edited or foreign file must not take the whole record down)."""
    return value if isinstance(value, dict) else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _unknown(mtime: float) -> dict[str, Any]:
    """The entry of a run folder (or pruned record) no Airflow run claims."""
    return {
        "run_id": None,
        "state": None,
        "start_date": None,
        "end_date": None,
        "conf": {},
        "mtime": mtime,
        "folder": None,
    }


def _fill(
    entry: dict[str, Any],
    summary: dict[str, Any] | None,
    gate: dict[str, Any] | None,
    failure: dict[str, Any] | None,
    folder_name: str,
    registered: dict[str, Any] | None = None,
) -> None:
    """``entry``'s decision, metrics and registry from a run's ``summary.json``, ``gate.json``,
    ``failure.json`` and ``registered.json`` (each None when absent), whether read from its folder or a
    pruned record. A run that registered its candidate and then failed (a stale champion) names the
    version from ``registered.json``: its summary, which names it otherwise, was never written."""
    if summary:  # a summary written before a metric's rename reads as today's
        summary["metrics"] = current_names(_object(summary.get("metrics")) or {})
    entry["summary"] = summary
    if not entry.get("run_id"):  # a folder no Airflow asked knows: its files name their run
        entry["run_id"] = (summary or {}).get("run_id") or (failure or {}).get("run_id")
    entry["run_id"] = entry.get("run_id") or folder_name
    if summary and "unchanged" in summary:  # check_lineage short-circuited: nothing trained or gated
        entry["unchanged"] = _object(summary["unchanged"]) or {}
        entry["metrics"] = summary["metrics"]
        entry["registry"] = {}
        entry["preset"] = summary.get("preset")
    elif summary:
        said = _object(summary.get("gate")) or {}
        entry["gate"] = {"blessed": said.get("blessed"), "reasons": _list(said.get("reasons"))}
        entry["metrics"] = summary["metrics"]
        entry["registry"] = _object(summary.get("registry")) or {}
        entry["preset"] = summary.get("preset")
    elif gate:
        entry["gate"] = {"blessed": gate.get("blessed"), "reasons": _list(gate.get("reasons"))}
        entry["metrics"] = {metric: gate.get(name) for name, metric in GATE_METRICS.items()}
    if registered and not summary:
        entry["registry"] = registered
    if gate:
        entry["checks"] = [c for c in _list(gate.get("checks")) if isinstance(c, dict)]
        entry["intervals"] = gate_intervals(gate)
    entry["failure"] = failure if failure and entry.get("state") in ("failed", None) else None
    entry["gate_chart"] = gate_figures(gate, summary)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def finite(value: Any) -> float | None:
    """A finite float, or None (missing, NaN, inf, not a number): JSON and the charts accept only these."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_curves(run_dir: Path) -> dict[str, dict[str, list[float | None]]]:
    """Per-epoch history of each stage that finished: stage -> metric -> one value per epoch.

    The histories are the ``history`` of ``<stage>/result.json`` (Keras's ``History``, or for
    pretraining its ``history.csv``, which survives a resumed attempt). A value that is not a
    finite number becomes None: a gap in the chart, and still valid JSON for ``runs.json``.
    """
    out: dict[str, dict[str, list[float | None]]] = {}
    for stage, _ in STAGES:
        history = (read_json_or_none(run_dir / stage / "result.json") or {}).get("history")
        if not isinstance(history, dict):
            continue
        clean = {
            str(key): [finite(v) for v in values]
            for key, values in history.items()
            if isinstance(values, list) and values
        }
        if clean:
            out[stage] = clean
    return out


INTERVAL_NAMES = ("candidate", "baseline", "champion", "candidate_minus_champion")


def gate_intervals(gate: dict[str, Any] | None) -> dict[str, Any] | None:
    """``gate.json``'s bootstrap intervals, checked: name -> {estimate, low, high} (finite floats), and the
    confidence; None for a gate.json written before the gate had them, or one without a usable interval."""
    raw = (gate or {}).get("intervals")
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {}
    for name in INTERVAL_NAMES:
        item = raw.get(name)
        if not isinstance(item, dict):
            continue
        values = {k: finite(item.get(k)) for k in ("estimate", "low", "high")}
        if None not in values.values():
            out[name] = values
    if not out:
        return None
    return {"confidence": finite(raw.get("confidence")) or 0.95, **out}


def gate_figures(gate: dict[str, Any] | None, summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the gate compared, for its chart: accuracies, the champion's version and the thresholds used.

    ``gate.json`` holds the numbers the decision was made on, each check's threshold and the
    bootstrap intervals (:func:`gate_intervals`); a run whose gate.json is gone still has its
    summary's metrics (without thresholds or intervals).
    """
    if gate:
        checks = [c for c in _list(gate.get("checks")) if isinstance(c, dict)]
        thresholds = {str(c.get("name")): finite(c.get("threshold")) for c in checks}
        figures = {
            "blessed": gate.get("blessed"),
            "candidate": finite(gate.get("candidate")),
            "baseline": finite(gate.get("baseline")),
            "champion": finite(gate.get("champion")),
            "champion_version": gate.get("champion_version"),
            "floor": thresholds.get("floor"),
            "min_gain_over_baseline": thresholds.get("baseline"),
            # The champion check's threshold is the allowed change, -max_regression.
            "min_change_vs_champion": thresholds.get("champion"),
            "intervals": gate_intervals(gate),
        }
    elif summary and "unchanged" not in summary:
        metrics = _object(summary.get("metrics")) or {}
        figures = {
            "blessed": (_object(summary.get("gate")) or {}).get("blessed"),
            **{name: finite(metrics.get(metric)) for name, metric in GATE_METRICS.items()},
            "champion_version": None,
            "floor": None,
            "min_gain_over_baseline": None,
            "min_change_vs_champion": None,
            "intervals": None,
        }
    else:
        return None
    if all(figures[k] is None for k in ("candidate", "baseline", "champion")):
        return None
    return figures


# What ``encoderflow runs`` prints: one name per metric everywhere, so its columns are the metrics' names.
TABLE_METRICS = ("val_accuracy", "baseline_val_accuracy", "mlm_val_accuracy")
DETAIL_METRICS = ("val_accuracy", "baseline_val_accuracy", "champion_val_accuracy", "mlm_val_accuracy")


def mark_aliases(entries: list[dict[str, Any]], aliased: list[Aliased] | None, stores: set[str] | None = None) -> None:
    """Give each entry ``aliases``: the aliases (``champion``, ``previous``) that now point to the
    version its run registered or found; None for every entry when MLflow could not be asked. And
    ``version_deleted``: ``encoderflow prune --versions`` deleted that version.

    A run's version is looked up in the store it recorded when that store was asked (``stores``,
    :func:`aliased_versions`' third answer; each store numbers its versions from 1), else in every
    store asked: a summary from before runs recorded their store, or a home moved since (its
    embedded store's recorded path is gone)."""
    by_version: dict[tuple[str, str, str], set[str]] = {}
    for a in aliased or []:
        by_version.setdefault((a.store.rstrip("/"), a.model, a.version), set()).add(a.alias)
    asked = {u.rstrip("/") for u in stores or ()}
    for entry in entries:
        reg = entry.get("registry") or {}
        model, version = str(reg.get("registered_model") or DEFAULT_MODEL), str(reg.get("version"))
        own = str(reg.get("tracking_uri") or "").rstrip("/")
        if own and own in asked:
            said = by_version.get((own, model, version), set())
        else:
            said = set().union(*(v for (_, m, n), v in by_version.items() if (m, n) == (model, version)))
        # A deleted version's mark is not an alias (a script building models:/NAME@alias from it): its own key.
        entry["aliases"] = None if aliased is None else sorted(said - {DELETED})
        entry["version_deleted"] = DELETED in said


def state_of(entry: dict[str, Any]) -> str:
    """Airflow's state of the run; for a run no Airflow asked knows, what its folder says, starred."""
    if entry.get("state"):
        return str(entry["state"])
    if entry.get("failure"):
        return "failed*"
    return "finished*" if entry.get("summary") else "unknown*"


# Why check_lineage skipped a run's training, for a summary written before it said: the champion's lineage.
CHAMPION_BASIS = (
    "data, code and config hashes equal the champion's; gate.*, baseline.* and the housekeeping settings aside: "
    "they decide promotion or when the host looks, not the model"
)
FORCE_HINT = "set force to train anyway"


def skipped_text(unchanged: Mapping[str, Any]) -> str:
    """A skipped run's one sentence, from its summary's ``unchanged`` (the terminal, ``runs``, the runs page)."""
    message = unchanged.get("message") or "nothing changed since the champion"
    return f"{message} ({unchanged.get('basis') or CHAMPION_BASIS})"


def failed_at(failure: Mapping[str, Any]) -> str | None:
    """Which try of which task a failure record names (``build_shard[3], try 1``), or None: a run stopped
    before its first task, or between tasks, names none."""
    task = failure.get("task_id")
    if not task:
        return None
    return f"{task_label(task, failure.get('map_index'))}, try {failure.get('try_number', '?')}"


def verdict_of(entry: dict[str, Any]) -> str:
    gate = entry.get("gate")
    if gate is not None:
        said = "BLESSED" if gate.get("blessed") else "NOT BLESSED"
        return f"FAILED after {said}" if entry.get("failure") else said
    if entry.get("failure") or entry.get("state") == "failed":  # a killed task may leave no failure.json
        return "FAILED"
    if entry.get("unchanged"):
        return "SKIPPED"
    if entry.get("state") == STOPPED:
        return "STOPPED"
    if entry.get("state") in IN_FLIGHT:
        return "in flight"
    # Nothing on record yet and no Airflow asked: it may be training, or its worker died.
    return "not gated" if entry.get("state") else "unknown"


def version_text(entry: dict[str, Any]) -> str:
    """The version a run registered or found, with the aliases :func:`mark_aliases` gave it."""
    reg = entry.get("registry") or {}
    if not reg.get("version"):
        return "–"
    marks = [*(entry.get("aliases") or []), *(["(deleted by prune)"] if entry.get("version_deleted") else [])]
    return " ".join([f"v{reg['version']}", *marks])


def _when(value: Any) -> str:
    return str(value)[:19].replace("T", " ") if value else "–"


def settings_text(settings: Mapping[str, Any]) -> str:
    """A run's overrides as ``--set`` takes them, or what an empty set means."""
    return " ".join(set_item(k, v) for k, v in sorted(settings.items())) or "nothing (the preset's values)"


def accuracy_text(value: Any) -> str:
    """An accuracy as shown everywhere: four decimals, or a dash when there is none."""
    number = finite(value)
    return "–" if number is None else f"{number:.4f}"


def table_lines(entries: list[dict[str, Any]]) -> list[str]:
    """``entries`` (:func:`collect_runs`' with :func:`mark_aliases`') as an aligned table, one run a line."""
    # Runs of several models (your own data's beside SST-2's) are told apart: their accuracies are of other tasks.
    several = len({e.get("model") for e in entries if e.get("model")}) > 1
    head = [
        "run",
        "state",
        "preset",
        "started (UTC)",
        "gate",
        *TABLE_METRICS,
        *(["model"] if several else []),
        "version",
    ]
    rows = [
        [
            str(e.get("run_id") or e.get("folder")),
            state_of(e),
            str(e.get("preset") or "–"),
            _when(e.get("run_after") or e.get("start_date")),  # a clear resets start_date to the clear's time
            verdict_of(e),
            *(accuracy_text((e.get("metrics") or {}).get(m)) for m in TABLE_METRICS),
            *([str(e.get("model") or "–")] if several else []),
            version_text(e),
        ]
        for e in entries
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    numeric = {head.index(m) for m in TABLE_METRICS}
    return [
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in [head, *rows]
    ]


def detail_lines(entry: dict[str, Any], home: Path) -> list[str]:
    """Everything the record holds about one run, a labelled line (or a few) per subject."""
    out = [f"run        {entry.get('run_id') or entry.get('folder')}"]
    state = state_of(entry)
    times = [f"triggered {_when(entry.get('run_after'))}"] if entry.get("run_after") else []
    if entry.get("triggered_by"):
        times = [f"{times[0] if times else 'triggered'} by {entry['triggered_by']}"]
    # After a clear, Airflow's start_date is the clear's: both times, so a long run does not read as 20 s.
    times += [f"started {_when(entry.get('start_date'))}"] if entry.get("start_date") else []
    if entry.get("end_date"):
        times.append(f"ended {_when(entry['end_date'])}")
    out.append(f"state      {' · '.join([state, *times])}")
    summary = entry.get("summary") or {}
    out.append(
        f"preset     {entry.get('preset') or '–'}"
        + (f" · config_hash {str(summary['config_hash'])[:16]}" if summary.get("config_hash") else "")
        # The registry's config.training_hash, which the model version carries (config_hash has gate.* in it).
        + (f" · training_hash {str(summary['training_hash'])[:16]}" if summary.get("training_hash") else "")
    )
    if (settings := entry.get("settings")) is not None:
        out.append(f"set        {settings_text(settings)}")
    folder = entry.get("folder")
    if entry.get("pruned_at"):
        record = home / "pruned" / f"{entry.get('pruned_folder')}.json"
        out.append(f"folder     pruned {str(entry['pruned_at'])[:10]}; its record: {record}")
    elif folder:
        out.append(f"folder     {home / 'runs' / folder}")
    else:
        out.append("folder     none (the run has not written one)")
    failure = entry.get("failure")
    if failure:
        said = f"{failure.get('error')}: {failure.get('message')}"
        where = failed_at(failure)
        out.append(f"failed     at {where}: {said}" if where else f"failed     {said}")
        out.append(f"           fix: {failure.get('fix')}")
        if log := _log_file(folder, failure):
            out.append(f"           log: {log}")
        elif failure.get("log_url"):
            out.append(f"           log: {failure['log_url']} (Airflow UI)")
    if folder and not entry.get("pruned_at"):
        out += [
            f"{'retried' if i == 0 else '':<10} {line}" for i, line in enumerate(tries_lines(home / "runs" / folder))
        ]
    out += _gate_lines(entry)
    metrics = entry.get("metrics") or {}
    shown = [f"{m} {accuracy_text(metrics[m])}" for m in DETAIL_METRICS if m in metrics]
    out.append(f"metrics    {' · '.join(shown) or '–'}")
    reg = entry.get("registry") or {}
    if reg.get("version") or reg.get("run_id"):
        parts = [f"{reg.get('registered_model') or DEFAULT_MODEL} {version_text(entry)}"]
        if reg.get("registered_by"):
            parts.append(f"registered by {reg['registered_by']}")
        if reg.get("run_id"):
            parts.append(f"MLflow run {reg['run_id']}")
        if reg.get("tracking_uri"):
            parts.append(str(reg["tracking_uri"]))
        out.append(f"registry   {' · '.join(parts)}")
    else:
        out.append("registry   not registered")
    for stage, took in in_stage_order(_object(summary.get("runtime")) or {}):
        if not isinstance(took, dict):
            continue
        if took.get("skipped"):
            out.append(f"{stage:<10} not run: {took['skipped']}")
            continue
        seconds = finite(took.get("seconds"))
        bits = [None if seconds is None else f"{seconds:.1f} s"]
        bits += [took.get("device"), took.get("dtype_policy")]
        if isinstance(step := took.get("resumed_from_step"), int) and step > 0:  # that try's time alone
            bits.append(f"the try that resumed at step {step:,}")
        if took.get("reused_from"):
            bits.append(f"results reused from {took['reused_from']}")
        out.append(f"{stage:<10} {', '.join(str(b) for b in bits if b)}")
    if not entry.get("pruned_at"):
        files = {k: _in_folder(summary, k, home / "runs" / str(folder)) for k in ("bundle", "curves")}
        docs = (entry.get("data_docs") or {}) if folder else {}
        files |= {f"data docs {name}": str(home / "runs" / str(folder) / rel) for name, rel in docs.items()}
        out += [
            f"{'files' if i == 0 else '':<10} {k}: {v}"
            for i, (k, v) in enumerate((k, v) for k, v in files.items() if v and Path(v).exists())
        ]
    return out


def tries_lines(folder: Path) -> list[str]:
    """A line per task tried more than once, saying how each try ended, from the records every try keeps
    (``tries/<task>.json``, :class:`encoderflow.airflow_adapter.TryRecord`): a try killed with its worker
    left a log that just stops, and Airflow shows it only as failed."""
    out = []
    for path in sorted((folder / "tries").glob("*.json")):
        record = _object(read_json_or_none(path))
        if not record or not record.get("earlier"):
            continue
        task, _, index = path.stem.rpartition(".")
        label = task_label(task, int(index)) if task and index.isdigit() else path.stem
        tries = [t for t in [*record["earlier"], record] if isinstance(t, dict)]
        said = [f"try {t.get('try')} {_try_end(t, last=t is tries[-1])}" for t in tries]
        out.append(f"{label}: {'; '.join(said)}")
    return out


def _try_end(record: dict[str, Any], last: bool) -> str:
    ended = record.get("ended")
    if not isinstance(ended, dict):
        # The latest try may still run; an earlier one that never ended was killed.
        return "has not ended" if last else "never ended (its process was killed, or a person marked it failed)"
    if ended.get("as") in ("returned", "success"):
        return "ran to the end"
    return f"failed: {ended.get('error')}: {ended.get('message')}"


def _in_folder(summary: dict[str, Any], name: str, folder: Path) -> str | None:
    """The path of the artifact ``name`` the summary records, inside ``folder`` as it is now (the home
    may have moved since the run wrote its absolute paths)."""
    artifacts = _object(summary.get("artifacts")) or {}
    path, run_dir = artifacts.get(name), artifacts.get("run_dir")
    if not isinstance(path, str) or not isinstance(run_dir, str):
        return None
    with contextlib.suppress(ValueError):
        return str(folder / Path(path).relative_to(run_dir))
    return path


def _gate_lines(entry: dict[str, Any]) -> list[str]:
    gate = entry.get("gate")
    if gate is None and entry.get("unchanged"):
        return [f"gate       SKIPPED: {skipped_text(entry['unchanged'])}; {FORCE_HINT}"]
    if gate is None:
        return [f"gate       {verdict_of(entry)}"]
    out = [f"gate       {'BLESSED' if gate.get('blessed') else 'NOT BLESSED'}"]
    checks = entry.get("checks") or []
    out += [f"           {'PASS' if c.get('passed') else 'FAIL'} {c.get('name')}: {c.get('detail')}" for c in checks]
    if not checks:  # a record from before the checks were kept: the reasons are what is known
        out += [f"           {reason}" for reason in gate.get("reasons") or []]
    if said := intervals_text(entry.get("intervals")):
        out.append(f"           {said}")
    return out


def intervals_text(intervals: dict[str, Any] | None) -> str:
    """The line of a gate's bootstrap intervals (:func:`gate_intervals`): the candidate's accuracy and
    its difference to the champion; "" when it has neither."""
    parts = []
    if ci := (intervals or {}).get("candidate"):
        parts.append(f"candidate {ci['estimate']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]")
    if ci := (intervals or {}).get("candidate_minus_champion"):
        parts.append(f"candidate - champion {ci['estimate']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]")
    if not parts:
        return ""
    return f"{(intervals or {}).get('confidence') or 0.95:.0%} intervals: {' · '.join(parts)}"


def _log_file(folder: str | None, failure: dict[str, Any]) -> Path | None:
    """The failed try's task log file: in the run folder (``encoderflow run``), else where Airflow's
    file task handler wrote it (``make airflow``, ``make stack``); None when neither is here (a
    deployment's remote logging: its ``log_url`` says where)."""
    task, attempt, map_index = failure.get("task_id"), failure.get("try_number"), failure.get("map_index")
    if not isinstance(task, str) or not isinstance(attempt, int):
        return None
    map_index = map_index if isinstance(map_index, int) else -1
    paths = [layout.task_log_path(folder, task, map_index, attempt)] if folder else []
    where = [failure.get(k) for k in ("log_folder", "dag_id", "run_id")]
    if all(isinstance(w, str) and w for w in where):
        paths.append(layout.airflow_log_path(*where, task, map_index, attempt))
    return next((p for p in paths if p.is_file()), None)


def find(entries: list[dict[str, Any]], wanted: str) -> dict[str, Any]:
    """The entry whose run id, folder name or pruned record's name is ``wanted``, else the one whose
    name of those starts with it.

    Raises:
        EncoderflowError: no run, or several, match.
    """
    from encoderflow.errors import EncoderflowError

    def names(e: dict[str, Any]) -> list[str]:
        return [str(n) for n in (e.get("run_id"), e.get("folder"), e.get("pruned_folder")) if n]

    # A run id as Airflow spells it names a folder too (':' and '+' are '_' there), and the start of one.
    forms = {wanted, safe_run_id(wanted)}
    # The run id itself first: two ids one folder name apart (check_params refuses the second) both match its form.
    exact = [e for e in entries if e.get("run_id") == wanted] or [e for e in entries if forms & set(names(e))]
    matches = exact or [e for e in entries if any(n.startswith(w) for n in names(e) for w in forms)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise EncoderflowError(
            f"no run {wanted!r} under ENCODERFLOW_HOME={layout.home()} or in its Airflow",
            fix="encoderflow runs lists them; give a run id, its folder name, or the start of either",
        )
    names = ", ".join(str(e.get("run_id") or e.get("folder")) for e in matches[:5])
    raise EncoderflowError(
        f"{len(matches)} runs start with {wanted!r}: {names}{', ...' if len(matches) > 5 else ''}",
        fix="give more of the run id",
    )


def newest_first(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``entries`` by when each run began, newest first: Airflow's date for a run it knows, else the
    date its run id carries, else the time its folder last changed (a pruned record keeps the
    folder's). :func:`collect_runs` lists the runs the
    Airflows asked know first; a folder none of them knows (a reset DB, an Airflow not asked) may be
    the newest, and a ``--limit`` must not hide it as older."""

    def began(entry: dict[str, Any]) -> float:
        # Airflow's run ids end in their date (manual__<iso>, scheduled__<iso>): a run Airflow has
        # forgotten (airflow db clean) keeps it, where a pruned record's own time is prune's.
        named = str(entry.get("run_id") or "").partition("__")[2]
        for value in (*(entry.get(k) for k in ("run_after", "start_date", "logical_date")), named):
            with contextlib.suppress(TypeError, ValueError):
                return datetime.fromisoformat(str(value)).timestamp()
        return finite(entry.get("mtime")) or 0.0

    return sorted(entries, key=began, reverse=True)


def jsonable(value: Any) -> Any:
    """``value`` with every float that is not finite made None: strict JSON, as ``runs.json`` serves."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
