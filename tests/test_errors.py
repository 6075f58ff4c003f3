"""encoderflow.errors: a failure reduced to its cause, a one-line message and its fix; the run's first one kept."""

from __future__ import annotations

import pytest

from encoderflow import errors
from encoderflow.data.shards import ShardError
from encoderflow.data.sources import DataError
from encoderflow.data.validation import ValidationFailed
from encoderflow.train.callbacks import NonFiniteLoss


def test_the_first_failure_of_a_run_is_kept_and_written_whole():
    first = errors.Cause("DataError", "first", "fix one", True)
    assert errors.record_failure("r1", first, task_id="a") is True
    assert errors.record_failure("r1", errors.Cause("ValueError", "second", "fix two", False), task_id="b") is False
    assert errors.read_failure("r1") == {"task_id": "a", **first.__dict__}
    assert sorted(p.name for p in errors.failure_path("r1").parent.iterdir()) == ["failure.json"]  # no temp left
    assert errors.read_failure("never-ran") is None


@pytest.mark.parametrize(
    "exc, error, message, fix",
    [
        # The fix spelled inline by today's messages: the clause after "; " or ". " that starts with a verb.
        (
            NonFiniteLoss("pretrain: loss became nan at step 12; lower the learning rate or check the input data"),
            "NonFiniteLoss",
            "pretrain: loss became nan at step 12",
            "lower the learning rate or check the input data",
        ),
        (
            ShardError("shard /s/a.tfrecord is missing; its build task did not finish. Clear the failed build_shard"),
            "ShardError",
            "shard /s/a.tfrecord is missing; its build task did not finish",
            "Clear the failed build_shard",
        ),
        # Given apart, it stays apart.
        (
            DataError("download http://h/f.zip: gave up after 5 attempts", fix="check the network"),
            "DataError",
            "download http://h/f.zip: gave up after 5 attempts",
            "check the network",
        ),
        # None spelled: the type's default. A multi-line message becomes one line.
        (
            NonFiniteLoss("finetune: validation loss nan; the classifier is not saved"),
            "NonFiniteLoss",
            "finetune: validation loss nan; the classifier is not saved",
            errors.DEFAULT_FIXES["NonFiniteLoss"],
        ),
        (
            ValidationFailed(["sst2: dev.tsv: expect_column_values_to_be_in_set", "sst2: train.tsv: rows"], "/d/x"),
            "ValidationFailed",
            "sst2: dev.tsv: expect_column_values_to_be_in_set; sst2: train.tsv: rows",
            errors.DEFAULT_FIXES["ValidationFailed"] + ": /d/x",
        ),
        # A bug or an outage: its own type, and no fix to guess.
        (OSError("disk full\n  while writing"), "OSError", "disk full while writing", errors.BUG_FIX),
        # Only the DAG wrapper's text is left.
        (
            "ConfigError: config value 'data.mask_rate': must be <= 1.0, got 1.5",
            "ConfigError",
            "config value 'data.mask_rate': must be <= 1.0, got 1.5",
            errors.DEFAULT_FIXES["ConfigError"],
        ),
    ],
)
def test_a_cause_is_the_error_a_one_line_message_and_a_fix(exc, error, message, fix):
    cause = errors.cause_of(exc)
    assert (cause.error, cause.message, cause.fix) == (error, message, fix)
    assert cause.expected is (error != "OSError")


def test_a_long_message_keeps_whole_lines_and_says_how_many_are_left():
    lines = [f"labeled: /data/train.jsonl: check {i} failed, observed {'x' * 40}" for i in range(12)]
    line = errors.one_line("\n".join(lines), limit=300)
    kept = line.split("; (+")[0].split("; ")
    assert kept == lines[: len(kept)] and line.endswith(f"; (+{12 - len(kept)} more)") and len(line) <= 300
    assert errors.one_line("x" * 400 + "\nsecond", limit=100) == "x" * 89 + "… (+1 more)"
    assert len(errors.one_line("x" * 400 + "\nsecond", limit=100)) == 100


