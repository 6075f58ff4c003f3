"""Where every artifact lives under ``ENCODERFLOW_HOME`` (default ``./.encoderflow``).

Folders are content-addressed (dataset hash, shard-config hash) or keyed by the Airflow run id,
so a re-run with the same inputs finds its finished work and a retry never mixes two attempts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# What check_params resolved a run's config to, in its folder: what a run stopped before it reported ran.
RESOLVED_FILE = "resolved.json"
# The model version a run's promote registered (model, version, MLflow run), written before the champion
# moves: a run whose promote failed after registering still names its version.
REGISTERED_FILE = "registered.json"


def home() -> Path:
    return Path(os.environ.get("ENCODERFLOW_HOME", ".encoderflow")).resolve()


def writable_home() -> Path:
    """``ENCODERFLOW_HOME``, created when missing and written to once: a file there, or a folder nobody
    may write, is named before Airflow starts instead of failing with its traceback.

    Raises:
        EncoderflowError: it cannot be created or written.
    """
    from encoderflow.errors import EncoderflowError

    where = home()
    try:
        where.mkdir(parents=True, exist_ok=True)
        write_probe(where)
    except OSError as exc:
        if where.exists() and not where.is_dir():
            said, fix = "it is a file, not a folder", "set ENCODERFLOW_HOME to a folder you can write"
        else:
            what = "write to" if where.is_dir() else "create a folder at"
            said = f"cannot {what} it ({exc.strerror or exc})"
            fix = "set ENCODERFLOW_HOME to a folder you can write, or make this one writable"
        raise EncoderflowError(f"ENCODERFLOW_HOME={where}: {said}", fix=fix) from None
    return where


def write_probe(folder: Path) -> None:
    """Create and remove a file in ``folder``: a real write, where ``os.access`` passes a read-only mount,
    an immutable folder or ``/proc``.

    Raises:
        OSError: the folder cannot be written.
    """
    fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
    os.close(fd)
    os.unlink(probe)


def data_dir(dataset: str, content_hash: str) -> Path:
    return home() / "data" / dataset / content_hash[:16]


def shards_dir(shards_hash: str) -> Path:
    return home() / "shards" / shards_hash[:16]


def safe_run_id(run_id: str) -> str:
    """Airflow run ids hold ':' and '+'; keep them readable but filesystem-safe. Not one-to-one
    (``a:b`` and ``a_b`` share ``a_b``): :func:`run_folder_owner` tells whose a folder is. Never
    ``.`` or ``..`` (Airflow accepts either as a run id): leading dots go."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_").lstrip(".") or "run"


