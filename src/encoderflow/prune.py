"""``encoderflow prune``: what scheduled retraining leaves under ``ENCODERFLOW_HOME``, removed by rule.

Every run keeps a folder (``runs/<run_id>``), and the content-addressed caches (downloads under
``data/``, TFRecord shards under ``shards/``, the files many runs hold alike under ``cache/files``,
the bundles ``predict`` served under ``serving/``) only ever grow. A daily run at the guide preset
adds hundreds of MB. This module decides what goes, by rules a person can read back in its report:

- A run folder goes when Airflow says its run finished (success or failed) or, for a folder no
  Airflow knows, when it holds a ``summary.json`` or ``failure.json``; and it is not among the
  newest ``keep``; and nothing in it changed for ``older_than``; and it did not register the version
  an alias (``champion``, ``previous``) points to: the champion's training logs and Data Docs stay.
- Downloads and shards are shared by every run, and a run in flight may read any of them, so they
  are pruned only when Airflow was asked and no run is in flight: those no kept run used (by a
  kept run's record of them), untouched for ``older_than``; the newest download of each dataset
  stays.
- A ``cache/files`` file goes once no run links to it any more; a ``serving/`` copy once its version
  is no alias's; ``validation/`` sites (``encoderflow validate``) beyond the newest ``keep``.

A removed run folder leaves ``pruned/<folder>.json`` (its summary, gate decision and last failure,
a few KB), so the runs page keeps showing what it decided. The MLflow registry (versions and their
bundles) and Airflow's metadata DB are the record and are never touched here (``airflow db clean``
trims the latter). Removal renames a folder out of sight first, so a reader sees the whole folder
or none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from encoderflow import DAG_ID, layout
from encoderflow.errors import FAILURE_FILE, failure_outlived

log = logging.getLogger(__name__)

FINISHED = ("success", "failed")
IN_FLIGHT = ("queued", "running")
ALIASES = ("champion", "previous")
DAY = 86400.0


@dataclass(frozen=True)
class Item:
    """One folder or file the plan judged: ``why`` says why it goes or stays."""

    kind: str
    path: Path
    why: str
    last_change: float = 0.0


@dataclass
class Plan:
    remove: list[Item] = field(default_factory=list)
    keep: list[Item] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    freed: int = 0


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


def last_change(path: Path) -> float:
    """The newest modification time of ``path`` or anything under it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _airflow_envs(home: Path) -> list[tuple[str, dict[str, str]]]:
    """The Airflows whose runs write into ``home``, each as (label, environment).

    The environment's own Airflow when it names a metadata DB (a deployment's container); else the
    embedded one of ``encoderflow run`` / ``make airflow`` (if its DB exists) and the native stack's
    (``make stack``, if it is up).
    """
    if os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
        return [(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].split("@")[-1], dict(os.environ))]
    from encoderflow.cli import airflow_env

    envs = []
    if (layout.airflow_home() / "airflow.db").exists():
        envs.append((f"embedded ({layout.airflow_home() / 'airflow.db'})", {**os.environ, **airflow_env()}))
    if (home / "stack" / "secrets.json").exists():
        from encoderflow.stack import Stack

        stack = Stack(home)
        if stack.alive("postgres"):
            envs.append(("make stack (PostgreSQL)", stack.env("scheduler")))
    return envs


def ask_airflow(home: Path, dag_id: str = DAG_ID) -> AirflowRuns:
    """The state of every run of ``dag_id`` that the Airflows writing into ``home`` know
    (``airflow dags list-runs``, Airflow's own CLI), by run folder name."""
    envs = _airflow_envs(home)
    if not envs:
        return AirflowRuns(
            {}, True, "Airflow: no metadata DB here (no run of encoderflow run, make airflow or make stack)"
        )
    states: dict[str, str] = {}
    said = []
    for label, env in envs:
        runs = _list_runs(env, dag_id)
        if isinstance(runs, str):
            return AirflowRuns(states, False, f"Airflow {label}: could not list the runs of {dag_id} ({runs})")
        for run in runs:
            states[layout.safe_run_id(run["run_id"])] = run["state"]
        said.append(f"{label}: {len(runs)} runs")
    return AirflowRuns(states, True, "Airflow " + "; ".join(said))


