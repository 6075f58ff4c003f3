"""The production topology for real (``encoderflow.stack``), and the faults it must survive.

PostgreSQL, Redis, the api-server, scheduler, dag-processor, triggerer, two Celery workers
(``default``; ``gpu`` for the ``gpu`` pool) and an MLflow server with basic auth, all on
loopback under one ENCODERFLOW_HOME. Each slow test triggers smoke runs of ``encoder_pretraining``
through the REST API and breaks something on purpose: two runs at once, the scheduler restarted
while one runs and the other waits, the gpu worker SIGKILLed mid-pretrain (the supervisor brings it
back), MLflow down while ``promote`` runs, the triggerer SIGKILLed, PostgreSQL down 30 s mid-pretrain.
Every test
prints what it did and how long it took (``-s`` shows it; the closing note quotes it). The others
check one part (settings, pid files, what ``up``/``down``/``status`` say, Celery's acks, the
supervisor, chosen ports) in seconds, with at most a Redis of their own.

Needs Debian's postgresql and redis-server (``make stack-deps``; ``.ci/run`` installs them and
sets ENCODERFLOW_REQUIRE_STACK=1, which turns a missing package into a failure, not a skip).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from encoderflow import stack as stack_mod
from encoderflow.layout import safe_run_id
from encoderflow.train.callbacks import BACKUP_GLOB
from tests import fixtures_pipeline as fixtures_data

DAG_ID = "encoder_pretraining"
MODEL = "encoderflow-sst2"


def _missing() -> str | None:
    try:
        stack_mod._pg_bin("initdb")
    except stack_mod.StackError as exc:
        return str(exc)
    return None if shutil.which("redis-server") else "redis-server is not installed: run `make stack-deps`"


class Client:
    """The REST API v2 as ``admin`` or ``viewer``, with tokens from ``/auth/token``."""

    def __init__(self, stack: stack_mod.Stack):
        self.stack, self.tokens = stack, {}

    def token(self, user: str) -> str:
        if user not in self.tokens:
            body = {"username": user, "password": self.stack.secrets[f"airflow_{user}"]}
            _, out = self._call("POST", "/auth/token", body, None)
            self.tokens[user] = out["access_token"]
        return self.tokens[user]

    def _call(self, method: str, path: str, body: Any, token: str | None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.stack.airflow_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                if "json" not in resp.headers.get("Content-Type", ""):
                    return resp.status, raw.decode(errors="replace")
                return resp.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def __call__(self, method: str, path: str, body: Any = None, user: str = "admin") -> tuple[int, Any]:
        for _ in range(30):  # the api-server is restarted by no test, but a busy machine can refuse briefly
            try:
                return self._call(method, path, body, self.token(user))
            except (ConnectionError, urllib.error.URLError):
                time.sleep(1)
        raise AssertionError(f"api-server at {self.stack.airflow_url} does not answer")

    def trigger(self, conf: dict[str, Any], note: str) -> str:
        status, run = self("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf, "note": note})
        assert status == 200, (status, run)
        return run["dag_run_id"]

    def run(self, run_id: str) -> dict[str, Any]:
        status, body = self("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}")
        assert status == 200, (status, body)
        return body

    def tasks(self, run_id: str) -> dict[str, dict[str, Any]]:
        q = urllib.parse.quote(run_id, safe="")
        status, body = self("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{q}/taskInstances?limit=100")
        assert status == 200, (status, body)
        return {
            ti["task_id"] + ("" if ti["map_index"] < 0 else f"[{ti['map_index']}]"): ti for ti in body["task_instances"]
        }

    def log(self, run_id: str, task_id: str, try_number: int, user: str = "admin") -> tuple[int, list[str]]:
        q = urllib.parse.quote(run_id, safe="")
        status, body = self(
            "GET",
            f"/api/v2/dags/{DAG_ID}/dagRuns/{q}/taskInstances/{task_id}/logs/{try_number}?full_content=true",
            user=user,
        )
        if status != 200:
            return status, []
        lines = []
        for rec in body.get("content", []):
            if isinstance(rec, dict):
                lines.append(" ".join(str(rec.get(k, "")) for k in ("level", "event", "error_detail") if rec.get(k)))
            else:
                lines.append(str(rec))
        return status, lines


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out := check():
            return out
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def deployed():
    missing = _missing()
    if missing:
        if os.environ.get("ENCODERFLOW_REQUIRE_STACK"):
            pytest.fail(missing)
        pytest.skip(missing)
    # PostgreSQL runs as user `postgres` when we are root: its folders must be reachable by it,
    # which pytest's private tmp root is not.
    root = Path(tempfile.mkdtemp(prefix="encoderflow-stack-"))
    root.chmod(0o755)
    extra = {
        # Notice a killed worker's task in seconds, not the default five minutes, and retry soon.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "15",
        "ENCODERFLOW_RETRY_DELAY_SECONDS": "5",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    }
    st = stack_mod.Stack(root / "home", extra_env=extra)
    t0 = time.monotonic()
    try:
        st.up()
        print(f"\nstack up in {time.monotonic() - t0:.0f} s under {st.root}")
        client = Client(st)
        wait_for("the DAG to be parsed", lambda: client("GET", f"/api/v2/dags/{DAG_ID}")[0] == 200, 180)
        tree = fixtures_data.write_tree(root / "data")
        yield st, client, tree
    finally:
        st.down()
        if any(st.status().values()):
            print("stack: still running after down:", st.status())
        if os.environ.get("ENCODERFLOW_KEEP_STACK"):  # to read its logs after a failure
            print(f"stack kept under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def supervised_ready(st: stack_mod.Stack, name: str, times: int, timeout: float = 300) -> None:
    """Wait until the supervisor has restarted ``name`` ``times`` times, the last one ready."""
    line = f" {name} ready (pid "
    wait_for(
        f"the supervisor to restart {name} ({times})",
        lambda: (st.logs / "supervisor.log").read_text().count(line) >= times and st.alive(name),
        timeout,
        every=0.2,
    )


def smoke_conf(tree: Path, **extra: Any) -> dict[str, Any]:
    return {"preset": "smoke", "data_dir": str(tree), "pretrain_split": "train", "finetune_steps_per_epoch": 40} | extra


def finished(client: Client, run_id: str, timeout: float = 600) -> str:
    return wait_for(
        f"run {run_id} to finish",
        lambda: (s := client.run(run_id)["state"]) in ("success", "failed") and s,
        timeout,
        every=2,
    )


def mlflow_client(st: stack_mod.Stack, user: str | None):
    from mlflow import MlflowClient

    os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
    os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = st.secrets[stack_mod.MLFLOW_USERS.get(user, "mlflow_admin")]
    return MlflowClient(tracking_uri=st.mlflow_url, registry_uri=st.mlflow_url)


def test_a_pid_file_counts_for_the_process_it_started_and_down_stops_strays(tmp_path):
    """A pid file outlives its process: a later process with that number was 'running' and down killed
    it. And a worker killed alone left its task training, out of every component's process tree."""
    st = stack_mod.Stack(tmp_path / "home")
    other = subprocess.Popen(["sleep", "60"], cwd=st.root)  # not the stack's: no program of it
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "airflow"], cwd=st.root)
    try:
        (st.pids / "triggerer.pid").write_text(f"{other.pid} {stack_mod._start_time(other.pid)}")
        assert st.alive("triggerer")
        (st.pids / "triggerer.pid").write_text(f"{other.pid} 1")  # the same number, another start
        assert not st.alive("triggerer") and [pid for pid, _ in st.strays()] == [stray.pid]
        (st.logs / "mlflow.log").touch()
        tail = subprocess.Popen(["tail", "-f", "logs/mlflow.log"], cwd=st.root)  # an operator's, in its folder
        assert [pid for pid, _ in st.strays()] == [stray.pid]
        assert not stack_mod._stack_program([" "]) and not stack_mod._stack_program([])  # a blank title
        st.down()
        assert stray.wait(40) is not None and other.poll() is None and tail.poll() is None  # only the stray went
    finally:
        for proc in (other, stray, *([tail] if "tail" in locals() else [])):
            proc.kill()
            proc.wait()


def _need_redis() -> None:
    if not shutil.which("redis-server"):
        if os.environ.get("ENCODERFLOW_REQUIRE_STACK"):
            pytest.fail("redis-server is not installed: run `make stack-deps`")
        pytest.skip("redis-server is not installed: run `make stack-deps`")


