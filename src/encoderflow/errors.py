"""Expected failures, and how any failure is told to a person: what went wrong and what to do.

The DAG turns an :class:`EncoderflowError` into a failed task with the message alone (no
traceback, no retry): a retry cannot fix bad data. Anything else is a bug or an outage and keeps
its traceback and retries.

:func:`cause_of` reduces a failure to a :class:`Cause` (error type, one-line message, fix), and
:func:`record_failure` keeps the first one of a run in ``runs/<run id>/failure.json``, so a run
summary or the runs page can say why a run failed without reading task logs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FAILURE_FILE = "failure.json"
INTERRUPTED_EXIT = 130  # a shell's code for a command ended by SIGINT
ONE_LINE_LIMIT = 500


class EncoderflowError(RuntimeError):
    """Base of every expected, user-actionable failure; the message says what and how to fix.

    Args:
        message: what went wrong, naming the file, URL or key.
        fix: what a person should do about it. ``str()`` keeps message and fix together (logs and
            the CLI print one text); :func:`cause_of` hands them back apart.
    """

    fix: str | None = None

    def __init__(self, message: str = "", *, fix: str | None = None):
        self.message = message
        if fix:
            self.fix = fix
        super().__init__(_with_fix(message, self.fix) if fix else message)


def _with_fix(message: str, fix: str) -> str:
    # A multi-line message (one line per file or source) gets the fix on a line of its own.
    return f"{message}\nfix: {fix}" if "\n" in message else f"{message}; fix: {fix}"


# Where a message spells its fix inline ("...; lower the learning rate"), the fix is the clause
# after the first "; " or ". " that starts with one of these verbs.
_FIX_VERBS = (
    "add|change|check|clear|delete|download|fix|free|give|install|lower|pass|point|put|raise|rebuild|"
    "remove|re-run|rerun|retry|run|set|try|use"
)
_INLINE_FIX = re.compile(rf"(?:;|\.)\s+((?:{_FIX_VERBS})\b.*)$", re.IGNORECASE)
_EXPLICIT_FIX = re.compile(r"(?:;|\n)\s*fix: ")
_TYPE_PREFIX = re.compile(r"^([A-Z][A-Za-z]*): ")

# For expected failures whose message does not spell a fix. Keyed by name: the classes live in the
# modules that raise them, and a failure read back from Airflow may be text only.
DEFAULT_FIXES = {
    "ConfigError": "correct the value; every key, its type and bounds are in docs/parameters.md",
    "DataError": "check the source named above, or pass a reachable --mirror or an offline --data-dir",
    "NonFiniteLoss": "lower the learning rate or check the input data",
    "ShardError": "rebuild the shards: re-run plan_shards and the tasks after it",
    "StaleChampion": "re-run the gate (evaluate_and_gate, then promote)",
    "StorageFull": "free space under ENCODERFLOW_HOME (encoderflow prune), or set it to another disk",
    "ValidationFailed": "fix or replace the data (another --data-dir or --mirror); the Data Docs show each "
    "failed expectation",
}
GENERIC_FIX = "the message names what to change; a retry alone will not help"
BUG_FIX = "not an expected failure (a bug or an outage): the traceback is in the task log"


class StorageFull(EncoderflowError):
    """The disk under ``ENCODERFLOW_HOME`` is full, over quota or read-only: no retry writes there."""


_STORAGE = {
    errno.ENOSPC: ("no space left on the device", "free space there (encoderflow prune removes old runs' folders)"),
    errno.EDQUOT: ("the disk quota is used up", "free space there (encoderflow prune removes old runs' folders)"),
    errno.EROFS: ("the file system is read-only", "make it writable"),
}


def storage_error(exc: BaseException) -> StorageFull | None:
    """``exc`` as a :class:`StorageFull` when it, or an exception it was raised from, is a full, over-quota
    or read-only file system (h5py, Keras and TensorFlow wrap the OSError, or keep only its text); else None.

    A full disk was retried after 30 s (it was not an expected failure), told as "a bug or an outage", and
    every log line that could not be written printed Python's "--- Logging error ---" traceback.
    """
    from encoderflow import layout

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None:
            code = next((c for c in _STORAGE if f"[Errno {c}]" in str(exc) or os.strerror(c) in str(exc)), None)
        if code in _STORAGE:
            what, fix = _STORAGE[code]
            where = f" writing {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
            # layout.require_room's refusal says the sizes; the system's own text says no more than `what`.
            own = isinstance(exc, OSError) and exc.strerror and exc.strerror != os.strerror(code)
            sizes = f": {exc.strerror}" if own else ""
            return StorageFull(
                f"{what}{where}{sizes} (ENCODERFLOW_HOME={layout.home()})",
                fix=f"{fix}, or set ENCODERFLOW_HOME to another disk; then clear the task (or run again)",
            )
        exc = exc.__cause__ or exc.__context__
    return None


def check_utf8(what: str, text: str, *, fix: str, after: str = "") -> None:
    """Refuse text given on a command line that is not UTF-8: a non-UTF-8 terminal's bytes reach Python as
    lone surrogates, which fail much later (a tokenizer's TensorFlow traceback, a tag no store accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start].encode("utf-8", "surrogateescape")
        # Counted from 1, as a person counts: "café"'s é is its character 4.
        raise EncoderflowError(f"{what} is not UTF-8 (character {exc.start + 1}: {bad!r}){after}", fix=fix) from None


@dataclass(frozen=True)
class Cause:
    """A failure as a person reads it.

    Attributes:
        error: the exception type, e.g. ``NonFiniteLoss``.
        message: what went wrong, on one line (:func:`one_line`: its lines joined by "; ", at most 500
            characters of whole lines, then "(+N more)").
        fix: what to do about it.
        expected: an :class:`EncoderflowError` (bad input, config or training: no retry) rather
            than a bug or an outage.
    """

    error: str
    message: str
    fix: str
    expected: bool

    def line(self) -> str:
        return f"{self.error}: {self.message}"


def one_line(text: str, limit: int = ONE_LINE_LIMIT) -> str:
    """A message on one line: its lines (one per failure, for validation) joined by "; ", an indented
    line continuing the one before; when too long, the whole lines that fit and how many are left."""
    parts: list[str] = []
    for line in text.splitlines():
        if line.strip():
            words = " ".join(line.split())
            if parts and line[:1].isspace():
                parts[-1] += " " + words
            else:
                parts.append(words)
    for keep in range(len(parts), 0, -1):
        more = f"; (+{len(parts) - keep} more)" if keep < len(parts) else ""
        joined = "; ".join(parts[:keep]) + more
        if len(joined) <= limit:
            return joined
    more = f" (+{len(parts) - 1} more)" if len(parts) > 1 else ""
    return parts[0][: limit - 1 - len(more)] + "…" + more if parts else ""


def split_fix(text: str) -> tuple[str, str | None]:
    """Split a message into (what went wrong, the fix it suggests), or (text, None) if it has none."""
    explicit = list(_EXPLICIT_FIX.finditer(text))
    if explicit:
        last = explicit[-1]
        return text[: last.start()], text[last.end() :]
    first_line = text.split("\n", 1)[0]
    inline = _INLINE_FIX.search(first_line)
    if inline and inline.start() > 0:
        return text[: inline.start()] + text[len(first_line) :], inline.group(1).rstrip(" .")
    return text, None


def cause_of(exc: BaseException | str | None) -> Cause:
    """Describe a failure: its type, a one-line message and the fix.

    Args:
        exc: the exception (an ``AirflowFailException`` raised by the DAG's expected-failure
            wrapper is unwrapped to the encoderflow error it replaced), the text the wrapper gave
            it (``"NonFiniteLoss: pretrain: loss became nan ..."``), or None.
    """
    if exc is None:
        # Airflow failed the try without running it to an exception: its log has no traceback to read.
        if broker := _broker_down():  # the scheduler could not hand the task to a worker: it never started
            return Cause(
                "Failure",
                f"the task ended without an exception: Airflow could not run it (the Celery broker {broker} does "
                "not answer)",
                "start the broker (make stack), then clear the task to run it again",
                expected=False,
            )
        return Cause(
            "Failure",
            "the task ended without an exception: Airflow could not run it (the api-server or a worker was "
            "unreachable, or its process was killed)",
            "the scheduler's and the worker's logs say why; clear the task to run it again",
            expected=False,
        )
    if isinstance(exc, BaseException) and (outage := _service_outage(exc)) is not None:
        return outage
    if isinstance(exc, BaseException) and not isinstance(exc, EncoderflowError):
        # expected_failures raises "from None": the original is still the exception's context.
        if isinstance(exc.__context__, EncoderflowError) and exc.__suppress_context__:
            exc = exc.__context__
    if isinstance(exc, EncoderflowError):
        name = type(exc).__name__
        message, inline_fix = split_fix(str(exc))
        if "fix" in exc.__dict__:  # given to this error, so str() carries it: take the message as given
            message, inline_fix = getattr(exc, "message", message), exc.fix
        fix = inline_fix or exc.fix or _default_fix(name, getattr(exc, "docs", None))
        return Cause(name, one_line(message) or name, fix, expected=True)

    text = str(exc)
    prefix = _TYPE_PREFIX.match(text)
    if prefix and prefix.group(1) in _expected_names():
        # Only the wrapper's text is left ("Type: message"), e.g. the context was lost on the way.
        name = prefix.group(1)
        message, fix = split_fix(text[prefix.end() :])
        return Cause(name, one_line(message) or name, fix or _default_fix(name), expected=True)
    name = type(exc).__name__ if isinstance(exc, BaseException) else "Failure"
    return Cause(name, one_line(text) or repr(exc), BUG_FIX, expected=False)


# An MLflow client call that never reached the server (requests/urllib3 say so in these words, the most
# telling first), or one the server refused with 503 (MLflow's own database down): an outage, retried as
# one, but named as one.
_UNREACHABLE = ("Connection refused", "timed out", "Name or service not known", "Failed to establish a new connection")
_MLFLOW_URL = re.compile(r"API request to (https?://[^/\s]+)")


def _service_outage(exc: BaseException) -> Cause | None:
    """``exc`` told as the outage it is when it, or an exception it was raised from, is the MLflow server
    unreachable or answering 503; else None. It was "MlflowException: API request to ... failed with
    exception HTTPConnectionPool(...)", ~45 frames, and the fix "a bug or an outage"."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if type(exc).__name__ == "MlflowException" and (url := _MLFLOW_URL.search(text)):
            server = url.group(1)
            if "503 error responses" in text or "TEMPORARILY_UNAVAILABLE" in text:
                why = (
                    f"the MLflow server at {server} answers 503 Service Unavailable (its database down, or overloaded)"
                )
                fix = "see its log and its database (make stack-status), then clear the task"
            elif reason := next((r for r in _UNREACHABLE if r in text), None):
                why = f"the MLflow server at {server} is not reachable ({reason})"
                fix = "start it (make stack, or the server MLFLOW_TRACKING_URI names), then clear the task"
            else:
                return None
            return Cause("MlflowUnavailable", why, f"{fix}; Airflow retries it meanwhile", expected=False)
        exc = exc.__cause__ or exc.__context__
    return None


def _broker_down() -> str | None:
    """The Celery broker this process is configured with when it refuses a connection now, else None."""
    import socket
    from urllib.parse import urlsplit

    url = os.environ.get("AIRFLOW__CELERY__BROKER_URL", "")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 6379
    except ValueError:
        return None
    if not host or parts.scheme not in ("redis", "rediss"):
        return None
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return f"{parts.scheme}://{host}:{port}"
    return None


def told(exc: EncoderflowError) -> str:
    """What a failed task says, once: ``"<Type>: <message>"`` with its fix, the default fix added
    where the message spells none (e.g. ``ValidationFailed`` lists the failed expectations only)."""
    text = str(exc)
    if "fix" not in exc.__dict__ and split_fix(text)[1] is None:
        text = _with_fix(text, cause_of(exc).fix)
    return f"{type(exc).__name__}: {text}"


def _expected_names() -> set[str]:
    """Names of the expected failures: the ones with a default fix, and every subclass imported so far."""
    names, todo = {EncoderflowError.__name__, *DEFAULT_FIXES}, [EncoderflowError]
    while todo:
        for sub in todo.pop().__subclasses__():
            names.add(sub.__name__)
            todo.append(sub)
    return names


def _default_fix(name: str, docs: str | None = None) -> str:
    fix = DEFAULT_FIXES.get(name, GENERIC_FIX)
    return f"{fix}: {docs}" if docs and name == "ValidationFailed" else fix


def failure_path(run_id: str) -> Path:
    from encoderflow import layout

    return layout.run_dir(run_id) / FAILURE_FILE


def failure_outlived(folder: Path) -> bool:
    """Whether the run in ``folder`` finished (wrote ``summary.json``) after the failure it recorded:
    that failure's task was cleared and the run went on. False when either file is missing."""
    try:
        return (folder / "summary.json").stat().st_mtime > (folder / FAILURE_FILE).stat().st_mtime
    except OSError:
        return False


def record_failure(run_id: str, cause: Cause, /, **where: Any) -> bool:
    """Keep a run's first failure in ``runs/<run id>/failure.json``; later ones leave it alone, until
    the run finishes (``summary.json``): a failure after that, of a cleared task, is kept in its place.
    A later try of the recorded task (cleared, failed again) replaces it too.

    Written to a temp name and hard-linked into place, which fails if the file exists: two tasks
    failing at once cannot both win, and a reader never sees half a file.

    Args:
        run_id: the Airflow run id.
        cause: what failed and the fix.
        where: dag_id, task_id, map_index, try_number and the like, stored beside the cause.

    Returns:
        True if this call wrote the file, False if a failure was already recorded.
    """
    path = failure_path(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if failure_outlived(path.parent) or _a_later_try_of(read_failure(run_id), where):
        path.unlink(missing_ok=True)
    payload = {**where, **asdict(cause)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # A filesystem without hard links: still whole when seen, but a tie may go to either.
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def task_label(task_id: str, map_index: int | None = -1) -> str:
    """A task instance as every message names it: ``finetune``, or ``build_shard[3]`` when mapped."""
    return task_id if map_index is None or map_index < 0 else f"{task_id}[{map_index}]"


def _of_task(record: dict[str, Any] | None, task_id: Any, map_index: Any) -> bool:
    """Whether a failure record is this task's (its map index too)."""
    return bool(record) and record.get("task_id") == task_id and record.get("map_index", -1) == map_index


def _a_later_try_of(record: dict[str, Any] | None, where: dict[str, Any]) -> bool:
    """Whether ``where`` is a later try of the recorded failure's task: cleared and failed again (for another
    cause, maybe: the fixed file now refused as changed since its download), it replaces the record, which
    told the user to fix what they had fixed."""
    if not _of_task(record, where.get("task_id"), where.get("map_index", -1)):
        return False
    before, now = record.get("try_number"), where.get("try_number")
    return isinstance(before, int) and isinstance(now, int) and now > before


def forget_failure(run_id: str, task_id: str, map_index: int = -1) -> bool:
    """Remove the run's recorded failure when it is this task's: cleared and now done, the task no longer
    fails the run, and the next failure of the run (a task after it) is the one to keep and show.

    Returns:
        True if a record was removed.
    """
    if not _of_task(read_failure(run_id), task_id, map_index):
        return False
    failure_path(run_id).unlink(missing_ok=True)
    return True


def read_failure(run_id: str) -> dict[str, Any] | None:
    """The run's first recorded failure (see :func:`record_failure`), or None."""
    path = failure_path(run_id)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
