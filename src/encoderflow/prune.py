"""``encoderflow prune``: what scheduled retraining leaves under ``ENCODERFLOW_HOME``, removed by rule.

Every run keeps a folder (``runs/<run_id>``), and the content-addressed caches (downloads under
``data/``, TFRecord shards under ``shards/``, the files many runs hold alike under ``cache/files``,
the bundles ``predict`` served under ``serving/``) only ever grow. A daily run at the guide preset
adds hundreds of MB. This module decides what goes, by rules a person can read back in its report:

- Nothing under ``runs/``, ``data/`` or ``shards/`` goes while a run is in flight (it may reuse an
  older run's results or resume its backup, and read any download or shard set), nor when no
  Airflow could be asked. What goes is hidden first, Airflow is asked again, and everything is put
  back unless the answer is the same.
- A run folder goes when Airflow says its run finished (success or failed) or, for a folder no
  Airflow knows, when its ``summary.json`` says it finished; and it is not among the newest
  ``keep``; and nothing in it changed for ``older_than``; and it did not register the version an
  alias (``champion``, ``previous``) points to (the champion's training logs and Data Docs stay;
  with an MLflow that cannot be asked, every folder stays); and it holds no pretraining backup the
  next run of that training would resume.
- Downloads and shard sets go when no kept run used them (by a kept run's record of them),
  untouched for ``older_than``; the newest download of each dataset stays, and every shard set
  stays while a kept run that began pretraining before runs recorded their shard set names none.
- A ``cache/files`` file goes once no run links to it any more; a ``serving/`` copy once its version
  is no alias's; ``validation/`` sites (``encoderflow validate``) beyond the newest ``keep``.

A removed run folder leaves ``pruned/<folder>.json`` (its summary, gate decision and last failure,
a few KB), so the runs page keeps showing what it decided. Airflow's metadata DB is never touched
here (``airflow db clean`` trims it), nor the MLflow registry unless asked (``--versions``,
:func:`plan_versions`): then the versions the gate rejected that were never champion go, beyond the
newest ``keep`` and ``older_than``, each leaving its record on the registered model
(``registry.delete_version``), and the kept versions' identical files are stored once. Removal moves
a folder into ``.prune/`` beside it first, so a reader sees the whole folder or none.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from encoderflow import layout
from encoderflow.data.folders import COMPLETE
from encoderflow.errors import FAILURE_FILE, failure_outlived
from encoderflow.runs import FINISHED, STOPPED, AirflowRuns, Aliased
from encoderflow.steps import SHARDS_RECORD
from encoderflow.train.pretrain import BACKUP_CODE, BACKUP_KEY

log = logging.getLogger(__name__)

DAY = 86400.0


@dataclass(frozen=True)
class Item:
    """One folder or file the plan judged: ``why`` says why it goes or stays."""

    kind: str
    path: Path
    why: str


@dataclass(frozen=True)
class VersionItem(Item):
    """A registered version judged (``kind`` "version"): ``files`` is its MLflow run's artifact folder,
    which goes with it (None: not known on this machine, or another version's too), ``size`` the space
    they take on their own."""

    model: str = ""
    version: str = ""
    files: Path | None = None
    size: int = 0
    run: str = ""  # the Airflow run that registered it: its run folder holds the bundle too


@dataclass
class Plan:
    remove: list[Item] = field(default_factory=list)
    keep: list[Item] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    freed: int = 0
    # Airflow's answer the plan was made on: a second answer that differs stops the removal.
    airflow_states: dict[str, str] | None = None
    # When it was made: a version whose model a run found in it after this stays (registry.delete_version).
    made_at: float = field(default_factory=time.time)
    # Bytes no longer stored twice once kept versions' identical files were linked (apply, with versions).
    shared: int = 0
    # Whether registered versions were judged (prune --versions).
    versions: bool = False


def last_change(path: Path) -> float:
    """The newest modification time of ``path`` or anything under it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


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
    out = Plan(airflow_states=dict(airflow.states))
    # A deleted version's record protects nothing: only what an alias points to does.
    aliased = None if aliased is None else [a for a in aliased if a.aliased]
    if not airflow.asked:
        out.notes.append(f"{airflow.said}; so runs/, data/ and shards/ are kept")
    elif airflow.in_flight:
        out.notes.append(
            f"{airflow.said}; in flight: {', '.join(airflow.in_flight)}; so runs/, data/ and shards/ are kept"
        )
    else:
        out.notes.append(f"{airflow.said}; none in flight")
        _plan_caches(home, _plan_runs(home, keep, cutoff, airflow, aliased, out), cutoff, out)
    _plan_serving(home, aliased, cutoff, out)
    _plan_validation(home, keep, cutoff, out)
    _plan_shared_files(home, out)
    return out


def plan_versions(
    home: Path,
    plan_: Plan,
    keep: int,
    older_than_days: float,
    airflow: AirflowRuns,
    registered: dict | None,
    now: float | None = None,
) -> Plan:
    """Add to ``plan_`` the registered versions ``prune --versions`` deletes and keeps, and why; the
    bytes it frees then count their files too (a file goes with its last link: one a kept version or
    run folder holds as well stays).

    A version goes when the gate rejected it (its ``gate.blessed`` tag is ``false``: the newest
    decision on its model), it was never champion (no champion move on record to or from it, no move
    or demotion tag of its own), no alias points to it, no kept version's training began from it
    (``lineage.parent``, ``lineage.finetune_parent``), it is not among the newest ``keep`` versions of
    its model, and it was registered more than ``older_than_days`` ago. Nothing goes while a run is in
    flight or no Airflow could be asked: a run may find its model in any version and register none
    of its own (``registry.version``). The files of versions a killed prune deleted go too.

    Args:
        home: ENCODERFLOW_HOME.
        plan_: :func:`plan`'s answer, extended in place and returned.
        keep: versions of each model kept whatever they are, newest first.
        older_than_days: versions registered more recently than this are kept.
        airflow: :func:`ask_airflow`'s answer.
        registered: ``registry.versions_for_prune()``'s answer (None: MLflow could not be asked).
        now: the time ages are counted from (seconds since the epoch).
    """
    now = time.time() if now is None else now
    cutoff = now - older_than_days * DAY
    plan_.versions = True
    if registered is None:
        plan_.notes.append("registered versions are kept: MLflow could not be asked")
        return plan_
    for left in registered["leftovers"]:
        plan_.remove.append(Item("version files", left["files"], "files of a version an interrupted prune deleted"))
    versions = registered["versions"]
    held_back = None
    if not airflow.asked:
        held_back = "no Airflow could be asked"
    elif airflow.in_flight:
        held_back = f"in flight: {', '.join(airflow.in_flight)}"
    if held_back:
        plan_.notes.append(f"registered versions are kept: {held_back} (a run may find its model in any version)")
    parents: set[tuple[str, str]] = set()  # the versions a kept one began from: older, so judged after it
    ranked: dict[str, int] = {}
    for v in sorted(versions, key=lambda v: (v["model"], -int(v["version"]))):
        rank = ranked[v["model"]] = ranked.get(v["model"], -1) + 1
        tags = v["tags"]
        # Another version registered from the same MLflow run holds the same files: they stay with it.
        files = v["files"] if not v["shares_run"] else None
        blessed = tags.get("gate.blessed")
        if held_back:
            why = held_back
        elif rank < keep:
            why = f"one of the newest {keep} of {v['model']}"
        elif v["aliases"]:
            why = f"the {', '.join(v['aliases'])} version"
        elif v["champion"]:
            why = v["champion"]
        elif blessed != "false":
            why = "the gate blessed it" if blessed == "true" else "no gate decision on record"
        elif v["created"] > cutoff:
            why = "registered within the age limit"
        elif (v["model"], v["version"]) in parents:
            why = "a kept version's training began from it"
        else:
            reasons = tags.get("gate.reasons") or "no reason recorded"
            why = f"rejected by the gate ({reasons if len(reasons) <= 100 else reasons[:97] + '...'}), never champion"
            size = _frees_alone(_run_folder_of(files)) if files is not None and files.exists() else 0
            plan_.remove.append(VersionItem("version", files or home, why, v["model"], v["version"], files, size))
            continue
        run = tags.get("airflow.run_id") or ""
        parents |= {
            (v["model"], str(tags[t]).removeprefix("v"))
            for t in ("lineage.parent", "lineage.finetune_parent")
            if tags.get(t)
        }
        kept = VersionItem("version", v["files"] or home, why, v["model"], v["version"], v["files"], run=run)
        plan_.keep.append(kept)  # its files, if any, are stored once with identical ones (apply)
    _plan_shared_files(home, plan_)
    return plan_


def _frees_alone(path: Path) -> int:
    """The space removing ``path`` would free by itself, as ``du`` counts it: its folders, and each file
    no kept run folder or version links to as well."""
    links = _Links()
    links.count(path)
    return links.freed


def _plan_runs(
    home: Path,
    keep: int,
    cutoff: float,
    airflow: AirflowRuns,
    aliased: list[Aliased] | None,
    out: Plan,
) -> list[Path]:
    """Judge each run folder (Airflow was asked and no run is in flight); returns the kept ones."""
    protected = {a.run: a.why for a in aliased or [] if a.run}
    root = home / "runs"
    # The encoder an aliased version's pretraining began from (pretrain.init_from=<path>): the config that
    # made it points there, and each run of that config failed once prune had removed it.
    for a in aliased or []:
        if a.parent and (inside := Path(a.parent).resolve()).is_relative_to(root.resolve()) and inside != root:
            folder = inside.relative_to(root.resolve()).parts[0]
            protected.setdefault(folder, f"holds {a.parent}, which {a.model} v{a.version} ({a.alias}) began from")
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    changed = {p: last_change(p) for p in folders}
    finished_keys = {
        result.get("key")
        for result in (layout.read_json_or_none(f / "pretrain" / "result.json") for f in folders)
        if result
    }
    code = layout.code_hash()
    kept: list[Path] = []
    for rank, folder in enumerate(sorted(folders, key=lambda p: changed[p], reverse=True)):
        state = airflow.states.get(folder.name)
        if state is None:  # no Airflow knows it: its summary, written last, says it finished
            finished, said = _reported(folder), "no Airflow knows it; its summary.json says it finished"
        else:
            finished, said = state in FINISHED, f"Airflow: {state}"
            if state == STOPPED:
                said = "Airflow: running, but its encoderflow run process is gone (stopped)"
        if rank < keep:
            why = f"one of the newest {keep}"
        elif not finished:
            why = said if state else "no Airflow knows it, and it has no summary.json"
        elif folder.name in protected:
            why = protected[folder.name]
        elif aliased is None:  # a run may have registered the champion and failed before its summary
            why = "MLflow could not be asked which run registered the champion"
        elif changed[folder] > cutoff:
            why = "changed within the age limit"
        elif (backup := _resumable(folder, code)) and backup not in finished_keys:
            why = "holds the backup of a pretraining no run has finished since (the next run of it resumes it)"
        else:
            out.remove.append(Item("run", folder, said))
            continue
        kept.append(folder)
        out.keep.append(Item("run", folder, why))
    return kept


def _resumable(folder: Path, code: str) -> str | None:
    """The key of the pretraining whose backup in ``folder`` the next run of that key would resume
    (``pretrain._adopt_backup``'s test: no result, this code, a sound backup), or None."""
    backups = folder / "pretrain" / "backup"
    if (folder / "pretrain" / "result.json").exists() or _read_text(backups / BACKUP_CODE) != code:
        return None
    # Here only: the backup checks live beside the Keras callback that writes backups (Keras loads).
    from encoderflow.train.callbacks import backup_problem, latest_backup

    _, newest = latest_backup(backups)
    return _read_text(backups / BACKUP_KEY) if newest is not None and backup_problem(newest) is None else None


def _reported(folder: Path) -> bool:
    """Whether ``folder``'s run finished by its files: a summary, and no failure since it."""
    return (folder / "summary.json").exists() and (not (folder / FAILURE_FILE).exists() or failure_outlived(folder))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _used_by(kept_runs: Iterable[Path]) -> tuple[set[str], set[str], list[str]]:
    """The shards manifests (by path, and by sha256) the kept runs record, and the kept runs that
    began pretraining but record none (folders from before ``pretrain/shards.json``: clearing their
    ``pretrain`` reads a shard set they do not name)."""
    paths, hashes, unrecorded = set(), set(), []
    for folder in kept_runs:
        summary = layout.read_json_or_none(folder / "summary.json") or {}
        manifest = (summary.get("artifacts") or {}).get("shards_manifest")
        if manifest:
            paths.add(str(Path(manifest).parent.resolve()))
        digest = ((layout.read_json_or_none(folder / "pretrain" / "result.json") or {}).get("config") or {}).get(
            "manifest"
        )
        if digest:
            hashes.add(digest)
        if recorded := (layout.read_json_or_none(folder / "pretrain" / SHARDS_RECORD) or {}).get("manifest"):
            paths.add(str(Path(recorded).parent.resolve()))
            manifest = manifest or recorded
        if not manifest and not digest and (folder / "pretrain").is_dir():
            unrecorded.append(folder.name)
    return paths, hashes, unrecorded


def _plan_caches(home: Path, kept_runs: list[Path], cutoff: float, out: Plan) -> None:
    paths, hashes, unrecorded = _used_by(kept_runs)
    inputs: set[str] = set()
    shards_root = home / "shards"
    for folder in sorted(shards_root.iterdir()) if shards_root.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        manifest = folder / "manifest.json"
        used = str(folder.resolve()) in paths or (manifest.exists() and layout.sha256_file(manifest) in hashes)
        if unrecorded and not used:
            used, why = True, f"kept run {unrecorded[0]} began pretraining and records no shards"
        else:
            why = "used by a kept run"
        changed = last_change(folder)
        if used or changed > cutoff:
            out.keep.append(Item("shards", folder, why if used else "changed within the age limit"))
            for _, path, _ in (layout.read_json_or_none(manifest) or {}).get("inputs", []):
                inputs.add(str(Path(path).resolve()))
        else:
            out.remove.append(Item("shards", folder, "no kept run used them"))
    data_root = home / "data"
    for dataset in sorted(data_root.iterdir()) if data_root.is_dir() else []:
        # Only a finished extraction of a pinned archive or copy of your own data (their markers); a
        # trained vocabulary, a bare file download (the 230 KB vocabulary) and one in progress stay.
        versions = [
            p
            for p in dataset.iterdir()
            if not p.name.startswith(".") and any((p / sub / COMPLETE).is_file() for sub in ("files", "extracted"))
        ]
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
                out.remove.append(Item("data", folder, "an older download no kept shards were built from"))


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
                out.remove.append(Item("serving", folder, "no alias points to this version"))


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
            out.remove.append(Item("validation", folder, "an older encoderflow validate site"))


def _allocated(st: os.stat_result) -> int:
    """The disk space behind one inode, as ``du`` counts it: its allocated blocks (512 bytes each on
    Linux), not its size. A 100-byte file takes a 4 KiB block: counted by size, a prune of Data Docs and
    logs said 38.7 MB freed where ``du`` saw 41.8 MiB go."""
    return st.st_blocks * 512


class _Links:
    """Hard links counted per inode, to tell which files leave the disk (a file goes with its last
    link), and the space they free as ``du`` counts it (:func:`_allocated`), their folders' included."""

    def __init__(self) -> None:
        self.inodes: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [allocated, links, links counted]
        self.folders = 0  # a folder has no second link: it goes whole with what holds it

    def count(self, path: Path) -> None:
        """Count every file under ``path`` (or ``path`` itself) as one link that goes, and every folder."""
        if not path.is_dir() or path.is_symlink():
            self._link(path)
            return
        for root, _, files in os.walk(path):
            with contextlib.suppress(OSError):
                self.folders += _allocated(os.lstat(root))
            for name in files:
                self._link(Path(root) / name)

    def _link(self, file: Path) -> None:
        with contextlib.suppress(OSError):
            st = file.lstat()
            self.inodes.setdefault((st.st_dev, st.st_ino), [_allocated(st), st.st_nlink, 0])[2] += 1

    def last_link(self, path: Path) -> bool:
        """Whether ``path``'s other links are all counted already."""
        st = path.lstat()
        _, nlink, counted = self.inodes.get((st.st_dev, st.st_ino), [0, st.st_nlink, 0])
        return counted + 1 >= nlink

    def merge(self, other: _Links) -> None:
        for inode, (size, nlink, counted) in other.inodes.items():
            self.inodes.setdefault(inode, [size, nlink, 0])[2] += counted
        self.folders += other.folders

    @property
    def freed(self) -> int:
        return self.folders + sum(size for size, nlink, counted in self.inodes.values() if counted >= nlink)


def _on_disk(item: Item) -> Path | None:
    """What of ``item`` leaves the disk: a version's MLflow run folder (or nothing), else its path."""
    if not isinstance(item, VersionItem):
        return item.path
    return _run_folder_of(item.files) if item.files is not None and item.files.exists() else None


def _plan_shared_files(home: Path, out: Plan) -> None:
    """``cache/files`` entries whose every other link is in a folder that goes (or that have none),
    and the bytes all removals free."""
    out.remove = [item for item in out.remove if item.kind != "shared file"]  # judged again: versions came
    links = _Links()
    for item in out.remove:
        if (path := _on_disk(item)) is not None:
            links.count(path)
    store = home / "cache" / "files"
    for path in sorted(store.iterdir()) if store.is_dir() else []:
        if links.last_link(path):
            out.remove.append(Item("shared file", path, "no run holds it any more"))
            links.count(path)
    out.freed = links.freed


# What a run in flight may read: nothing here goes unless Airflow, asked again, says the same.
SHARED_BY_RUNS = ("run", "shards", "data")
# Beside each removed folder, one level down: no ``runs/*/...`` glob of a run (or of the runs page)
# sees what is in it.
HIDDEN = ".prune"


def apply(home: Path, plan_: Plan, recheck: Callable[[], AirflowRuns] | None = None) -> Plan:
    """Remove what ``plan_`` says goes; returns the plan as carried out (``remove``, ``freed``, and
    a note for each thing left).

    Each folder is first moved into ``.prune/`` beside it (readers see all of it or none). Then
    ``recheck`` asks Airflow again: unless its answer equals the plan's (no run started, ended or
    changed state since), the run folders, downloads and shards are put back, and so is everything
    hidden when the block is interrupted (Ctrl-C, an error). Only then is anything deleted. A
    ``cache/files`` entry is deleted only if it is still its file's last link (a run may have linked
    to it since the plan). An item that cannot be removed (permissions, say) is a note.

    Args:
        home: ENCODERFLOW_HOME.
        plan_: :func:`plan`'s answer.
        recheck: asks Airflow again (:func:`ask_airflow`); None: no second asking.
    """
    done = Plan(
        keep=list(plan_.keep),
        notes=list(plan_.notes),
        airflow_states=plan_.airflow_states,
        made_at=plan_.made_at,
        versions=plan_.versions,
    )
    registered = [i for i in plan_.remove if i.kind in VERSION_KINDS]
    hidden: list[tuple[Item, Path]] = []
    try:
        for item in (
            i for i in plan_.remove if i.kind not in VERSION_KINDS and i.path.is_dir() and not i.path.is_symlink()
        ):
            try:
                away = item.path.parent / HIDDEN / item.path.name
                away.parent.mkdir(exist_ok=True)
                if item.kind == "run":
                    keep_record(home, item.path)
                os.replace(item.path, away)
                hidden.append((item, away))
            except OSError as exc:
                done.notes.append(f"{item.path}: not removed ({exc})")
        if recheck is not None and (registered or any(item.kind in SHARED_BY_RUNS for item, _ in hidden)):
            now = recheck()
            if not now.asked or now.states != plan_.airflow_states:
                done.notes.append(
                    f"{now.said}: runs started or changed since the plan, so runs/, data/ and shards/ were put back"
                    + (" and no registered version was deleted" if registered else "")
                )
                for item, away in [h for h in hidden if h[0].kind in SHARED_BY_RUNS]:
                    _put_back(item.path, away)
                    done.keep.append(Item(item.kind, item.path, "put back: runs started or changed since the plan"))
                hidden = [h for h in hidden if h[0].kind not in SHARED_BY_RUNS]
                done.keep += [i for i in registered if i.kind == "version"]
                registered = []
    except BaseException:
        for item, away in hidden:
            _put_back(item.path, away)
        raise
    links = _Links()
    for item, away in hidden:
        if _delete(away, links):
            done.remove.append(item)
            with contextlib.suppress(OSError):
                away.parent.rmdir()  # the hidden folder, once empty
        else:
            done.notes.append(f"{item.path}: not wholly removed; what is left is in {away}")
    for item in registered:
        files = _on_disk(item)
        if isinstance(item, VersionItem):
            from encoderflow import registry

            answer = registry.delete_version(item.model, item.version, item.why, plan_.made_at, item.size)
            if not answer["deleted"]:
                done.keep.append(replace(item, why=answer["why"]))
                continue
            files = answer["files"]
        if files is not None and files.exists() and not _delete(_run_folder_of(files), links):
            done.notes.append(f"{files}: not wholly removed")
        done.remove.append(item)
    for item in (
        i for i in plan_.remove if i.kind not in VERSION_KINDS and (not i.path.is_dir() or i.path.is_symlink())
    ):
        try:
            if item.kind == "shared file" and item.path.lstat().st_nlink > 1:
                continue
            links.count(item.path)
            item.path.unlink()
            done.remove.append(item)
        except FileNotFoundError:
            continue
        except OSError as exc:
            done.notes.append(f"{item.path}: not removed ({exc})")
    done.freed = links.freed
    done.shared = _share_kept(home, [i for i in done.keep if isinstance(i, VersionItem)])
    return done


# What apply removes through MLflow (a version) or as a deleted MLflow run's leftover files, never hidden
# in .prune/ first: no run reads them.
VERSION_KINDS = ("version", "version files")


def _delete(path: Path, links: _Links) -> bool:
    """Remove the folder ``path``; its space counts in ``links`` once it is all gone. Whether it is."""
    mine = _Links()
    mine.count(path)
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        return False
    links.merge(mine)
    return True


def _run_folder_of(files: Path) -> Path:
    """An MLflow run's artifact folder (``<run id>/artifacts`` in a local store), or the run's folder
    around it when it holds nothing else: a deleted run leaves no empty folder behind."""
    if files.name == "artifacts" and [p.name for p in files.parent.iterdir()] == ["artifacts"]:
        return files.parent
    return files


def _share_kept(home: Path, kept: list[VersionItem]) -> int:
    """Store each identical file of the kept versions' bundles once (``registry.store_once``): versions
    registered before registration did so each hold a copy. Returns the space freed, as ``du`` counts it."""
    from encoderflow import registry

    bundles = [item.files / "bundle" for item in kept if item.files is not None and (item.files / "bundle").is_dir()]
    before = {
        path: path.lstat()
        for folder in bundles
        for path in folder.iterdir()
        if path.is_file() and not path.is_symlink()
    }
    for logged in bundles:
        try:
            registry.store_once(logged)
        except OSError as exc:  # a file that cannot be replaced: the copies stay
            log.warning("prune: the files of %s stay as they are (%s)", logged, exc)
    freed = _Links()
    for path, st in before.items():
        with contextlib.suppress(OSError):
            if path.lstat().st_ino != st.st_ino:  # now a link to the one kept: its old inode lost a link
                freed.inodes.setdefault((st.st_dev, st.st_ino), [_allocated(st), st.st_nlink, 0])[2] += 1
    return freed.freed


def _put_back(path: Path, away: Path) -> None:
    """Move ``away`` back to ``path``. Where a run wrote ``path`` anew meanwhile (a cleared task of
    that run), its files are newer and stay; every other file of ``away`` goes back beside them."""
    try:
        os.rename(away, path)
    except OSError:
        for root, _, files in os.walk(away):
            for name in files:
                dst = path / Path(root).relative_to(away) / name
                if not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(Path(root) / name, dst)
        shutil.rmtree(away, ignore_errors=True)
    if path.parent.name == "runs":  # back in place: the runs page reads it, not the record
        (path.parents[1] / "pruned" / f"{path.name}.json").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        away.parent.rmdir()


def restore_hidden(home: Path) -> list[Path]:
    """Put back what a prune killed between hiding and deleting left in ``.prune/`` folders (its
    second asking of Airflow never came): the next plan judges it again. Returns what was put back."""
    parents = [home / "runs", home / "shards", home / "validation"]
    parents += [d for root in ("data", "serving") if (home / root).is_dir() for d in (home / root).iterdir()]
    restored = []
    for parent in parents:
        for away in sorted((parent / HIDDEN).glob("*")) if (parent / HIDDEN).is_dir() else []:
            _put_back(parent / away.name, away)
            restored.append(parent / away.name)
    return restored


def keep_record(home: Path, folder: Path) -> Path:
    """Keep what the runs page shows of a run whose folder goes, in ``pruned/<folder>.json``: its
    ``summary.json``, ``gate.json``, ``registered.json`` and the failure it ended on (a few KB), with the time. A run
    pruned again (a task of it was cleared since) keeps what its earlier record had and it lacks."""
    summary, failure = (
        layout.read_json_or_none(folder / "summary.json"),
        layout.read_json_or_none(folder / FAILURE_FILE),
    )
    if failure and summary and failure_outlived(folder):  # a cleared task failed, then the run finished
        failure = None
    path = home / "pruned" / f"{folder.name}.json"
    earlier = layout.read_json_or_none(path) or {}
    record = {
        "folder": folder.name,
        "pruned_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # Where the run sorts among the others (encoderflow runs: newest first); the record's own time is prune's.
        "folder_mtime": folder.stat().st_mtime,
        "summary": summary or earlier.get("summary"),
        "gate": layout.read_json_or_none(folder / "gate.json") or earlier.get("gate"),
        "failure": failure,
        "registered": layout.read_json_or_none(folder / layout.REGISTERED_FILE) or earlier.get("registered"),
        # What the run was triggered with and by whom: `encoderflow runs` reads them for a pruned run too.
        "resolved": layout.read_json_or_none(folder / layout.RESOLVED_FILE) or earlier.get("resolved"),
    }
    return layout.write_json(path, record)


@contextlib.contextmanager
def only_prune(home: Path) -> Iterator[bool]:
    """Hold ``home``'s prune lock for the block: yields False when another prune holds it (one prune
    would delete what the other hid, or put back)."""
    lock = home / ".prune.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def report_lines(home: Path, plan_: Plan, dry_run: bool, notes: Iterable[str] = ()) -> list[str]:
    verb = "would remove" if dry_run else "removed"
    lines = [f"prune {home}:"] + [f"  {note}" for note in [*plan_.notes, *notes]]
    for item in sorted(plan_.keep, key=lambda i: (i.kind, str(i.path))):
        if item.kind == "run":
            lines.append(f"  keep          run     {item.path.relative_to(home)}: {item.why}")
    for item in sorted((i for i in plan_.keep if isinstance(i, VersionItem)), key=_version_order):
        lines.append(f"  keep          version {item.model} v{item.version}: {item.why}")
    for item in plan_.remove:
        if isinstance(item, VersionItem):
            held = f" (frees {layout.human_size(item.size)} alone)" if item.size else ""
            lines.append(f"  {verb:<13} version {item.model} v{item.version}: {item.why}{held}")
        elif item.kind != "shared file":
            lines.append(f"  {verb:<13} {item.kind:<7} {_shown(item.path, home)}: {item.why}")
    shared = sum(1 for item in plan_.remove if item.kind == "shared file")
    if shared:
        lines.append(f"  {verb:<13} {shared} file(s) in cache/files no run or version holds any more")
    if plan_.shared:
        lines.append(f"  stored the kept versions' identical files once: {layout.human_size(plan_.shared)} freed")
    runs = home / "runs"
    left = sum(1 for f in runs.iterdir() if f.is_dir() and not f.name.startswith(".")) if runs.is_dir() else 0
    if dry_run:
        left -= sum(1 for item in plan_.remove if item.kind == "run")
    untouched = (
        "Not touched: Airflow's metadata DB (airflow db clean trims it); a deleted version's MLflow run is marked "
        "deleted, its few KB of rows left for mlflow gc."
        if plan_.versions
        else "Not touched: the MLflow registry (versions and their bundles; --versions deletes rejected ones) and "
        "Airflow's metadata DB (airflow db clean trims it)."
    )
    lines.append(
        f"{'would free' if dry_run else 'freed'} {layout.human_size(plan_.freed)} ({len(plan_.remove)} item(s)); "
        f"{left} run folder(s) {'would be ' if dry_run else ''}left. {untouched}"
    )
    return lines


def _version_order(item: VersionItem) -> tuple[str, int]:
    return item.model, int(item.version) if item.version.isdigit() else 0


def _shown(path: Path, home: Path) -> str:
    """``path`` as the report names it: from ``home`` when it is there (a store elsewhere: whole)."""
    try:
        return str(path.relative_to(home))
    except ValueError:
        return str(path)