def test_the_users_airflow_settings_reach_every_component_except_what_the_topology_owns(tmp_path, monkeypatch, capsys):
    """Every AIRFLOW* variable of the caller was dropped: a heartbeat timeout or a parallelism exported
    before `up`, as docs/operations.md advises, never reached the scheduler and nothing said so."""
    monkeypatch.setenv("ENCODERFLOW_HOME", str(tmp_path / "home"))
    st = stack_mod.Stack()
    mine = {
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "True",  # over a default of the stack's
    }
    owned = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////tmp/elsewhere.db",
        "AIRFLOW__CELERY__BROKER_URL": "redis://elsewhere:6379/0",
        "AIRFLOW__API__PORT": "8080",
        "AIRFLOW__API_AUTH__JWT_SECRET": "short",
        "AIRFLOW__CELERY__TASK_ACKS_LATE": "True",
        "AIRFLOW__CORE__FERNET_KEY_CMD": "echo elsewhere",  # Airflow's _CMD form of an owned setting
    }
    for k, v in {**mine, **owned, "AIRFLOW_HOME": "/elsewhere", "MLFLOW_TRACKING_URI": "http://elsewhere"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")  # the stack's own value: nothing to say
    for role in (*stack_mod.AIRFLOW_COMPONENTS, *stack_mod.WORKERS):
        env = st.env(role)
        assert {k: env.get(k) for k in mine} == mine, role
        assert all(env.get(k) != v for k, v in owned.items()), role
        assert env["AIRFLOW_HOME"] == str(st.root / "airflow") and env["MLFLOW_TRACKING_URI"] == st.mlflow_url
    assert stack_mod.main(["env", "scheduler"]) == 0
    out = capsys.readouterr().out
    assert "export AIRFLOW__CORE__PARALLELISM='4'" in out and "TASK_INSTANCE_HEARTBEAT_TIMEOUT='60'" in out

    # `up` names each one it ignores, once, with why (start is stubbed: no component is started here,
    # and no supervisor to keep them).
    monkeypatch.setattr(stack_mod.Stack, "start", lambda self, name: None)
    monkeypatch.setattr(stack_mod.Stack, "start_supervisor", lambda self: None)
    st.up()
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("stack: ignoring ")]
    assert sorted(ln.split()[2] for ln in said) == sorted(owned), said
    assert all(": " in ln.split(" from your environment", 1)[1] for ln in said), said


TI_ID = "0199a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b"  # a task instance try's id, as Airflow 3 makes them (uuid7)
# Airflow's task runner: its title names the try it runs; its process group is its own (Airflow 3.3).
FAKE_TASK = f"""\
import contextlib, os, setproctitle, time
with contextlib.suppress(OSError):  # a session leader's group is its own already
    os.setpgid(0, 0)
setproctitle.setproctitle("airflow worker -- {TI_ID}")
time.sleep(60)
"""


def fake_ti(**over: Any) -> dict[str, Any]:
    """A row of Stack.task_instances: try 1 of 3 of pretrain, running, its last heartbeat 10 s ago."""
    rec = {"dag_id": DAG_ID, "run_id": "manual__fake", "task_id": "pretrain", "map_index": -1, "try_number": 1}
    return rec | {"max_tries": 2, "state": "running", "heartbeat": time.time() - 10, "current": True} | over


def test_stop_says_what_it_waits_for_kills_after_its_timeout_and_forgets_the_pid(tmp_path, monkeypatch, capsys):
    """`down` waited silently (Celery's warm shutdown of a worker with a task running took 31-77 s), then
    SIGKILLed, naming neither the task it killed nor when Airflow would retry it; it said "is shutting
    down: waiting up to 60 s" of idle workers too; and every pid file stayed behind. Its task's retry waits for
    the worker stopped on purpose (it said "then retries it ... after its retry delay"), and supervisor.log,
    read afterwards, had no word of the stop nor of the task it killed."""
    monkeypatch.delenv("SUDO_USER", raising=False)
    st = stack_mod.Stack(tmp_path / "home")
    monkeypatch.setattr(
        stack_mod.Stack, "task_instances", lambda self, ids: {TI_ID: fake_ti(queue="gpu")} if ids == [TI_ID] else {}
    )
    armed = tmp_path / "armed"
    # A worker in its warm shutdown (SIGTERM does not end it) with a pool process running a task.
    # (Its pool process runs the task as Airflow's task supervisor does: a child, here through a script.)
    (tmp_path / "task.py").write_text(FAKE_TASK)
    pool = f"import subprocess, sys; subprocess.run([sys.executable, {str(tmp_path / 'task.py')!r}])"
    code = (
        "import pathlib, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"subprocess.Popen([sys.executable, '-c', {pool!r}]); pathlib.Path({str(armed)!r}).touch(); time.sleep(60)"
    )
    st._spawn("worker-gpu", [sys.executable, "-c", code], dict(os.environ))
    pid = st._pid("worker-gpu")

    def task_running() -> bool:
        tree = stack_mod.descendants(pid)
        return armed.exists() and len(tree) == 2 and any(stack_mod._task_instance_id(p) == TI_ID for p in tree)

    wait_for("the fake worker's task", task_running, 30, every=0.1)
    task = next(p for p in stack_mod.descendants(pid) if stack_mod._task_instance_id(p))
    t0 = time.monotonic()
    st.stop("worker-gpu", timeout=4)
    assert 4 <= time.monotonic() - t0 < 15 and not stack_mod._running(pid) and not stack_mod._running(task)
    lines = capsys.readouterr().out.splitlines()
    due = stack_mod._clock(fake_ti()["heartbeat"] + 120)  # within the second: the lines are compared below
    killed = (
        f"killed task process {task}: {DAG_ID} run manual__fake, task pretrain, try 1 of 3: Airflow keeps it "
        "running until its last heartbeat is 120 s old ([scheduler] task_instance_heartbeat_timeout), "
        f"about {due}, then queues try 2 of 3 for queue gpu, which waits for worker-gpu "
        "(stopped: `python -m encoderflow.stack start worker-gpu`)"
    )
    assert [re.sub(r"about \d\d:\d\d:\d\d", f"about {due}", ln) for ln in lines] == [
        f"stack: worker-gpu (pid {pid}) is finishing its running task: waiting up to 4 s, then killing it",
        f"stack: worker-gpu (pid {pid}) still running after 4 s: killed",
        f"stack: {killed}",
    ], lines
    assert not (st.pids / "worker-gpu.pid").exists()
    log = (st.logs / "supervisor.log").read_text().splitlines()
    assert [re.sub(r"about \d\d:\d\d:\d\d", f"about {due}", ln[20:]) for ln in log] == [
        f"stop worker-gpu, asked by {pwd.getpwuid(os.geteuid()).pw_name} (pid {os.getpid()})",
        killed,
    ], log
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", ln) for ln in log), log  # as the supervisor's

    # An idle worker taking a few seconds to stop (Celery's shutdown) is stopped without a word.
    idle = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(3), sys.exit(0))); "
        "subprocess.Popen(['sleep', '60'], start_new_session=False); time.sleep(60)"
    )
    st._spawn("worker-default", [sys.executable, "-c", idle], dict(os.environ))
    pid = st._pid("worker-default")
    wait_for("the idle worker's pool process", lambda: len(stack_mod.descendants(pid)) == 1, 30, every=0.1)
    t0 = time.monotonic()
    st.stop("worker-default", timeout=30)
    assert 3 <= time.monotonic() - t0 < 20 and capsys.readouterr().out == ""

    # One that ends at once is stopped without a word; a pid file whose process died before `down` goes too.
    st._spawn("triggerer", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    (st.pids / "scheduler.pid").write_text("999999999 1")
    st.down()
    assert capsys.readouterr().out == "" and not list(st.pids.iterdir())


def test_a_worker_killed_mid_task_is_restarted_naming_the_task_it_left_and_when_airflow_retries_it(
    tmp_path, monkeypatch, capsys
):
    """The gpu worker SIGKILLed mid-pretrain: its restart SIGKILLed the task it left ("stopped 2 process(es)
    ... pids [16778, 17235]") without a word of which task that was, and Airflow kept it `running` five more
    minutes (its default heartbeat timeout) before retrying it. The restart names each task it kills and
    when Airflow retries it (the stack's timeout is 120 s); `down` names those it finds, even with Airflow's
    database away."""
    st = stack_mod.Stack(tmp_path / "home")
    monkeypatch.setattr(
        stack_mod.Stack, "task_instances", lambda self, ids: {TI_ID: fake_ti(queue="gpu")} if ids == [TI_ID] else {}
    )
    (tmp_path / "task.py").write_text(FAKE_TASK)
    pool = f"import subprocess, sys; subprocess.run([sys.executable, {str(tmp_path / 'task.py')!r}])"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {pool!r}]); time.sleep(60)"
    st._spawn("worker-gpu", [sys.executable, "-c", code], dict(os.environ))
    st._want("worker-gpu", True)
    st._want("scheduler", True)  # the stack's: it fails the killed try and retries it
    worker = st._pid("worker-gpu")

    def pool_and_task() -> tuple[int, int] | None:
        tree = stack_mod.descendants(worker)
        tasks = [p for p in tree if stack_mod._task_instance_id(p) == TI_ID]
        return (next(p for p in tree if p not in tasks), tasks[0]) if len(tree) == 2 and tasks else None

    pool_pid, task = wait_for("the fake worker's task", pool_and_task, 30, every=0.1)
    # As Airflow 3.3 leaves it: the task in a group of its own, out of the worker's (and of _stop_remnants').
    assert os.getpgid(task) == task and os.getpgid(pool_pid) == worker
    os.kill(worker, signal.SIGKILL)
    wait_for("the worker to be gone", lambda: not st.alive("worker-gpu"), 30, every=0.1)
    started = []
    monkeypatch.setattr(stack_mod.Stack, "_start_airflow", lambda self, name: started.append(name))
    try:
        st.start("worker-gpu")  # what the supervisor's restart does, its lines going to supervisor.log
        assert started == ["worker-gpu"] and not stack_mod._running(task) and not stack_mod._running(pool_pid)
        lines = capsys.readouterr().out.splitlines()
        due = stack_mod._clock(fake_ti()["heartbeat"] + 120)
        assert [re.sub(r"about \d\d:\d\d:\d\d", f"about {due}", ln) for ln in lines[:3]] == [
            f"stack: stopped 1 process(es) the exited worker-gpu left in its group: pids [{pool_pid}]",
            f"stack: stopped 1 process(es) a stopped component left running (tasks): pids [{task}]",
            f"stack: killed task process {task}: {DAG_ID} run manual__fake, task pretrain, try 1 of 3: Airflow "
            "keeps it running until its last heartbeat is 120 s old ([scheduler] task_instance_heartbeat_timeout), "
            f"about {due}, then retries it (try 2 of 3) after its retry delay",
        ], lines

        # What Airflow says of other tries, each as it stands.
        ti = "0199a1b2-c3d4-7e5f-8a6b-000000000000"
        rows = {
            ti: fake_ti(task_id="embed", map_index=3, try_number=2, max_tries=1, heartbeat=time.time() - 500),
            TI_ID: fake_ti(state="up_for_retry", current=False),
        }
        monkeypatch.setattr(stack_mod.Stack, "task_instances", lambda self, ids: rows)
        assert st.killed_task_lines({7: ti, 8: TI_ID}) == [
            f"killed task process 7: {DAG_ID} run manual__fake, task embed[3], try 2 of 2: Airflow keeps it running "
            "until its last heartbeat is 120 s old ([scheduler] task_instance_heartbeat_timeout), any moment now, "
            "then fails it: no tries left",
            f"killed task process 8: {DAG_ID} run manual__fake, task pretrain, try 1 of 3: Airflow has it "
            "up_for_retry already",
        ]
        # After `stop scheduler`, no retry delay runs and no time can be given until one is back.
        st._want("scheduler", False)
        assert st.killed_task_lines({8: TI_ID}, found={TI_ID: fake_ti(queue="gpu")}) == [
            f"killed task process 8: {DAG_ID} run manual__fake, task pretrain, try 1 of 3: Airflow keeps it running "
            "while the scheduler is stopped (`python -m encoderflow.stack start scheduler`); once one runs, it fails "
            "it when its last heartbeat is 120 s old ([scheduler] task_instance_heartbeat_timeout), then retries it "
            "(try 2 of 3) after its retry delay"
        ]
        st._want("scheduler", True)
        # Yours over the stack's: the timeout the scheduler has is the one said.
        monkeypatch.setenv(stack_mod.HEARTBEAT_TIMEOUT_VAR, "600")
        assert st.heartbeat_timeout() == 600 and "is 600 s old" in st.killed_task_lines({7: ti})[0]
        monkeypatch.delenv(stack_mod.HEARTBEAT_TIMEOUT_VAR)
        # A queue no worker of the stack reads: its retry would wait forever.
        stray_queue = {TI_ID: fake_ti(queue="cpu", heartbeat=time.time() - 500)}
        assert st.killed_task_lines({8: TI_ID}, found=stray_queue) == [
            f"killed task process 8: {DAG_ID} run manual__fake, task pretrain, try 1 of 3: Airflow keeps it running "
            "until its last heartbeat is 120 s old ([scheduler] task_instance_heartbeat_timeout), any moment now, "
            "then queues try 2 of 3 for queue cpu, which no worker of the stack reads"
        ]

        # `down` finds one left by a worker that died (none runs), and says what it was with no database.
        monkeypatch.undo()
        stray = subprocess.Popen([sys.executable, str(tmp_path / "task.py")], cwd=st.root, start_new_session=True)
        wait_for("the stray task's title", lambda: stack_mod._task_instance_id(stray.pid) == TI_ID, 30, every=0.1)
        st.down()
        assert stray.wait(30) is not None
        out = capsys.readouterr().out
        assert (
            f"stack: killed task process {stray.pid}: task instance {TI_ID} (Airflow's database did not answer: " in out
        )
        assert "Airflow fails a running task once its last heartbeat is 120 s old" in out, out
    finally:
        st.down()