def test_the_dag_wrapper_is_seen_through_to_the_encoderflow_error():
    class AirflowFailException(Exception):  # what expected_failures raises, "from None"
        pass

    try:
        try:
            raise DataError("download http://h/f.zip: too slow", fix="use a mirror")
        except DataError as inner:
            raise AirflowFailException(f"{type(inner).__name__}: {inner}") from None
    except AirflowFailException as wrapped:
        cause = errors.cause_of(wrapped)
    assert cause == errors.Cause("DataError", "download http://h/f.zip: too slow", "use a mirror", True)


@pytest.mark.parametrize(
    "exc",
    [
        DataError("download http://h/f.zip: gave up after 5 attempts", fix="check the network"),
        ShardError("shard /s/a.tfrecord is missing. Clear the failed build_shard"),
        NonFiniteLoss("finetune: validation loss nan"),
        ValidationFailed(["sst2: dev.tsv: expect_column_values_to_be_in_set", "sst2: train.tsv: rows"], "/d/x"),
    ],
)
def test_what_a_failed_task_says_is_its_cause_and_fix_once_and_reads_back_the_same(exc):
    """The text the DAG wrapper gives Airflow holds the fix even where the message spells none, and
    read back as text alone it is the same cause the exception itself gives."""
    text = errors.told(exc)
    cause = errors.cause_of(exc)
    assert text.startswith(f"{type(exc).__name__}: ") and text.count(cause.fix) == 1, text
    assert errors.cause_of(text) == cause


def test_a_cleared_task_that_now_succeeds_is_no_longer_the_runs_failure():
    # Fixed data, validation cleared and passed: the page must not keep telling the user to fix it.
    validation = errors.Cause("ValidationFailed", "dev.tsv: label 2", "fix the data", True)
    assert errors.record_failure("r2", validation, task_id="validate_labeled", map_index=-1)
    assert not errors.forget_failure("r2", "validate_corpus")  # another task's success leaves it
    assert not errors.forget_failure("r2", "validate_labeled", map_index=3)
    assert errors.read_failure("r2")["task_id"] == "validate_labeled"
    assert errors.forget_failure("r2", "validate_labeled") and errors.read_failure("r2") is None
    # The run's next failure, after it, is the one kept now.
    later = errors.Cause("DataError", "finetune: dev.tsv changed", "run again", True)
    assert errors.record_failure("r2", later, task_id="finetune", map_index=-1)
    assert errors.read_failure("r2")["task_id"] == "finetune"
    assert not errors.forget_failure("never-ran", "finetune")


def test_a_try_failed_without_an_exception_points_at_the_logs_that_say_why():
    # A scheduled run's first try died before it ran (the api-server not up): its task log holds no traceback.
    cause = errors.cause_of(None)
    assert not cause.expected and "without an exception" in cause.message and "traceback" not in cause.fix
    assert cause.fix.startswith("the scheduler's and the worker's logs say why")


def test_a_cleared_task_failing_again_replaces_its_own_failure_not_another_tasks():
    # Fixed data, validate cleared, refused now as changed since its download: the page showed try 1's
    # "fix the data" and hid the fix that mattered.
    first = errors.Cause("ValidationFailed", "label 2 at line 3", "fix or replace the data", True)
    assert errors.record_failure("r3", first, task_id="validate_labeled", map_index=-1, try_number=1)
    again = errors.Cause("DataError", "dev.tsv changed since download_labeled recorded it", "clear download", True)
    assert errors.record_failure("r3", again, task_id="validate_labeled", map_index=-1, try_number=2)
    assert errors.read_failure("r3")["error"] == "DataError" and errors.read_failure("r3")["try_number"] == 2
    # Another task's failure, or an older try's, leaves the record.
    other = errors.Cause("ValueError", "x", "y", False)
    assert not errors.record_failure("r3", other, task_id="validate_corpus", map_index=-1, try_number=3)
    assert not errors.record_failure("r3", other, task_id="validate_labeled", map_index=-1, try_number=1)
    assert not errors.record_failure("r3", other, task_id="validate_labeled", map_index=2, try_number=5)
    assert errors.read_failure("r3")["error"] == "DataError"