def _list_runs(env: dict[str, str], dag_id: str) -> list[dict[str, Any]] | str:
    """``airflow dags list-runs`` as JSON, or why it could not be had. Airflow writes its own
    warnings to standard output too; the JSON is its one line that starts with ``[``."""
    cmd = [sys.executable, "-m", "airflow", "dags", "list-runs", dag_id, "-o", "json"]
    # Its warnings (graphviz missing, say) would be lines of standard output too.
    proc = subprocess.run(cmd, env={**env, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    if proc.returncode == 0:
        for line in lines:
            if line.startswith("["):
                with contextlib.suppress(ValueError):
                    return json.loads(line)
        if any("No data found" in line for line in lines):
            return []
    said = [line.strip() for line in (proc.stdout + "\n" + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in said if "error" in line.lower()]
    return ((errors or said)[-1] if said else f"exit {proc.returncode}, no output")[:300]


@dataclass(frozen=True)
class Aliased:
    """A version some alias points to, and the Airflow run (folder name) that registered it."""

    model: str
    version: str
    alias: str
    run: str | None

    @property
    def why(self) -> str:
        return f"registered {self.model} v{self.version} ({self.alias})"


def aliased_versions(home: Path) -> tuple[list[Aliased] | None, str]:
    """Every version the ``champion`` or ``previous`` alias of any registered model points to, and a
    line for the report; None when MLflow could not be asked (the caller then keeps more).

    The MLflow asked is the environment's (``MLFLOW_TRACKING_URI``), else the native stack's server
    when ``home`` has one (with the workers' login), else the embedded store.
    """
    from encoderflow import registry

    if not os.environ.get("MLFLOW_TRACKING_URI") and (home / "stack" / "secrets.json").exists():
        from encoderflow.stack import Stack

        stack = Stack(home)
        if not stack.alive("mlflow"):
            return None, "MLflow of make stack: not running, not asked (make stack starts it)"
        env = stack.env("worker-default")
        with _environ({k: env[k] for k in env if k.startswith("MLFLOW_")}):
            return _aliased(registry)
    if registry.no_store():
        return [], "MLflow: no registry here yet"
    return _aliased(registry)


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


def _aliased(registry) -> tuple[list[Aliased] | None, str]:
    try:
        c = registry.client()
        found = []
        for model in c.search_registered_models():
            for alias, version in sorted(model.aliases.items()):
                if alias in ALIASES:
                    run = c.get_model_version(model.name, version).tags.get("airflow.run_id")
                    found.append(Aliased(model.name, str(version), alias, run and layout.safe_run_id(run)))
    except Exception as exc:  # any failure to ask: keep more, never less
        return None, f"MLflow at {registry.tracking_uri()}: not asked ({str(exc).splitlines()[0][:200]})"
    said = ", ".join(f"{a.model} v{a.version} ({a.alias})" for a in found) or "no aliased version"
    return found, f"MLflow at {registry.tracking_uri()}: {said}"


def _registered(folder: Path) -> bool:
    summary = _read(folder / "summary.json") or {}
    return bool((summary.get("registry") or {}).get("version"))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def plan(
    home: Path,
    keep: int,
    older_than_days: float,
    airflow: AirflowRuns,
    aliased: list[Aliased] | None,
    now: float | None = None,
) -> Plan:
    """What ``prune`` removes and keeps under ``home``, and why (nothing is touched here).

    Args:
        home: ENCODERFLOW_HOME.
        keep: run folders (and ``validation/`` sites) kept whatever their age, newest first.
        older_than_days: what changed more recently than this is kept.
        airflow: :func:`ask_airflow`'s answer.
        aliased: :func:`aliased_versions`'s answer (None: MLflow could not be asked).
        now: the time ages are counted from (seconds since the epoch).
    """
    now = time.time() if now is None else now
    cutoff = now - older_than_days * DAY
    out = Plan()
    if airflow.asked:
        out.notes.append(
            airflow.said + (f"; in flight: {', '.join(airflow.in_flight)}" if airflow.in_flight else "; none in flight")
        )
    else:
        out.notes.append(airflow.said + ": run folders are judged by their files; downloads and shards are kept")
    kept_runs = _plan_runs(home, keep, cutoff, airflow, aliased, out)
    idle = airflow.asked and not airflow.in_flight
    if idle:
        _plan_caches(home, kept_runs, cutoff, out)
    else:
        why = "a run is in flight" if airflow.asked else "Airflow could not be asked"
        out.notes.append(f"downloads (data/) and shards (shards/) are kept: {why}")
    _plan_serving(home, aliased, cutoff, out)
    _plan_validation(home, keep, cutoff, out)
    _plan_shared_files(home, out)
    return out


def _plan_runs(
    home: Path,
    keep: int,
    cutoff: float,
    airflow: AirflowRuns,
    aliased: list[Aliased] | None,
    out: Plan,
) -> list[Path]:
    protected = {a.run: a.why for a in aliased or [] if a.run}
    root = home / "runs"
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    changed = {p: last_change(p) for p in folders}
    kept: list[Path] = []
    for rank, folder in enumerate(sorted(folders, key=lambda p: changed[p], reverse=True)):
        state = airflow.states.get(folder.name)
        if state is None and ((folder / "summary.json").exists() or (folder / "failure.json").exists()):
            finished, said = True, "finished (no Airflow knows it)"
        else:
            finished, said = state in FINISHED, f"Airflow: {state or 'unknown, and no summary.json or failure.json'}"
        if rank < keep:
            why = f"one of the newest {keep}"
        elif not finished:
            why = said
        elif folder.name in protected:
            why = protected[folder.name]
        elif aliased is None and _registered(folder):
            why = "registered a version (MLflow could not be asked which ones are aliased)"
        elif changed[folder] > cutoff:
            why = "changed within the age limit"
        else:
            out.remove.append(Item("run", folder, said, changed[folder]))
            continue
        kept.append(folder)
        out.keep.append(Item("run", folder, why, changed[folder]))
    return kept


def _used_by(kept_runs: Iterable[Path]) -> tuple[set[str], set[str]]:
    """The shards manifests (by path, and by sha256) the kept runs record."""
    paths, hashes = set(), set()
    for folder in kept_runs:
        summary = _read(folder / "summary.json") or {}
        if manifest := (summary.get("artifacts") or {}).get("shards_manifest"):
            paths.add(str(Path(manifest).parent.resolve()))
        pretrain = _read(folder / "pretrain" / "result.json") or {}
        if digest := (pretrain.get("config") or {}).get("manifest"):
            hashes.add(digest)
    return paths, hashes


def _plan_caches(home: Path, kept_runs: list[Path], cutoff: float, out: Plan) -> None:
    paths, hashes = _used_by(kept_runs)
    inputs: set[str] = set()
    shards_root = home / "shards"
    for folder in sorted(shards_root.iterdir()) if shards_root.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        manifest = folder / "manifest.json"
        used = str(folder.resolve()) in paths or (manifest.exists() and layout.sha256_file(manifest) in hashes)
        changed = last_change(folder)
        if used or changed > cutoff:
            out.keep.append(Item("shards", folder, "used by a kept run" if used else "changed within the age limit"))
            for _, path, _ in (_read(manifest) or {}).get("inputs", []):
                inputs.add(str(Path(path).resolve()))
        else:
            out.remove.append(Item("shards", folder, "no kept run used them", changed))
    data_root = home / "data"
    for dataset in sorted(data_root.iterdir()) if data_root.is_dir() else []:
        versions = [p for p in dataset.iterdir() if p.is_dir() and not p.name.startswith(".")]
        changed = {p: last_change(p) for p in versions}
        for rank, folder in enumerate(sorted(versions, key=lambda p: changed[p], reverse=True)):
            used = any(path.startswith(str(folder.resolve()) + os.sep) for path in inputs)
            if rank == 0 or used or changed[folder] > cutoff:
                why = (
                    "the newest download of it"
                    if rank == 0
                    else "kept shards were built from it"
                    if used
                    else "changed within the age limit"
                )
                out.keep.append(Item("data", folder, why))
            else:
                out.remove.append(
                    Item("data", folder, "an older download no kept shards were built from", changed[folder])
                )


def _plan_serving(home: Path, aliased: list[Aliased] | None, cutoff: float, out: Plan) -> None:
    root = home / "serving"
    if not root.is_dir():
        return
    if aliased is None:
        out.notes.append("serving/ is kept: MLflow could not be asked which versions are aliased")
        return
    served = {(layout.safe_run_id(a.model), f"v{a.version}") for a in aliased}  # as cli.cmd_predict names them
    for model in sorted(p for p in root.iterdir() if p.is_dir()):
        for folder in sorted(p for p in model.iterdir() if p.is_dir() and not p.name.startswith(".")):
            changed = last_change(folder)
            if (model.name, folder.name) in served or changed > cutoff:
                why = "an aliased version" if (model.name, folder.name) in served else "changed within the age limit"
                out.keep.append(Item("serving", folder, why))
            else:
                out.remove.append(Item("serving", folder, "no alias points to this version", changed))


def _plan_validation(home: Path, keep: int, cutoff: float, out: Plan) -> None:
    root = home / "validation"
    folders = (
        sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
        if root.is_dir()
        else []
    )
    for rank, folder in enumerate(folders):
        changed = last_change(folder)
        if rank < keep or changed > cutoff:
            out.keep.append(
                Item(
                    "validation", folder, f"one of the newest {keep}" if rank < keep else "changed within the age limit"
                )
            )
        else:
            out.remove.append(Item("validation", folder, "an older encoderflow validate site", changed))


class _Links:
    """Hard links counted per inode, to tell which files leave the disk: a file goes with its last link."""

    def __init__(self) -> None:
        self.inodes: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [size, links, links counted]

    def count(self, path: Path) -> None:
        """Count every file under ``path`` (or ``path`` itself) as one link that goes."""
        for file in [path] if not path.is_dir() or path.is_symlink() else _files(path):
            with contextlib.suppress(OSError):
                st = file.lstat()
                self.inodes.setdefault((st.st_dev, st.st_ino), [st.st_size, st.st_nlink, 0])[2] += 1

    def last_link(self, path: Path) -> bool:
        """Whether ``path``'s other links are all counted already."""
        st = path.lstat()
        size, nlink, counted = self.inodes.get((st.st_dev, st.st_ino), [st.st_size, st.st_nlink, 0])
        return counted + 1 >= nlink

    @property
    def freed(self) -> int:
        return sum(size for size, nlink, counted in self.inodes.values() if counted >= nlink)


def _plan_shared_files(home: Path, out: Plan) -> None:
    """``cache/files`` entries whose every other link is in a folder that goes (or that have none),
    and the bytes all removals free."""
    links = _Links()
    for item in out.remove:
        links.count(item.path)
    store = home / "cache" / "files"
    for path in sorted(store.iterdir()) if store.is_dir() else []:
        if links.last_link(path):
            out.remove.append(Item("shared file", path, "no run holds it any more", path.lstat().st_mtime))
            links.count(path)
    out.freed = links.freed


def _files(path: Path) -> Iterator[Path]:
    for root, _, files in os.walk(path):
        for name in files:
            yield Path(root) / name


def apply(home: Path, plan_: Plan) -> Plan:
    """Remove what ``plan_`` says goes; returns the plan as carried out (``remove`` and ``freed``:
    what was removed). A folder is renamed out of its parent first (readers see all of it or none),
    then deleted; one a writer holds (:func:`encoderflow.layout.writing_in`) is left for the next
    prune. A ``cache/files`` entry is deleted only if it is still its file's last link then (a run
    may have linked to it since the plan)."""
    done = Plan(keep=plan_.keep, notes=plan_.notes)
    links = _Links()
    # A prune killed midway leaves its trash folder: the next one sweeps it (layout.temp_dir).
    with layout.temp_dir(home, ".prune-") as trash:
        for item in plan_.remove:
            path = item.path
            if not (path.exists() or path.is_symlink()):
                continue
            if path.is_dir() and not path.is_symlink():
                with layout.idle(path) as idle:
                    if not idle:
                        done.notes.append(f"{path} is being written: left for the next prune")
                        continue
                    links.count(path)
                    if item.kind == "run":
                        keep_record(home, path)
                    os.replace(path, trash / f"{len(done.remove)}-{path.name}")
                # Now, not with the trash folder: a shared file's links must be gone when it is judged.
                shutil.rmtree(trash / f"{len(done.remove)}-{path.name}")
            else:
                if item.kind == "shared file" and path.lstat().st_nlink > 1:
                    continue
                links.count(path)
                path.unlink()
            done.remove.append(item)
    done.freed = links.freed
    return done


def keep_record(home: Path, folder: Path) -> Path:
    """Keep what the runs page shows of a run whose folder goes, in ``pruned/<folder>.json``: its
    ``summary.json``, ``gate.json`` and the failure it ended on (a few KB), with the time."""
    summary, failure = _read(folder / "summary.json"), _read(folder / FAILURE_FILE)
    if failure and summary and failure_outlived(folder):  # a cleared task failed, then the run finished
        failure = None
    record = {
        "folder": folder.name,
        "pruned_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "summary": summary,
        "gate": _read(folder / "gate.json"),
        "failure": failure,
    }
    return layout.write_json(home / "pruned" / f"{folder.name}.json", record)


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def report_lines(home: Path, plan_: Plan, dry_run: bool, notes: Iterable[str] = ()) -> list[str]:
    verb = "would remove" if dry_run else "removed"
    lines = [f"prune {home}:"] + [f"  {note}" for note in [*plan_.notes, *notes]]
    for item in sorted(plan_.keep, key=lambda i: (i.kind, str(i.path))):
        if item.kind == "run":
            lines.append(f"  keep          run     {item.path.relative_to(home)}: {item.why}")
    for item in plan_.remove:
        if item.kind != "shared file":
            lines.append(f"  {verb:<13} {item.kind:<7} {item.path.relative_to(home)}: {item.why}")
    shared = sum(1 for item in plan_.remove if item.kind == "shared file")
    if shared:
        lines.append(f"  {verb:<13} {shared} file(s) in cache/files no run holds any more")
    gone = len(plan_.remove)
    lines.append(
        f"{'would free' if dry_run else 'freed'} {human(plan_.freed)} ({gone} item(s)); kept "
        f"{sum(1 for i in plan_.keep if i.kind == 'run')} run folder(s). Not touched: the MLflow registry "
        "(versions and their bundles) and Airflow's metadata DB (airflow db clean trims it)."
    )
    return lines