def test_status_says_what_airflow_has_now_of_the_tasks_the_supervisor_s_last_restart_killed(tmp_path, monkeypatch):
    """The supervisor's restart of a worker named the task process it killed only in supervisor.log; then
    `status` kept the line it printed then: at 21:35, the run a success since 21:34, it still said "Airflow
    keeps it running until ..., about 21:31:02, then retries it", until the next restart, under "stopped on
    purpose" too. What was killed is kept, and `status` asks Airflow what is true of it now, once for all."""
    st = stack_mod.Stack(tmp_path / "home")
    started = []

    def start(self, name, tasks=None):  # as Stack.start does, killing the task the dead worker left
        started.append(name)
        tasks[7] = TI_ID
        print("stack: stopped 1 process(es) a stopped component left running (tasks): pids [7]")

    asked = []
    rows: dict[str, Any] | str = {TI_ID: fake_ti(queue="gpu")}
    monkeypatch.setattr(stack_mod.Stack, "task_instances", lambda self, ids: asked.append(ids) or rows)
    monkeypatch.setattr(stack_mod.Stack, "start", start)
    wanted = {"worker-gpu": True, "scheduler": True}
    monkeypatch.setattr(stack_mod.Stack, "wanted", lambda self, name: wanted.get(name, False))
    monkeypatch.setattr(stack_mod.Stack, "alive", lambda self, name: False)
    monkeypatch.setattr(stack_mod.Stack, "_pid", lambda self, name: None)
    monkeypatch.setattr(stack_mod.Stack, "_recorded_pid", lambda self, name: None)
    st.sup.mkdir(parents=True)  # as the supervisor makes it
    state, due = {"worker-gpu": {"restarts": 0, "failures": 0}}, {}
    st._tend("worker-gpu", state, {}, due)  # its exit noted
    due["worker-gpu"] = 0.0  # its pause over
    before = time.time()
    st._tend("worker-gpu", state, {}, due)
    assert started == ["worker-gpu"] and state["worker-gpu"]["restarts"] == 1
    killed = state["worker-gpu"]["killed"]
    assert killed["tasks"] == {"7": TI_ID} and before <= killed["at"] <= time.time(), killed
    at = stack_mod._clock(killed["at"])

    monkeypatch.setattr(stack_mod.Stack, "supervisor_pid", lambda self: os.getpid())
    monkeypatch.setattr(stack_mod.Stack, "restarts", lambda self: state)
    what = f"{at} killed task process 7: {DAG_ID} run manual__fake, task pretrain, try 1 of 3"
    due_at = stack_mod._clock(rows[TI_ID]["heartbeat"] + 120)
    note = st.supervision_notes()["worker-gpu"].splitlines()
    assert note[0].startswith("restarted 1 time, last ") and note[0].endswith(": exit status unknown"), note
    assert note[1:] == [
        f"{' ' * 18}{what}: Airflow keeps it running until its last heartbeat is 120 s old ([scheduler] "
        f"task_instance_heartbeat_timeout), about {due_at}, then retries it (try 2 of 3) after its retry delay"
    ], note
    # Later, Airflow has retried it: said so, not the forecast; under "stopped on purpose" too.
    rows = {TI_ID: fake_ti(queue="gpu", state="failed", current=False)}
    wanted["worker-gpu"] = False
    note = st.supervision_notes()["worker-gpu"].splitlines()
    assert note[0].endswith("; stopped on purpose: not restarted (`start worker-gpu` or `up` starts it)"), note
    assert note[1:] == [f"{' ' * 18}{what}: Airflow has it failed already"], note
    # Its database away: said so, at once.
    rows = "connection to server at 127.0.0.1 failed: Connection refused"
    note = st.supervision_notes()["worker-gpu"].splitlines()
    assert note[1:] == [
        f"{' ' * 18}{at} killed task process 7: task instance {TI_ID} (Airflow's database did not answer: "
        f"{rows}); Airflow fails a running task once its last heartbeat is 120 s old ([scheduler] "
        "task_instance_heartbeat_timeout), then retries it if it has tries left"
    ], note
    # One question for every component's: each asks its connect timeout of a database that hangs.
    state["worker-default"] = {"restarts": 1, "last": killed["at"], "last_why": "exit 1", "killed": killed}
    asked.clear()
    notes = st.supervision_notes()
    assert len(asked) == 1 and "killed task process 7" in notes["worker-default"], (asked, notes)
    # The next restart killed nothing: the old record goes (that task was retried or failed since).
    monkeypatch.setattr(stack_mod.Stack, "start", lambda self, name, tasks=None: None)
    wanted["worker-gpu"] = True
    st._tend("worker-gpu", state, {}, due)
    due["worker-gpu"] = 0.0
    st._tend("worker-gpu", state, {}, due)
    assert state["worker-gpu"]["killed"] is None and len(st.supervision_notes()["worker-gpu"].splitlines()) == 1


def test_down_kills_what_dead_components_left_while_postgresql_still_answers(tmp_path, monkeypatch):
    """`down` killed the strays after it had stopped PostgreSQL: each line then said only that Airflow's
    database did not answer. They go first now, and once more after the components (a task process that
    outlived its worker's stop)."""
    st = stack_mod.Stack(tmp_path / "home")
    done = []
    monkeypatch.setattr(stack_mod.Stack, "stop_supervisor", lambda self: done.append("supervisor"))
    monkeypatch.setattr(stack_mod.Stack, "stop", lambda self, name, tasks=None: done.append(name))
    monkeypatch.setattr(stack_mod.Stack, "stop_strays", lambda self, tasks=None: done.append("strays") or [])
    st.down()
    assert done == ["supervisor", "strays", *reversed(stack_mod.COMPONENTS), "strays"]
    assert done.index("strays") < done.index("postgres")