def test_a_full_or_read_only_disk_is_an_expected_failure_with_its_fix(encoderflow_home):
    """A full disk was retried after 30 s and told as "a bug or an outage" (h5py and Keras wrap the
    OSError, or keep only its text); a read-only one the same."""
    import errno
    import os

    from airflow.sdk.exceptions import AirflowFailException

    from encoderflow import airflow_adapter as af

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/h/shards/shard-00001.tfrecord")
    said = errors.storage_error(full)
    assert (
        said.message
        == f"no space left on the device writing /h/shards/shard-00001.tfrecord (ENCODERFLOW_HOME={encoderflow_home})"
    )
    assert said.fix.startswith(
        "free space there (encoderflow prune removes old runs' folders), or set ENCODERFLOW_HOME"
    )
    try:
        raise RuntimeError("Unable to synchronously create file") from full
    except RuntimeError as wrapped:
        assert errors.storage_error(wrapped).message == said.message
    text_only = RuntimeError(
        "Unable to synchronously close file (file write failed: [Errno 28] No space left on device)"
    )
    assert errors.storage_error(text_only).message.startswith("no space left on the device (ENCODERFLOW_HOME=")
    read_only = errors.storage_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/h/runs/x/summary.json"))
    assert read_only.message.startswith("the file system is read-only writing /h/runs/x/summary.json")
    assert read_only.fix.startswith("make it writable, or set ENCODERFLOW_HOME to another disk")
    for other in (ValueError("bad"), OSError(errno.ENOENT, "No such file or directory", "/x")):
        assert errors.storage_error(other) is None

    @af.expected_failures
    def build_shard():
        raise RuntimeError("h5py: write failed") from full

    with pytest.raises(AirflowFailException) as failed:
        build_shard()
    cause = errors.cause_of(failed.value)
    assert (cause.error, cause.expected) == ("StorageFull", True) and cause.message == said.message


@pytest.fixture
def answers_503():
    """A loopback server answering every request as MLflow does when its database is down."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Unavailable(BaseHTTPRequestHandler):
        def _answer(self):
            body = json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "OperationalError"}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_unreachable_or_answering_503_is_named_as_the_outage_it_is(answers_503, monkeypatch):
    """The gate's failure with MLflow stopped read "MlflowException: API request to ... failed with exception
    HTTPConnectionPool(...)", and its fix "not an expected failure (a bug or an outage)"."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = f"http://127.0.0.1:{_closed_port()}"
    causes = {}
    for uri in (down, answers_503):
        try:
            MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("m", "champion")
        except Exception as exc:  # noqa: BLE001 - the client's own error is what is told
            try:
                raise RuntimeError("promote failed") from exc  # seen through what wraps it
            except RuntimeError as wrapped:
                causes[uri] = errors.cause_of(wrapped)
    assert causes[down] == errors.Cause(
        "MlflowUnavailable",
        f"the MLflow server at {down} is not reachable (Connection refused)",
        "start it (make stack, or the server MLFLOW_TRACKING_URI names), then clear the task; Airflow retries it "
        "meanwhile",
        expected=False,
    )
    assert causes[answers_503].message == (
        f"the MLflow server at {answers_503} answers 503 Service Unavailable (its database down, or overloaded)"
    )
    assert not causes[answers_503].expected  # an outage: retried


def test_a_try_that_never_ran_names_the_celery_broker_when_it_does_not_answer(monkeypatch):
    """Redis stopped: the scheduler could not send the task and its cause named the api-server or a worker."""
    port = _closed_port()
    monkeypatch.setenv("AIRFLOW__CELERY__BROKER_URL", f"redis://127.0.0.1:{port}/0")
    cause = errors.cause_of(None)
    assert cause.message.endswith(f"(the Celery broker redis://127.0.0.1:{port} does not answer)")
    assert cause.fix == "start the broker (make stack), then clear the task to run it again"
    monkeypatch.delenv("AIRFLOW__CELERY__BROKER_URL")
    assert "broker" not in errors.cause_of(None).message  # no broker here: the general cause