def recorded_run_id(folder: Path) -> str | None:
    """The run id a run folder's ``resolved.json`` (or summary) records: None when it names none (free, or
    written before runs recorded theirs)."""
    for name in (RESOLVED_FILE, "summary.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if owner := json.loads((folder / name).read_text()).get("run_id"):
                return str(owner)
    return None


def run_folder_owner(run_id: str) -> str | None:
    """The run id another run recorded in ``run_id``'s folder, or None when the folder is free, is this
    run's, or names no run id."""
    owner = recorded_run_id(run_dir(run_id))
    return None if owner == run_id else owner


def run_dir(run_id: str) -> Path:
    return home() / "runs" / safe_run_id(run_id)


def task_log_path(run_id: str, task_id: str, map_index: int, try_number: int) -> Path:
    """Where ``encoderflow run`` keeps a task try's log (``dag.test`` writes none), laid out as Airflow's
    (:func:`airflow_log_path`) below the run folder."""
    return run_dir(run_id) / "logs" / _try_log(task_id, map_index, try_number)


def airflow_log_path(log_folder: str, dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int) -> Path:
    """Where Airflow's file task handler writes a try's log under ``[logging] base_log_folder``, by its
    default ``log_filename_template`` (``make airflow``, ``make stack``, a deployment's shared volume)."""
    return Path(log_folder) / f"dag_id={dag_id}" / f"run_id={run_id}" / _try_log(task_id, map_index, try_number)


def _try_log(task_id: str, map_index: int, try_number: int) -> str:
    """The tail of Airflow's default ``log_filename_template``: ``task_id=<t>/[map_index=<i>/]attempt=<n>.log``."""
    mapped = f"map_index={map_index}/" if map_index >= 0 else ""
    return f"task_id={task_id}/{mapped}attempt={try_number}.log"


def mlflow_dir() -> Path:
    return home() / "mlflow"


def airflow_home() -> Path:
    return home() / "airflow"


def run_claims() -> Path:
    """Where each ``encoderflow run`` process holds its run id under an ``flock`` while it runs the DAG."""
    return airflow_home() / "encoderflow-runs"


def stopped_runs() -> set[str]:
    """The run ids whose ``encoderflow run`` process is gone (a kill, a crash) and that no later run has
    marked failed yet: their claim's lock is free. Airflow still says they are running."""
    return _claimed()[1]


def live_runs() -> set[str]:
    """The run ids an ``encoderflow run`` process runs now: their claim's lock is held."""
    return _claimed()[0]


def _claimed() -> tuple[set[str], set[str]]:
    """The claimed run ids: (those whose process holds the claim, those whose claim is free)."""
    live, stopped = set(), set()
    for path in sorted(run_claims().glob("*")) if run_claims().is_dir() else []:
        try:
            with open(path, encoding="utf-8") as claim:
                run_id = claim.read().strip()
                try:
                    fcntl.flock(claim, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released on close, at once
                except BlockingIOError:
                    live.add(run_id)
                    continue
                if run_id:
                    stopped.add(run_id)
        except OSError:  # swept meanwhile, or unreadable: not known either way
            continue
    return live - {""}, stopped


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "", private: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``final``; rename it into place only if the block succeeds.

    Readers never see a half-written file: either the old one, none, or the complete new one.
    While the block runs, the folder carries this writer's shared lock (see :func:`remove_dead_temps`).

    Args:
        private: keep the file 0600 (mkstemp's, from the start: a password is never readable by others).
            Otherwise it gets the mode a plain ``open`` would give it under the umask: an encoder written
            here was 0600 beside its classifier's 0644, unreadable to the group sharing a home.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A writer killed mid-write (a worker's SIGKILL) left its temp here; its retry clears it away.
    remove_dead_temps(final.parent, final.parent.glob(f".{glob.escape(final.name)}.*"))
    with writing_in(final.parent):
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix or ".tmp", dir=final.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            if not private:
                os.chmod(tmp_path, 0o666 & ~_umask())
            os.replace(tmp_path, final)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def is_private(path: str | os.PathLike) -> bool:
    """Whether only its owner may read ``path``: what is made from it keeps it so (a private corpus's
    documents and shards decode back to its text)."""
    return not os.stat(path).st_mode & 0o044


@functools.cache
def _umask() -> int:
    """This process's umask (reading it means setting it: once, and put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def human_size(size: float) -> str:
    """``size`` bytes as B, KiB, MiB or GiB: binary units, named as such (``du -h`` counts the same way)."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def require_room(path: str | os.PathLike, size: int, what: str) -> None:
    """Refuse to write ``path``, about ``size`` bytes, as a full disk would, before the write starts.

    HDF5 (Keras's ``save_weights``) does not survive running out of space mid-file: h5py leaks the
    half-written file's objects, prints their tracebacks, and the process ends in a segmentation fault
    at exit, after the failure was reported (h5py 3.14 with HDF5 1.14.6; a plain ``save_weights`` onto
    a full tmpfs does it). A disk that fills during a run is refused here instead, with the sizes.

    Raises:
        OSError: ``ENOSPC``, when the file system ``path`` is written to (its folder's, which must exist)
            has less than ``size`` bytes free.
    """
    free = shutil.disk_usage(Path(path).parent).free
    if free < size:
        raise OSError(errno.ENOSPC, f"{what} needs about {human_size(size)}, {human_size(free)} is free", str(path))


@contextmanager
def writing_in(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s shared writer lock while temp files or folders are written in it: a sweep
    (:func:`remove_dead_temps`) then leaves every temp file there alone."""
    with _folder_lock(Path(folder), fcntl.LOCK_SH):
        yield


@contextmanager
def _folder_lock(folder: Path, mode: int) -> Iterator[bool]:
    """``flock`` on the folder itself: no lock file to litter it, and the temp file cannot carry
    the lock (HDF5 takes its own ``flock`` on the file it writes, and would be refused). Yields
    whether the lock is held: False when another holder refuses a non-blocking request, or the
    file system has no folder locks."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, mode)
            held = True
        except OSError:  # BlockingIOError (held elsewhere), or no flock on this file system
            held = False
        yield held
    finally:
        os.close(fd)  # releases the lock


def remove_dead_temps(folder: str | os.PathLike, temps: Iterable[Path]) -> list[Path]:
    """Delete ``temps`` (files or folders in ``folder``) when no writer is at work there.

    Every writer (:func:`atomic_path`, :func:`atomic_dir`, :func:`writing_in`) holds a shared lock
    on its folder until its output is renamed into place, and the kernel drops it when the writer
    dies, killed or not. The exclusive lock is granted only when none is left, so every temp then
    is a dead writer's. With a live writer in the folder, nothing is deleted (the temps are left
    for a later sweep). Returns what was deleted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    with _folder_lock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB) as held:
        if not held:
            return []
        removed = [path for path in temps if path.exists() or path.is_symlink()]
        for path in removed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return removed


@contextmanager
def atomic_dir(final: str | os.PathLike, prefix: str | None = None) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; it replaces ``final`` only if the block succeeds.

    Readers see the old folder, none, or the complete new one, never a partly written one.
    """
    final = Path(final)
    with temp_dir(final.parent, prefix or f".{final.name}.") as tmp:
        yield tmp
        # The folder there is renamed aside, not deleted first: two writers of one folder (two scorers
        # fetching into one path) failed with "Directory not empty" after both had deleted it, and a
        # reader found no folder for as long as a delete took. A writer whose rename lost to another's
        # moves that one aside in turn: the last writer's folder stays, whole.
        for attempt in itertools.count():
            aside = tmp.with_name(f"{tmp.name}.old{attempt}")  # the temp's prefix: a killed swap's is swept
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, aside)
            try:
                os.replace(tmp, final)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        for old in tmp.parent.glob(f"{glob.escape(tmp.name)}.old*"):
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def temp_dir(folder: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A temp folder ``<prefix>*`` in ``folder`` for the block, deleted after it, under the folder's
    writer lock (:func:`writing_in`). First, the folders of this prefix that dead writers left (a
    killed extraction of WikiText-103 leaves 540 MB) are swept (:func:`remove_dead_temps`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(folder, folder.glob(f"{glob.escape(prefix)}*"))
    with writing_in(folder):
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_json_or_none(path: str | os.PathLike) -> Any:
    """``path``'s JSON, or None when it is missing or unreadable (a run that has not written it yet)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def reusable(result_path: str | os.PathLike, key: str) -> dict[str, Any] | None:
    """A finished step's recorded result, if it was produced from exactly ``key`` (a hash)."""
    path = Path(result_path)
    if not path.exists():
        return None
    try:
        result = read_json(path)
    except ValueError:
        return None
    return result if result.get("key") == key else None


def code_hash() -> str:
    """sha256 over the encoderflow package's Python sources (path and bytes): the code a model was trained by."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``dst`` as a hard link to ``src`` when ``src`` is an artifact under ``ENCODERFLOW_HOME``, else
    (a file of the user's, or a filesystem that cannot link) a copy.

    Artifacts are only ever replaced whole (written to a temp name, then renamed), never rewritten
    in place: a link is then as independent as a copy (deleting one run folder leaves the other's
    file) at no disk cost. A file altered in place anyway is caught by the sha256 checks every
    consumer makes. A user's own file (a vocabulary, an offline data folder) may be edited in place,
    so it is copied.
    """
    if not Path(src).resolve().is_relative_to(home()):
        shutil.copyfile(src, dst)
        return
    try:
        os.link(src, dst)
    except FileExistsError:
        raise  # never copy into an existing file: that would write it in place
    except OSError:
        shutil.copyfile(src, dst)


def share_identical(folder: str | os.PathLike) -> int:
    """Make each file under ``folder`` a hard link to one content-addressed copy under
    ``ENCODERFLOW_HOME/cache/files``: files every run writes alike (the Data Docs' 4 MB of scripts,
    styles and fonts per dataset) then take their space once, not once per run. Returns the bytes
    no longer stored twice.

    Only for files nothing rewrites in place (writers replace them whole). A stored copy is linked
    to only after its content is checked against its name; one that is not what its name says
    (altered in place after all) is replaced by this file. Where the filesystem cannot link, or a
    file vanishes meanwhile, the file stays as it is.
    """
    store = home() / "cache" / "files"
    store.mkdir(parents=True, exist_ok=True)
    saved = 0
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink()):
        try:
            saved += _share(path, store)
        except OSError:  # gone meanwhile, or the filesystem's limit of links to one file: keep it as it is
            continue
    return saved


def _share(path: Path, store: Path) -> int:
    """:func:`share_identical` for one file: the bytes it no longer stores twice."""
    digest = sha256_file(path)
    shared = store / digest
    try:
        os.link(path, shared)  # the first of its content: the store keeps this one
        return 0
    except FileExistsError:
        pass
    if os.path.samefile(path, shared):
        return 0
    if sha256_file(shared) != digest:  # not what its name says: this file, checked just now, takes its place
        _link_in_place(path, shared)
        return 0
    _link_in_place(shared, path)
    return path.stat().st_size


def _link_in_place(src: Path, dst: Path) -> None:
    """Replace ``dst`` by a hard link to ``src`` in one rename: a reader sees one file or the other."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        os.link(src, tmp)


def adopt_earlier(
    stage: str, key: str, out_dir: str | os.PathLike, field: str, problem: Callable[[Path, dict[str, Any]], str | None]
) -> dict[str, Any] | None:
    """Copy into ``out_dir`` what another run's ``stage`` trained from exactly ``key`` with this code.

    Training is a function of its key (inputs, config, seed) and the code: another run folder's
    ``<stage>/result.json`` with both equal holds the model this run would train again, hours on
    the guide preset. The newest such result whose artifact (``result[field]``, a file or a folder)
    ``problem`` finds nothing wrong with is linked in (:func:`link_or_copy`: this run's folder stands
    alone when older runs are deleted, at no disk cost), and its result written to
    ``out_dir/result.json`` with the copy's path and ``reused_from``: the result of the run that
    trained it (a copy's own source when copying a copy). Results written before they recorded
    ``code_hash`` are never adopted.

    Args:
        stage: the result's folder name in a run folder (``pretrain``, ``finetune``).
        key: the hash of what the stage trains from (its result's ``key``).
        out_dir: this run's ``stage`` folder.
        field: the result's key holding the artifact's path.
        problem: why an earlier artifact may not be used (altered bytes, say), or None.

    Returns:
        The adopted result, or None when no earlier run has one.
    """
    out_dir = Path(out_dir)
    code = code_hash()
    found = []
    for path in (home() / "runs").glob(f"*/{stage}/result.json"):
        if path.parent.resolve() == out_dir.resolve():
            continue
        result = reusable(path, key)
        if result is not None and result.get("code_hash") == code:
            found.append((path.stat().st_mtime, path, result))
    for _, path, result in sorted(found, key=lambda t: t[0], reverse=True):
        src = artifact_of(path, result, field)
        why = problem(src, result) if src.exists() else "missing"
        if why:
            log.warning("%s: not reusing %s (run %s): %s", stage, src, path.parents[1].name, why)
            continue
        dst = out_dir / src.name
        if src.is_dir():
            with atomic_dir(dst) as tmp:
                shutil.copytree(src, tmp, copy_function=link_or_copy, dirs_exist_ok=True)
        else:
            with atomic_path(dst, suffix=src.suffix) as tmp:
                tmp.unlink(missing_ok=True)
                link_or_copy(src, tmp)
        # The run that trained it, not a run that copied it in turn: its timings are that run's.
        adopted = {
            **result,
            field: str(dst),
            "reused_from": str(result_in_this_home(result.get("reused_from") or path)),
            "linked_from": str(path),
        }
        write_json(out_dir / "result.json", adopted)
        return adopted
    return None


def result_in_this_home(recorded: str | os.PathLike) -> Path:
    """A stage result's path (``.../runs/<folder>/<stage>/result.json``) as it is in this home: one
    recorded in a home since copied or moved names the old home's folder (a reuse in the copy said
    "run X's folder is pruned" of a folder it holds)."""
    path = Path(recorded)
    if path.is_relative_to(home()) or len(path.parts) < 4 or path.parts[-4] != "runs":
        return path
    return home() / "runs" / Path(*path.parts[-3:])


def artifact_of(result_path: Path, result: dict[str, Any], field: str) -> Path:
    """The artifact a stage's ``result.json`` names in ``field``: in that stage's folder, beside it. The
    path recorded is absolute: in a copied or moved ENCODERFLOW_HOME it is the old home's, whose file
    a reuse read (and called linked) while the copy's own went unchecked."""
    return Path(result_path).parent / Path(result[field]).name


def finished(
    stage: str,
    key: str,
    out_dir: str | os.PathLike,
    field: str,
    problem: Callable[[Path, dict[str, Any]], str | None],
    earlier_runs: bool,
    trained_from: str,
) -> dict[str, Any] | None:
    """A training stage's finished result for ``key``, logged: this run folder's own (a retry), else,
    with ``earlier_runs``, one another run folder trained (:func:`adopt_earlier`). None: train.
    Either is used only when ``problem`` finds nothing wrong with its artifact.

    Args:
        trained_from: what the key covers, for the log line (the code is always added).
    """
    out_dir = Path(out_dir)
    if (done := reusable(out_dir / "result.json", key)) is not None:
        # A retry (a cleared task) hands this on: it gets the same check as another run's result.
        own = artifact_of(out_dir / "result.json", done, field)
        if not (why := problem(own, done) if own.exists() else "missing"):
            log.info("%s: reusing %s", stage, own)
            return {**done, field: str(own)}
        log.warning("%s: not reusing this run's %s: %s; training it again", stage, own, why)
    if earlier_runs and (done := adopt_earlier(stage, key, out_dir, field, problem)) is not None:
        origin, copy = result_in_this_home(done["reused_from"]), Path(done["linked_from"])
        # The run that trained it may be pruned since, its files kept by a run that reused them: name both.
        via = (
            ""
            if copy == origin
            else f" (from run {copy.parents[1].name}, which reused it"
            + (")" if origin.parent.exists() else f"; run {origin.parents[1].name}'s folder is pruned)")
        )
        log.info(
            "%s: reusing the %s run %s trained from the same %s and code (key %s)%s: linked to %s; "
            "set force to train again",
            stage,
            field,
            origin.parents[1].name,
            trained_from,
            key[:16],
            via,
            done[field],
        )
        return done
    return None


# Locks beside a training stage's folder in a run folder (a refused training leaves no folder): ``.<stage>.lock``
# while a try is in the stage (one try at a time, :func:`alone_in`), ``.<stage>.training.lock`` while it trains
# (not while it waits), holding its pid, key and code (:func:`training`, :func:`busy_twin`).
def stage_lock(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.lock"


def training_lock(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.training.lock"


@contextmanager
def _holding(lock, facts: dict[str, Any]) -> Iterator[None]:
    """Write ``facts`` (with this process's id) into ``lock``, which the caller has just locked, and unlock it
    after the block."""
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"pid": os.getpid(), **facts}) + "\n")
    lock.flush()
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)


def holder(lock_path: str | os.PathLike) -> dict[str, Any] | None:
    """What the live holder of ``lock_path`` wrote in it (``pid``, and ``key``, ``code`` for a training
    lock), or None when no process holds it. An ``fcntl`` lock ends with its holder, however it ends."""
    try:
        with open(lock_path) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = lock.read().strip()
                try:
                    facts = json.loads(text)
                except ValueError:  # being written, or a bare pid
                    facts = None
                return facts if isinstance(facts, dict) else {"pid": text or "?"}
            fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError:  # no lock file: it never trained there (or its folder was pruned while this read)
        pass
    return None


@contextmanager
def alone_in(out_dir: str | os.PathLike, every: float = 60.0) -> Iterator[None]:
    """Hold the stage lock of ``out_dir`` (a run folder's ``pretrain``, ``finetune``): one try works in it at a time.

    A Celery worker killed alone leaves its task training, in a session of its own; Airflow's retry
    then trained beside it, both appending to ``history.csv`` and writing backups, until the run
    failed. The retry now waits for it (saying so every ``every`` seconds), then reuses its result
    or resumes from its backup.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(stage_lock(out_dir), "a+") as lock:
        said = None
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if said is None or time.monotonic() - said >= every:
                    log.warning(
                        "%s: an earlier try (pid %s) still trains in %s (its worker died, or Airflow lost "
                        "it): waiting for it to end, then reusing or resuming what it leaves",
                        out_dir.name,
                        (holder(lock.name) or {}).get("pid", "?"),
                        out_dir,
                    )
                    said = time.monotonic()
                time.sleep(1.0)
        with _holding(lock, {}):
            yield


@contextmanager
def training(out_dir: str | os.PathLike, key: str) -> Iterator[None]:
    """Hold the training lock of ``out_dir`` while the block trains under ``key``: another run of the same
    training waits for it (:func:`wait_for_twin`) instead of training beside it."""
    with open(training_lock(out_dir), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with _holding(lock, {"key": key, "code": code_hash()}):
            yield


def trains_now(out_dir: str | os.PathLike) -> str | None:
    """The pid training in the stage folder ``out_dir`` now, else None."""
    facts = holder(training_lock(out_dir))
    return None if facts is None else str(facts.get("pid", "?"))


def busy_twin(out_dir: str | os.PathLike, key: str) -> tuple[Path, str] | None:
    """Another run folder's stage folder (same name as ``out_dir``) training ``key`` with this code now:
    (that folder, its pid), or None."""
    out_dir = Path(out_dir)
    code = code_hash()
    for lock in (home() / "runs").glob(f"*/.{out_dir.name}.training.lock"):
        folder = lock.parent / out_dir.name
        if lock.parent.resolve() == out_dir.parent.resolve():
            continue
        facts = holder(lock)
        if facts is not None and facts.get("key") == key and facts.get("code") == code:
            return folder, str(facts.get("pid", "?"))
    return None


def finished_or_after_twin(
    stage: str,
    key: str,
    out_dir: str | os.PathLike,
    field: str,
    problem: Callable[[Path, dict[str, Any]], str | None],
    earlier_runs: bool,
    trained_from: str,
    doing: str,
    then: str,
) -> dict[str, Any] | None:
    """:func:`finished`'s result; else, with ``earlier_runs``, once another run training ``key`` now ends
    (:func:`wait_for_twin`), what it left. None: train (or resume)."""
    if (done := finished(stage, key, out_dir, field, problem, earlier_runs, trained_from)) is not None:
        return done
    if earlier_runs and wait_for_twin(out_dir, key, doing, then):
        return finished(stage, key, out_dir, field, problem, earlier_runs, trained_from)
    return None


def wait_for_twin(
    out_dir: str | os.PathLike, key: str, doing: str, then: str, every: float = 60.0, poll: float = 2.0
) -> bool:
    """Wait while another run trains ``key`` with this code (:func:`busy_twin`); returns whether it waited.

    Two ``encoderflow run`` of one config minutes apart both trained, on one accelerator (``dag.test``
    knows no pools). Only training holds the lock: a run waiting here is never waited for.

    Args:
        doing: what the twin does, for the log line ("trains the same model from ...").
        then: what this run does after it ("reusing its encoder ...").
    """
    said, waited = None, False
    while (twin := busy_twin(out_dir, key)) is not None:
        folder, pid = twin
        if said is None or time.monotonic() - said >= every:
            log.info(
                "%s: run %s %s now (pid %s): waiting for it, then %s",
                Path(out_dir).name,
                folder.parent.name,
                doing,
                pid,
                then,
            )
            said = time.monotonic()
        waited = True
        time.sleep(poll)
    return waited