def test_down_says_no_scheduler_sees_its_killed_tasks_until_up_which_names_them_with_airflow_s_word(
    tmp_path, monkeypatch, capsys
):
    """`down` said "then retries it (try 2 of 2) after its retry delay" with the scheduler gone with the
    stack; after the next `up`, neither `up` nor `status` named that task while Airflow showed it running,
    its pid dead, until its heartbeat timeout; and supervisor.log had no word of the down or the task."""
    monkeypatch.setenv("ENCODERFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SUDO_USER", raising=False)
    st = stack_mod.Stack()
    asked = []
    rows: dict[str, Any] = {TI_ID: fake_ti(queue="gpu")}
    monkeypatch.setattr(stack_mod.Stack, "task_instances", lambda self, ids: asked.append(ids) or rows)
    (tmp_path / "task.py").write_text(FAKE_TASK)
    # Left by a worker that died: what `down` kills last.
    stray = subprocess.Popen([sys.executable, str(tmp_path / "task.py")], cwd=st.root, start_new_session=True)
    try:
        wait_for("the stray task's title", lambda: stack_mod._task_instance_id(stray.pid) == TI_ID, 30, every=0.1)
        before = time.time()
        st.down()
        assert stray.wait(30) is not None
    finally:
        stray.kill()
        stray.wait()
    killed = (
        f"killed task process {stray.pid}: {DAG_ID} run manual__fake, task pretrain, try 1 of 3: the stack is going "
        "down, so Airflow sees it only after `up`: then it fails it once its last heartbeat is 120 s old "
        "([scheduler] task_instance_heartbeat_timeout) and retries it (try 2 of 3)"
    )
    assert capsys.readouterr().out.splitlines() == [
        f"stack: stopped 1 process(es) left running by components that had died: pids [{stray.pid}]",
        f"stack: {killed}",
    ]
    log = (st.logs / "supervisor.log").read_text().splitlines()
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert [ln[20:] for ln in log] == [f"down, asked by {user} (pid {os.getpid()})", killed], log
    last = rows[TI_ID] | {"try_number": 3}
    assert st.killed_task_lines({8: TI_ID}, going_down=True, found={TI_ID: last}) == [
        f"killed task process 8: {DAG_ID} run manual__fake, task pretrain, try 3 of 3: the stack is going down, so "
        "Airflow sees it only after `up`: then it fails it once its last heartbeat is 120 s old ([scheduler] "
        "task_instance_heartbeat_timeout): no tries left"
    ]

    # With PostgreSQL stopped Airflow has nothing new to say: `status` does not ask it.
    asked.clear()
    assert stack_mod.main(["status"]) == 1 and "last down" not in capsys.readouterr().out and not asked

    # `up` (its components stubbed: each wanted, PostgreSQL running) names it, with what Airflow has now.
    monkeypatch.setattr(stack_mod.Stack, "start", lambda self, name, tasks=None: self._want(name, True))
    monkeypatch.setattr(stack_mod.Stack, "start_supervisor", lambda self: None)
    monkeypatch.setattr(stack_mod.Stack, "alive", lambda self, name: name == "postgres")
    rows[TI_ID]["heartbeat"] = before - 200  # stale: the scheduler fails it at its next look
    at = stack_mod._clock(json.loads((st.sup / stack_mod.DOWN_KILLED).read_text())["at"])
    stack_mod.main(["up"])
    said = [ln for ln in capsys.readouterr().out.splitlines() if "killed task process" in ln]
    assert said == [
        f"  last down       {at} killed task process {stray.pid}: {DAG_ID} run manual__fake, task pretrain, try 1 "
        "of 3: Airflow keeps it running until its last heartbeat is 120 s old ([scheduler] "
        "task_instance_heartbeat_timeout), any moment now, then retries it (try 2 of 3) after its retry delay"
    ], said
    # Said by `status` until Airflow has it running no more, then once more, as it is; then no more.
    rows[TI_ID] = rows[TI_ID] | {"state": "failed", "current": False}
    stack_mod.main(["status"])
    said = [ln for ln in capsys.readouterr().out.splitlines() if "killed task process" in ln]
    assert said == [
        f"  last down       {at} killed task process {stray.pid}: {DAG_ID} run manual__fake, task pretrain, try 1 "
        "of 3: Airflow has it failed already"
    ], said
    stack_mod.main(["status"])
    assert "last down" not in capsys.readouterr().out and not (st.sup / stack_mod.DOWN_KILLED).exists()


def test_supervisor_log_records_each_operation_asked_for_once(tmp_path, monkeypatch, capsys):
    """supervisor.log, all an on-call has afterwards, had the supervisor's restarts only: a `stop`, `start`,
    `down` or `up` was not there, so a worker stopped on purpose read as one that had died."""
    monkeypatch.setenv("ENCODERFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SUDO_USER", raising=False)
    st = stack_mod.Stack()

    def sleeper(self, name=None):  # each component a process that ends on SIGTERM
        name = name or "postgres"  # PostgreSQL's pid is in its own file: never seen running here
        if name == "dag-processor":
            raise stack_mod.StackError("dag-processor exited; its log is dag-processor.log:\nTraceback")
        self._spawn(name, [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))

    for starter in ("_start_postgres", "_start_redis", "_start_mlflow"):
        monkeypatch.setattr(stack_mod.Stack, starter, lambda self, n=starter[7:]: sleeper(self, n))
    monkeypatch.setattr(stack_mod.Stack, "_start_airflow", sleeper)
    monkeypatch.setattr(stack_mod.Stack, "start_supervisor", lambda self: None)
    try:
        assert stack_mod.main(["start", "triggerer"]) == 0 and st.alive("triggerer")
        assert stack_mod.main(["stop", "triggerer"]) == 0 and not st.alive("triggerer")
        assert stack_mod.main(["start", "dag-processor"]) == 1
        with pytest.raises(stack_mod.StackError):
            st.up()  # its starts are `up`'s, not an operator's each: up to the dag-processor, which fails
        st.down()
    finally:
        st.down()
    capsys.readouterr()
    log = (st.logs / "supervisor.log").read_text().splitlines()
    asked = f"asked by {pwd.getpwuid(os.geteuid()).pw_name} (pid {os.getpid()})"
    assert [ln[20:] for ln in log] == [
        f"start triggerer, {asked}",
        f"stop triggerer, {asked}",
        f"start dag-processor, {asked}",
        "start dag-processor failed: dag-processor exited; its log is dag-processor.log:",
        f"up, {asked}",
        "up failed: dag-processor exited; its log is dag-processor.log:",
        f"down, {asked}",
        f"down, {asked}",
    ], log
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", ln) for ln in log), log  # as the supervisor's


def test_the_stack_heartbeat_timeout_is_compose_s_and_task_instances_asks_airflow_s_own_columns(tmp_path):
    """A lost task stayed `running` 300 s (Airflow's default); the stack's timeout is shorter, as compose's.
    Task instances are looked up by the columns Airflow's models have (its history's for earlier tries)."""
    import yaml

    st = stack_mod.Stack(tmp_path / "home")
    env = st.env("scheduler")
    assert env[stack_mod.HEARTBEAT_TIMEOUT_VAR] == str(stack_mod.TASK_HEARTBEAT_TIMEOUT_S) == "120"
    assert st.heartbeat_timeout() == 120 and all(
        st.env(r)[stack_mod.HEARTBEAT_TIMEOUT_VAR] == "120" for r in stack_mod.WORKERS
    )
    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yaml").read_text())
    assert compose["x-airflow-common"]["environment"][stack_mod.HEARTBEAT_TIMEOUT_VAR] == "120"
    check = (
        "from airflow.models.taskinstance import TaskInstance as T\n"
        "from airflow.models.taskinstancehistory import TaskInstanceHistory as H\n"
        "need = ['dag_id', 'run_id', 'task_id', 'map_index', 'try_number', 'max_tries', 'state', 'queue']\n"
        "assert all(c in T.__table__.c for c in need + ['id', 'last_heartbeat_at']), T.__table__.c.keys()\n"
        "assert all(c in H.__table__.c for c in need + ['task_instance_id']), H.__table__.c.keys()\n"
    )
    proc = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_mlflow_users_are_asked_for_before_being_created(tmp_path):
    """Every MLflow start created both users again: PostgreSQL logged `duplicate key value violates unique
    constraint "users_username_key"` and the INSERT with each password hash into postgres.log."""
    import http.server
    import threading

    seen = []

    class FakeMlflow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(("GET", self.path, self.headers["Authorization"]))
            exists = self.path.endswith("username=encoderflow-worker")
            body = {"user": {"username": "encoderflow-worker"}} if exists else {"error_code": "RESOURCE_DOES_NOT_EXIST"}
            self._answer(200 if exists else 404, body)

        def do_POST(self):  # noqa: N802
            seen.append(("POST", self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self._answer(200, {})

        def _answer(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), FakeMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        st = stack_mod.Stack(tmp_path / "home")
        st.ports["mlflow"] = server.server_address[1]
        st._mlflow_users()
    finally:
        server.shutdown()
    import base64

    admin = "Basic " + base64.b64encode(f"admin:{st.secrets['mlflow_admin']}".encode()).decode()
    assert seen == [
        ("GET", "/api/2.0/mlflow/users/get?username=encoderflow-worker", admin),
        ("GET", "/api/2.0/mlflow/users/get?username=encoderflow-reader", admin),
        (
            "POST",
            "/api/2.0/mlflow/users/create",
            {"username": "encoderflow-reader", "password": st.secrets["mlflow_reader"]},
        ),
    ], seen


def test_the_stack_logs_are_private_postgresql_s_included(tmp_path, monkeypatch):
    """postgres.log (statements it logs, with their values) was 0644 beside secrets.json's 0600."""
    st = stack_mod.Stack(tmp_path / "home")
    assert st.logs.stat().st_mode & 0o777 == (0o711 if st.as_postgres else 0o700)
    # Logs made before: each is made private as its component next starts.
    for name in ("postgres", "triggerer"):
        (st.logs / f"{name}.log").write_text("old\n")
        (st.logs / f"{name}.log").chmod(0o644)
    st._spawn("triggerer", [sys.executable, "-c", "print('hello')"], dict(os.environ))
    (data := st.root / "postgres").mkdir()
    (data / "PG_VERSION").write_text("16\n")  # an existing cluster: no initdb
    ran = []
    monkeypatch.setattr(stack_mod, "_pg_bin", lambda name: name)
    monkeypatch.setattr(stack_mod.Stack, "_run", lambda self, cmd, what, env=None: ran.append(what) or "")
    st._start_postgres()
    assert ran == [f"PostgreSQL start (log: {st.logs / 'postgres.log'})"]
    (st.logs / "fresh.log").unlink(missing_ok=True)
    with stack_mod._open_log(st.logs / "fresh.log") as f:
        f.write(b"x")
    for name in ("postgres", "triggerer", "fresh"):
        assert (st.logs / f"{name}.log").stat().st_mode & 0o777 == 0o600, name
    assert (st.logs / "postgres.log").read_text() == "old\n"
    st.stop("triggerer")
    # Redis's append-only file holds each queued task's Airflow token: its folder (0755 before) is private.
    (st.root / "redis").mkdir(mode=0o755)
    monkeypatch.setattr(stack_mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(stack_mod.Stack, "_spawn", lambda self, name, cmd, env: ran.append(name))
    monkeypatch.setattr(stack_mod.Stack, "_wait", lambda self, ready, name, timeout: None)
    st._start_redis()
    assert ran[-1] == "redis" and (st.root / "redis").stat().st_mode & 0o777 == 0o700


def test_up_says_each_component_ready_and_status_lists_what_stopped_components_left(tmp_path, monkeypatch, capsys):
    """`up` printed nothing for a minute until the table; `status` after a SIGKILLed gpu worker said
    only 'worker-gpu stopped' while the task it had started trained on."""
    _need_redis()
    monkeypatch.setenv("ENCODERFLOW_HOME", str(tmp_path / "home"))
    st = stack_mod.Stack()
    # In a session of its own, as Airflow starts a task (and without the terminal pytest may have).
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "airflow"], cwd=st.root, start_new_session=True
    )
    try:
        st.start("redis")
        assert re.fullmatch(rf"stack: redis ready \(pid {st._pid('redis')}, \d+ s\)\n", capsys.readouterr().out), (
            "no ready line"
        )
        assert stack_mod.main(["status"]) == 1  # most components stopped
        out = capsys.readouterr().out
        assert re.search(
            rf"^  stray +pid {stray.pid}: \S*python\S* -c import time; time.sleep\(60\) airflow$", out, re.M
        ), out
        assert "up SIGKILLs them before it starts worker-default, worker-gpu; down SIGKILLs them" in out, out
        st.stop("redis")
        assert not (st.pids / "redis.pid").exists()
    finally:
        st.stop("redis")
        stray.kill()
        stray.wait()


def _left_behind(st: stack_mod.Stack) -> list[str]:
    """Every live process of ``st``'s: in its folder, or naming it on its command line."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.cwd() == str(st.root) or any(str(st.root) in arg for arg in proc.cmdline()):
                found.append(f"{proc.pid} {stack_mod._command(proc.pid, 100)}")
    return found


def test_the_supervisor_restarts_a_killed_component_says_so_and_outlives_the_terminal_of_up(
    tmp_path, monkeypatch, capsys
):
    """Nothing watched the components: one that exited (the scheduler, when PostgreSQL went away) stayed
    down until someone ran `up` again. Started from a terminal that then closes, the supervisor restarts
    a SIGKILLed component, says so in `status` and its log, and waits longer when it dies again at once."""
    import pty
    import select

    _need_redis()
    home = tmp_path / "home"
    monkeypatch.setenv("ENCODERFLOW_HOME", str(home))
    st = stack_mod.Stack(home)
    # `up` in a terminal of its own (redis stands for the stack: the supervisor treats each alike).
    script = (
        f"from encoderflow import stack; s = stack.Stack({str(home)!r}); s.start('redis'); s.start_supervisor(); "
        "print('UP', flush=True); import time; time.sleep(300)"
    )
    term_pid, term = pty.fork()
    if term_pid == 0:  # the terminal's shell: never returns
        # As a terminal's shell has it: a test run under nohup would hand its ignored SIGHUP on.
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-c", script])
    try:
        said = b""
        deadline = time.monotonic() + 120
        while b"UP" not in said and time.monotonic() < deadline:
            if select.select([term], [], [], 1)[0]:
                said += os.read(term, 4096)
        assert b"UP" in said, said.decode(errors="replace")
        supervisor = st.supervisor_pid()
        os.close(term)  # the terminal window closes: SIGHUP to its session
        _, how = os.waitpid(term_pid, 0)
        assert os.WIFSIGNALED(how) and os.WTERMSIG(how) == signal.SIGHUP, how
        assert supervisor and stack_mod._running(supervisor) and st.alive("redis")

        def back_from(pid: int) -> int | None:
            new = st._pid("redis")
            return (
                new
                if new not in (None, pid) and stack_mod._redis_ping(st.ports["redis"], st.secrets["redis"])
                else None
            )

        first = st._pid("redis")
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        second = wait_for("redis to be restarted", lambda: back_from(first), 30, every=0.05)
        print(f"\nredis SIGKILLed: answering again {time.monotonic() - killed:.1f} s later (pid {second})")
        log = (st.logs / "supervisor.log").read_text()
        assert f"redis exited (killed by SIGKILL; its log: {st.logs / 'redis.log'}): restarting in 1 s" in log, log
        ready = "redis ready (pid"
        wait_for("the restart on record", lambda: (st.logs / "supervisor.log").read_text().count(ready) == 1, 30)
        assert st.restarts()["redis"]["restarts"] == 1
        # The terminal's start is recorded as asked for; the restart is the supervisor's, logged once.
        log = (st.logs / "supervisor.log").read_text()
        assert log.count("start redis, asked by ") == 1 and log.count("restarting redis ") == 1, log
        assert stack_mod.main(["status"]) == 1  # the rest of the stack is not running
        out = capsys.readouterr().out
        assert re.search(rf"^  supervisor +running \(pid {supervisor}\): restarts a component that exits", out, re.M)
        assert re.search(
            r"^  redis +running  log: .*\n {2}\s+restarted 1 time, last \d\d:\d\d:\d\d: killed by SIGKILL$", out, re.M
        ), out

        # Dead again at once: the pause doubles (a crash loop, e.g. PostgreSQL away, is not spun).
        os.kill(second, signal.SIGKILL)
        third = wait_for("redis to be restarted again", lambda: back_from(second), 30, every=0.1)
        wait_for("the restart on record", lambda: (st.logs / "supervisor.log").read_text().count(ready) == 2, 30)
        log = (st.logs / "supervisor.log").read_text()
        assert f"redis exited (killed by SIGKILL; its log: {st.logs / 'redis.log'}): restarting in 2 s" in log, log
        assert st.restarts()["redis"]["restarts"] == 2 and "failed" not in log, log
        assert third and stack_mod._running(supervisor) and st.supervisor_pid() == supervisor
    finally:
        with contextlib.suppress(OSError):
            os.kill(term_pid, signal.SIGKILL)
            os.waitpid(term_pid, 0)
        st.down()
    assert not _left_behind(st)


def test_one_supervisor_per_stack_a_component_stopped_on_purpose_stays_so_and_down_leaves_nothing(
    tmp_path, monkeypatch, capsys
):
    """A supervisor must not bring back what the user stopped, nor anything after `down`; two would race
    each other's restarts."""
    _need_redis()
    home = tmp_path / "home"
    monkeypatch.setenv("ENCODERFLOW_HOME", str(home))
    st = stack_mod.Stack(home)
    try:
        st.start("redis")
        supervisor = st.start_supervisor()
        assert st.start_supervisor() == supervisor
        # One started by hand (or by a second `up` at the same moment) finds the lock taken and leaves.
        other = subprocess.run(
            [sys.executable, "-m", "encoderflow.stack", "supervise"], capture_output=True, text=True, timeout=120
        )
        assert other.returncode == 0 and f"another supervisor (pid {supervisor}) keeps this stack" in other.stdout
        assert st.supervisor_pid() == supervisor

        assert stack_mod.main(["stop", "redis"]) == 0
        out = capsys.readouterr().out
        assert "stack: redis stopped; the supervisor leaves it so until `start redis` or `up`" in out, out
        time.sleep(stack_mod.RESTART_FIRST_S + 3)  # past the first restart's pause
        assert not st.alive("redis")
        assert stack_mod.main(["status"]) == 1
        assert re.search(
            r"^  redis +stopped  log: .*\n {2}\s+stopped on purpose: not restarted \(`start redis` or `up` starts it\)",
            capsys.readouterr().out,
            re.M,
        )
        assert stack_mod.main(["start", "redis"]) == 0 and st.alive("redis")
        capsys.readouterr()

        st.down()
        assert not stack_mod._running(supervisor) and not st.alive("redis")
        time.sleep(stack_mod.RESTART_FIRST_S + 2)  # nothing comes back
        assert not st.alive("redis") and st.supervisor_pid() is None
        assert not _left_behind(st), _left_behind(st)
        assert stack_mod.main(["status"]) == 1
        assert re.search(r"^  supervisor +stopped: a component that exits stays stopped", capsys.readouterr().out, re.M)
    finally:
        st.down()


def test_ports_are_chosen_by_variables_or_ports_json_and_a_bad_or_taken_one_is_refused(tmp_path, monkeypatch, capsys):
    """Ports were free ones picked at the first `up`; choosing them meant writing an undocumented file."""
    import socket

    _need_redis()
    home = tmp_path / "home"
    monkeypatch.setenv("ENCODERFLOW_HOME", str(home))
    for var in stack_mod.PORT_VARS.values():
        monkeypatch.delenv(var, raising=False)
    ports_json = home / "stack" / "ports.json"
    mine = stack_mod._free_port()
    # Written before the first `up`: what it names is kept, the rest is picked.
    ports_json.parent.mkdir(parents=True)
    ports_json.write_text(json.dumps({"redis": mine}))
    st = stack_mod.Stack()
    assert st.ports["redis"] == mine and set(st.ports) == set(stack_mod.PORT_VARS)
    assert json.loads(ports_json.read_text()) == st.ports

    start = stack_mod.Stack.start

    def nothing_starts(self, name):
        raise AssertionError(f"up started {name} with a port it should have refused")

    monkeypatch.setattr(stack_mod.Stack, "start", nothing_starts)

    def refused(**variables: str) -> str:
        for var, value in variables.items():
            monkeypatch.setenv(var, value)
        assert stack_mod.main(["up"]) == 1
        for var in variables:
            monkeypatch.delenv(var)
        return capsys.readouterr().err

    for bad in ("abc", "0", "70000", "80.5"):
        err = refused(ENCODERFLOW_STACK_API_PORT=bad)
        assert f"stack: ENCODERFLOW_STACK_API_PORT is {bad!r}: a port is a whole number from 1 to 65535" in err, err
    err = refused(ENCODERFLOW_STACK_API_PORT=str(mine))
    assert f"'redis' {mine} in {ports_json} and ENCODERFLOW_STACK_API_PORT={mine}: each needs a port of its own" in err
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        err = refused(ENCODERFLOW_STACK_MLFLOW_PORT=str(taken))
    assert (
        f"stack: mlflow cannot listen on 127.0.0.1:{taken} (ENCODERFLOW_STACK_MLFLOW_PORT={taken}): taken, "
        f"held by pid {os.getpid()} (" in err
    ), err
    assert "choose another with ENCODERFLOW_STACK_MLFLOW_PORT=PORT" in err
    assert json.loads(ports_json.read_text())["mlflow"] == st.ports["mlflow"]  # nothing refused was kept

    for text, said in (('{"redis": "six"}', "'redis' is 'six'"), ('{"broker": 1}', "keys are postgres, redis, api")):
        ports_json.write_text(text)
        assert stack_mod.main(["status"]) == 1 and said in capsys.readouterr().err
    ports_json.write_text(json.dumps(st.ports))

    # A good one is used, and kept for the next `up`.
    chosen = stack_mod._free_port()
    monkeypatch.setenv("ENCODERFLOW_STACK_REDIS_PORT", str(chosen))
    st = stack_mod.Stack()
    try:
        st._choose_ports()  # what `up` does first
        start(st, "redis")
        assert stack_mod._redis_ping(chosen, st.secrets["redis"])
        assert json.loads(ports_json.read_text())["redis"] == chosen == stack_mod.Stack().ports["redis"]
        # Moved under a running stack, every component's settings would point at the old one: refused.
        err = refused(ENCODERFLOW_STACK_REDIS_PORT=str(mine))
        assert f"ENCODERFLOW_STACK_REDIS_PORT={mine} (now {chosen}): the stack runs (redis)" in err, err
        assert "stop it (make stack-down), then start it with the new port" in err
    finally:
        st.down()


PROBE_WORKER = '''
"""A Celery worker configured as Airflow configures its own (DEFAULT_CELERY_CONFIG, from the environment)."""
import sys
import time
from pathlib import Path

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery import Celery

app = Celery("probe", config_source=dict(DEFAULT_CELERY_CONFIG, result_backend=None))  # no PostgreSQL here


@app.task(name="probe.train")
def train(marker):
    Path(marker).touch()
    time.sleep(120)


if __name__ == "__main__":  # the options `airflow celery worker` passes
    app.worker_main(["worker", "-O", "fair", "--queues", "gpu", "--concurrency", "1", "--loglevel", "INFO",
                     "--without-mingle", "--without-gossip"])
'''


def test_a_worker_killed_mid_task_leaves_no_message_for_redis_to_replay_a_day_later(tmp_path):
    """A SIGKILLed worker's message stayed in kombu's `unacked` set; past the 25 h visibility timeout Redis
    handed it to the gpu queue again and the worker logged `Invalid auth token` with a 70-line traceback.
    Acknowledged as the task starts, and nothing prefetched behind it, a killed worker leaves no message
    unacknowledged; a message it had not started stays queued."""
    _need_redis()
    import redis
    from celery import Celery

    st = stack_mod.Stack(tmp_path / "home")
    st.start("redis")
    (tmp_path / "probe.py").write_text(PROBE_WORKER)
    log = tmp_path / "worker.log"
    env = st.env("worker-gpu") | {"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, str(tmp_path / "probe.py")], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    db = redis.Redis(host="127.0.0.1", port=st.ports["redis"], password=st.secrets["redis"])
    try:
        wait_for("the probe worker", lambda: b" ready." in log.read_bytes() or worker.poll() is not None, 120)
        assert worker.poll() is None, log.read_text()[-3000:]
        sender = Celery(broker=env["AIRFLOW__CELERY__BROKER_URL"])
        for n in (1, 2):
            sender.send_task("probe.train", args=[str(tmp_path / f"task{n}")], queue="gpu")
        wait_for("the first task to run", (tmp_path / "task1").exists, 60, every=0.1)
        time.sleep(3)  # time to prefetch the second, were it prefetched
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)
        assert db.hlen("unacked") == 0, db.hgetall("unacked")  # what kombu redelivers after the timeout
        assert db.llen("gpu") == 1  # the second, never delivered, is still there for the next worker
        assert not (tmp_path / "task2").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        db.close()
        st.stop("redis")


def registry_state(st: stack_mod.Stack) -> tuple[str | None, list[dict[str, Any]], list[Any]]:
    """(champion version, champion moves, every version) as MLflow's admin sees them."""
    from mlflow.exceptions import RestException

    c = mlflow_client(st, "admin")
    try:
        model = c.get_registered_model(MODEL)
        versions = c.search_model_versions(f"name='{MODEL}'")
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None, [], []  # no run has registered anything yet
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
    from encoderflow import registry

    return model.aliases.get("champion"), registry.moves_in(model.tags), versions


def assert_clean_logs(client: Client, run_id: str) -> None:
    """A successful run: every task log readable through the API, none with an ERROR record."""
    for name, ti in client.tasks(run_id).items():
        task_id = ti["task_id"]
        status, lines = client.log(run_id, task_id, ti["try_number"])
        if ti["map_index"] >= 0:
            continue  # mapped logs share the task's endpoint with ?map_index; the unmapped ones suffice
        assert status == 200 and lines, f"{name}: log not readable ({status})"
        bad = [ln for ln in lines if ln.lower().startswith(("error", "critical"))]
        assert not bad, f"{name} try {ti['try_number']} logged errors on a successful run:\n" + "\n".join(bad[:5])


# The first run of the test below: its gpu worker is SIGKILLed just after pretrain's first backup (at step
# KILL_BACKUP_EVERY). Its task trains on, out of the worker, until the supervisor's restart kills it (here
# it had got to step 200-250, the retry resuming at 200); it must not reach the end of training first, or
# the retry has nothing to resume (it saves the last backup instead). The 950 steps and two validations
# after the first backup (~8 s here) are that margin, wider than the 800 steps and one validation of the
# 2 x 800-step run this replaced, at less training. Pretrain's steps cost ~5-8 ms each here: a run's time
# is its tasks' (start-up, imports, Airflow's scheduling), not its steps'.
KILL_EPOCHS, KILL_STEPS, KILL_BACKUP_EVERY = 2, 500, 50
# The seed of every run the slow tests trigger: the shard set is addressed by the data settings (the seed
# among them), so the first run builds it and every later run of the module reuses it (building took
# 75-95 s of each run). Each run differs in its pretrain settings: its own lineage, so each trains.
SEED = 5


def cli(st: stack_mod.Stack, *args: str) -> subprocess.Popen:
    """``encoderflow <args>`` started with only ENCODERFLOW_HOME set (no AIRFLOW*/MLFLOW* of ours)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW"))}
    return subprocess.Popen(
        [sys.executable, "-m", "encoderflow.cli", *args],
        env={**env, "ENCODERFLOW_HOME": str(st.home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def reap(*procs: subprocess.Popen) -> None:
    """Kill what a failed test left running of its commands."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def cli_done(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args[3:]} still running after {timeout:.0f} s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def backup_step(path: Path) -> int:
    """The step a pretrain backup was taken at: ``step-<12 digits>.weights.h5``."""
    return int(re.fullmatch(r"step-(\d{12})\.weights\.h5", path.name).group(1))


@pytest.mark.slow
def test_two_runs_at_once_through_a_scheduler_restart_a_killed_gpu_worker_and_an_mlflow_outage(deployed, request):
    """Two runs triggered at once, each fault met by the run that is at its stage (one smoke run
    costs about two minutes here, so the faults share two runs instead of one run each):

    - max_active_runs=1 queues the second run behind the first;
    - the scheduler is stopped (a gap with none at all) and started again once the first run's
      shards are sealed, the second still queued;
    - the gpu worker is SIGKILLed mid-pretrain of the first run: the retry resumes from its backup;
    - MLflow is stopped after the second run's gate: promote fails its first try naming the cause,
      retries once MLflow is back, and registers one version, never a half champion.

    Both runs succeed, in order, with clean logs (each task's last try); the champion moves once per
    blessed run.
    """
    st, client, tree = deployed
    t0 = time.monotonic()
    before, history_before, _ = registry_state(st)
    # Each run its own lineage (its pretrain settings): both train, on one shard set. The first backs up
    # every KILL_BACKUP_EVERY steps (a setting that leaves the model as it is), so it is killed early in
    # its first epoch, just after its first backup, with most of its KILL_EPOCHS x KILL_STEPS steps to train.
    first = client.trigger(
        smoke_conf(
            tree,
            seed=SEED,
            pretrain_epochs=KILL_EPOCHS,
            pretrain_steps_per_epoch=KILL_STEPS,
            overrides=[f"pretrain.backup_every_steps={KILL_BACKUP_EVERY}"],
        ),
        "faults 1",
    )
    second = client.trigger(smoke_conf(tree, seed=SEED), "faults 2")  # smoke's 2 x 50 steps: another lineage
    wait_for("the first run to start", lambda: client.run(first)["state"] == "running", 120)
    assert client.run(second)["state"] == "queued"

    wait_for("shards to be built", lambda: client.tasks(first)["seal_shards"]["state"] == "success", 400, every=0.5)
    st.stop("scheduler")
    time.sleep(5)  # tasks queued and running, no scheduler
    st.start("scheduler")
    print(f"\nscheduler restarted {time.monotonic() - t0:.0f} s into the first run, the second queued")
    assert client.run(second)["state"] == "queued"

    backups = st.home / "runs" / safe_run_id(first) / "pretrain" / "backup"
    # A complete backup: the one being written is a hidden temp file until it is renamed into place.
    # Looked for often: the kill lands as soon after it as can be, the orphan's training still far from its end.
    seen = wait_for(
        "pretrain's first backup", lambda: backups.is_dir() and sorted(backups.glob(BACKUP_GLOB)), 400, every=0.1
    )
    first_backup = backup_step(seen[0])
    assert 0 < first_backup < KILL_EPOCHS * KILL_STEPS, seen  # a backup mid-training, not the end of it
    assert client.tasks(first)["pretrain"]["state"] == "running"
    # The worker alone, as an operator's kill -9 or the OOM killer does: its task, in a process group of its
    # own, went on training, and the retry trained beside it in the same run folder until the run failed.
    os.kill(st._pid("worker-gpu"), signal.SIGKILL)
    killed = time.monotonic()
    print(
        f"SIGKILL gpu worker {killed - t0:.0f} s into the run, after the backup at step {first_backup} of "
        f"{KILL_EPOCHS * KILL_STEPS}; backups now: {sorted(p.name for p in backups.iterdir())}"
    )
    wait_for("the worker to be gone", lambda: not st.alive("worker-gpu"), 30, every=0.2)
    orphans = [pid for pid, _ in st.strays()]
    assert orphans, "the killed worker left no task running: this test no longer kills what an operator kills"
    # The supervisor starts it again, first SIGKILLing what its predecessor left training.
    supervised_ready(st, "worker-gpu", 1)
    assert not st.strays() and not any(stack_mod._running(p) for p in orphans)
    assert st.restarts()["worker-gpu"]["last_why"] == "killed by SIGKILL"
    assert finished(client, first) == "success"
    pretrain = client.tasks(first)["pretrain"]
    print(f"first run success {time.monotonic() - killed:.0f} s after the kill; pretrain try {pretrain['try_number']}")
    assert pretrain["try_number"] == 2, pretrain
    _, lines = client.log(first, "pretrain", 2)
    resumed = [ln for ln in lines if "pretrain: resuming epoch" in ln]
    assert resumed, "the retry did not resume from the backup:\n" + "\n".join(lines[-20:])
    epoch, step = map(int, re.search(rf"resuming epoch (\d+) at step (\d+) of {KILL_STEPS}\b", resumed[0]).groups())
    done = (epoch - 1) * KILL_STEPS + step - 1  # steps the backup it resumed from had trained
    # From the backup seen before the kill or a later one the orphan wrote, not from scratch; and a resume
    # mid-training (a backup at the end of training is saved, not resumed: no such line).
    assert first_backup <= done < KILL_EPOCHS * KILL_STEPS, (first_backup, resumed[0])
    print(resumed[0])

    wait_for("the second run's gate", lambda: client.tasks(second)["evaluate_and_gate"]["state"] == "success", 500, 0.2)
    st.stop("mlflow")
    down = time.monotonic()
    try:
        promote = wait_for(
            "promote to fail its first try",
            lambda: (ti := client.tasks(second)["promote"])["state"] in ("up_for_retry", "failed") and ti,
            300,
        )
        assert promote["try_number"] == 1 and promote["state"] == "up_for_retry", promote
        status, lines = client.log(second, "promote", 1)
        # The cause, in the log of the try that met the outage: MLflow could not be reached.
        cause = [
            ln for ln in lines if ln.startswith("error") and ("Connection refused" in ln or "MlflowException" in ln)
        ]
        assert cause, (status, lines[-30:])
        print(f"MLflow stopped after the second run's gate; promote try 1 {promote['state']}: {cause[0][:240]}")
    finally:
        st.start("mlflow")
    print(f"MLflow back after {time.monotonic() - down:.0f} s")
    assert finished(client, second) == "success"
    assert client.tasks(second)["promote"]["try_number"] >= 2
    print(f"two runs triggered at once: both succeeded, one after the other, in {time.monotonic() - t0:.0f} s")
    # The read-only commands checked below, each a process of its own: started now, they run beside the
    # checks of the logs and the registry (predict, which writes a serving copy, after prune's plan).
    prune = cli(st, "prune", "--dry-run", "--keep", "1", "--older-than", "0")
    runs = cli(st, "runs", "--json", "--limit", "0")
    request.addfinalizer(lambda: reap(prune, runs))

    r1, r2 = client.run(first), client.run(second)
    assert r2["start_date"] >= r1["end_date"], (r1, r2)
    assert_clean_logs(client, first)
    assert_clean_logs(client, second)

    champion, history, versions = registry_state(st)
    mine = [v for v in versions if v.tags.get("airflow.run_id") == second]
    assert len(mine) == 1, [(v.version, v.tags) for v in mine]  # the retry did not register twice
    moves = history[len(history_before) :]
    by_run = {v.version: v.tags.get("airflow.run_id") for v in versions}
    blessed = [
        rid
        for rid in (first, second)
        if json.loads((st.home / "runs" / safe_run_id(rid) / "summary.json").read_text())["gate"]["blessed"]
    ]
    moved_for = [by_run[m["to"]] for m in moves]
    assert sorted(moved_for) == sorted(blessed), (moves, blessed)  # once per blessed run, never otherwise
    assert all(m["from"] == (moves[i - 1]["to"] if i else before) for i, m in enumerate(moves)), moves
    assert champion == (moves[-1]["to"] if moves else before)
    champ = next(v for v in versions if v.version == champion)
    # The champion is a complete version: registered, its decision recorded and blessed.
    assert champ.status == "READY" and champ.tags.get("gate.blessed") == "true", (champ.version, champ.tags)

    # `encoderflow prune`, with only ENCODERFLOW_HOME set, asks this stack's Airflow (PostgreSQL) and
    # MLflow (with the workers' login): both runs are finished, and the champion's run stays.
    proc = cli_done(prune)
    predict = cli(st, "predict", "a wonderful, moving film")
    request.addfinalizer(lambda: reap(predict))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "make stack (PostgreSQL): " in proc.stdout and "none in flight" in proc.stdout, proc.stdout
    assert f"MLflow ({st.mlflow_url}): " in proc.stdout and f"{MODEL} v{champion} (champion)" in proc.stdout
    assert f"keep          run     runs/{safe_run_id(by_run[champion])}: " in proc.stdout, proc.stdout
    # `encoderflow runs` asks the same two: both runs succeeded, and the version the champion alias
    # points to is marked on the run that registered it (its summary names this MLflow as its store).
    proc = cli_done(runs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = {r["run_id"]: r for r in json.loads(proc.stdout)["runs"]}
    assert listed[first]["state"] == listed[second]["state"] == "success", proc.stdout[:3000]
    assert "champion" in listed[by_run[champion]]["aliases"], listed[by_run[champion]]
    # And `encoderflow predict` serves the stack's champion (it looked for an embedded store a stack home lacks).
    proc = cli_done(predict)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"MLflow: make stack's server at {st.mlflow_url}" in proc.stderr, proc.stderr
    assert f"models:/{MODEL}@champion (v{champion})" in proc.stderr and proc.stdout.count("\t") == 2, proc.stdout


@pytest.mark.slow
def test_the_stack_keeps_its_secrets_off_command_lines_and_its_database_to_its_owner(deployed):
    """PostgreSQL let any local user in as superuser over its socket (initdb --auth-local=trust), and
    MLflow's database password was on its command line, which ps shows every user."""
    st, _, _ = deployed
    mlflow_cmdline = Path(f"/proc/{st._pid('mlflow')}/cmdline").read_bytes()
    assert st.secrets["postgres_mlflow"].encode() not in mlflow_cmdline and b"postgresql" not in mlflow_cmdline
    hba = (st.root / "postgres" / "pg_hba.conf").read_text()
    local = [ln.split() for ln in hba.splitlines() if ln.startswith("local")]
    assert local and all(fields[-1] == "peer" for fields in local), local
    assert (st.root / "postgres-run").stat().st_mode & 0o777 == 0o700
    if os.geteuid() == 0:  # another OS user (nobody) asks for the superuser over the socket: refused
        probe = subprocess.run(
            ["runuser", "-u", "nobody", "--", stack_mod._pg_bin("psql"), "-h", str(st.root / "postgres-run"),
             "-p", str(st.ports["postgres"]), "-U", "postgres", "-c", "select 1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert probe.returncode != 0, probe.stdout


@pytest.mark.slow
def test_security_anonymous_mlflow_and_airflow_viewer(deployed):
    st, client, tree = deployed
    champion, _, _ = registry_state(st)
    assert champion, "an earlier test should have promoted a champion"
    from mlflow.exceptions import MlflowException

    for user, code in ((None, 401), ("encoderflow-reader", 403)):
        c = mlflow_client(st, user)
        try:
            with pytest.raises(MlflowException) as refused:
                c.set_registered_model_alias(MODEL, "champion", "1")
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
            os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        # Anonymous: not authenticated; the reader: authenticated, not allowed. Either mixed up is a broken setup.
        assert refused.value.get_http_status_code() == code, (user, refused.value)
    assert registry_state(st)[0] == champion  # nothing moved

    # A bare HTTP request with no credentials is refused before it reaches the registry.
    req = urllib.request.Request(
        st.mlflow_url + "/api/2.0/mlflow/registered-models/alias",
        data=json.dumps({"name": MODEL, "alias": "champion", "version": "1"}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as anon:
        urllib.request.urlopen(req, timeout=30)
    assert anon.value.code == 401

    status, runs = client("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=1&order_by=-start_date", user="viewer")
    assert status == 200 and runs["dag_runs"], (status, runs)
    run_id = runs["dag_runs"][0]["dag_run_id"]
    status, lines = client.log(run_id, "report", 1, user="viewer")
    assert status == 200 and lines, status
    status, body = client(
        "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": smoke_conf(tree)}, user="viewer"
    )
    assert status == 403, (status, body)
    status, body = client(
        "POST", f"/api/v2/dags/{DAG_ID}/clearTaskInstances", {"dry_run": True, "dag_run_id": run_id}, user="viewer"
    )
    assert status == 403, (status, body)
    status, page = client("GET", "/encoderflow/", user="viewer")
    assert status == 200 and "Encoderflow runs" in page and "signed in as viewer" in page, (status, page[:500])


@pytest.mark.slow
def test_a_month_of_champion_moves_fits_the_postgresql_registry(deployed, monkeypatch):
    """MLflow's PostgreSQL store keeps a tag's value in a VARCHAR(5000): one tag of the whole history
    failed about the 29th promotion after its alias had moved. Each move is a tag of its own now, and
    the moves recorded in the one tag before stay first."""
    from encoderflow import registry

    st, _, _ = deployed
    worker = "encoderflow-worker"  # the identity the pipeline's promote task uses
    monkeypatch.setenv("MLFLOW_TRACKING_URI", st.mlflow_url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", worker)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", st.secrets[stack_mod.MLFLOW_USERS[worker]])
    c = registry.client()
    name = "encoderflow-history-probe"  # its own model: the pipeline's champion is left alone
    # Before it exists the auth app answers its alias with 403: still "no champion", not an error.
    assert registry.champion(name) is None and registry.history(name) == []
    c.create_registered_model(name)
    run = c.create_run(registry._experiment_id(c))  # the experiment the worker logs candidates in
    for i in range(2):
        c.create_model_version(name, source=f"runs:/{run.info.run_id}/m{i}", run_id=run.info.run_id)

    def night(n: int) -> str:
        return f"gate blessed run scheduled__{datetime.date(2026, 10, 31) + datetime.timedelta(days=n)}T03:00:00+00:00"

    # A month of nightly promotions on record in the one tag, as much as the column held (each move
    # through basic auth costs seconds here, so the month is written at once); then three more nights.
    month = [registry._event("promote", "gate", night(n), "12"[n % 2], "12"[(n + 1) % 2]) for n in range(1, 31)]
    while len(json.dumps(month)) > registry.TAG_VALUE_MAX:  # the newest that fitted, as that tag kept them
        month = month[1:]
    c.set_registered_model_tag(name, registry.LEGACY_HISTORY_TAG, json.dumps(month))
    c.set_registered_model_alias(name, "champion", month[-1]["to"])
    expected = month[-1]["to"]
    for n in range(31, 34):
        version = "12"[(n + 1) % 2]
        registry.move_champion(name, version, expected, night(n), "gate")
        expected = version
    # And one with a reason only a script could give (the CLI refuses it): cut to fit, not refused.
    version = "12"[expected == "1"]
    registry.move_champion(name, version, expected, "é€" * 4000, "script")

    moves = registry.history(name)
    assert c.get_model_version_by_alias(name, "champion").version == version
    assert [m["reason"] for m in moves[:-1]] == [m["reason"] for m in month] + [night(n) for n in range(31, 34)]
    assert moves[-1]["reason"].endswith(" [cut]")
    tags = c.get_registered_model(name).tags
    assert max(len(v) for k, v in tags.items() if k.startswith(registry.MOVE_TAG)) <= registry.TAG_VALUE_MAX


@pytest.mark.slow
def test_a_killed_triggerer_and_a_postgresql_outage_mid_run_are_outlived(deployed, monkeypatch, capsys):
    """PostgreSQL stopped for 30 s while a run's pretrain ran: the scheduler, dag-processor and triggerer
    exited on `OperationalError` and stayed down, the run `running` for good with finetune never
    scheduled, until someone ran `up` again. The supervisor restarts what exits, as compose does."""
    st, client, tree = deployed
    monkeypatch.setenv("ENCODERFLOW_HOME", str(st.home))

    def say(line: str) -> None:  # past capsys, which reads `status`
        with capsys.disabled():
            print(line, flush=True)

    airflow_parts = ("scheduler", "dag-processor", "triggerer")
    before = {name: (st.restarts().get(name) or {}).get("restarts", 0) for name in stack_mod.COMPONENTS}

    # The run first: its first tasks (no deferred one: the triggerer has no part in them) go on while the
    # triggerer is killed and brought back. Its own lineage (2 x 400 pretrain steps), the shards reused.
    run = client.trigger(smoke_conf(tree, seed=SEED, pretrain_steps_per_epoch=400), "postgres outage")
    victim = st._pid("triggerer")
    os.kill(victim, signal.SIGKILL)
    killed, t0 = time.time(), time.monotonic()
    wait_for(
        "the triggerer to beat again",
        lambda: (
            st._pid("triggerer") not in (None, victim)
            and stack_mod._heartbeat_after(st.airflow_health(), "triggerer", killed)
        ),
        300,
        every=0.2,
    )
    say(f"\ntriggerer SIGKILLed: a heartbeat of its successor {time.monotonic() - t0:.1f} s later")
    capsys.readouterr()
    assert stack_mod.main(["status"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        rf"^  triggerer +running  log: .*\n {{2}}\s+restarted {before['triggerer'] + 1} times?, "
        r"last \d\d:\d\d:\d\d: killed by SIGKILL$",
        out,
        re.M,
    ), out

    def pretrain_running() -> bool:
        state = client.tasks(run).get("pretrain", {}).get("state")
        assert state in (None, "scheduled", "queued", "running"), f"pretrain {state} before the outage"
        return state == "running"

    wait_for("pretrain to run", pretrain_running, 600)
    # What the outage restarts, the triggerer's SIGKILL above aside.
    before = {name: (st.restarts().get(name) or {}).get("restarts", 0) for name in stack_mod.COMPONENTS}
    st.stop("postgres")  # on purpose: the supervisor leaves it down
    down = time.monotonic()
    # What QA saw: Airflow's own loops do not outlive their database.
    gone = wait_for(
        "an Airflow component to exit without its database",
        lambda: [n for n in airflow_parts if not st.alive(n)],
        60,
        every=0.5,
    )
    say(f"PostgreSQL stopped mid-pretrain; {', '.join(gone)} exited {time.monotonic() - down:.0f} s later")
    time.sleep(max(0.0, 30 - (time.monotonic() - down)))
    assert not st.alive("postgres")
    st.start("postgres")
    back = time.monotonic()

    def healthy() -> bool:
        health = st.airflow_health() or {}
        parts = [v for v in health.values() if isinstance(v, dict)]
        return all(st.status().values()) and bool(parts) and all(v.get("status") == "healthy" for v in parts)

    wait_for("every component running and Airflow healthy", healthy, 300)
    say(f"PostgreSQL back: every component running and healthy {time.monotonic() - back:.0f} s later")
    after = st.restarts()
    restarted = [n for n in airflow_parts if after[n]["restarts"] > before[n]]
    assert set(gone) <= set(restarted), (gone, after)
    assert stack_mod.main(["status"]) == 0
    out = capsys.readouterr().out
    for name in restarted:
        assert re.search(rf"^  {name} +running  log: .*\n {{2}}\s+restarted \d+ times?, last ", out, re.M), out
    log = (st.logs / "supervisor.log").read_text()
    # Each exit with its status (the watcher's, whoever started the component) and the log to read.
    for name in gone:
        exited = rf"{name} exited \((exit \d+|killed by SIG[A-Z]+); its log: {re.escape(str(st.logs / name))}\.log\)"
        assert re.search(exited, log), log

    assert finished(client, run, 900) == "success", client.tasks(run)
    say(f"the run succeeded {time.monotonic() - back:.0f} s after PostgreSQL came back")
