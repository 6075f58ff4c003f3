"""The production topology of ``docker-compose.yaml``, natively: ``make stack`` / ``make stack-down``.

PostgreSQL (Airflow's metadata DB, MLflow's store and MLflow's user store), Redis (the Celery
broker), Airflow's api-server, scheduler, dag-processor and triggerer, two Celery workers (queue
``default``; queue ``gpu``, one task at a time, for the ``gpu`` pool) and an MLflow tracking
server with basic auth and ``--serve-artifacts``: every process on loopback, every file under
``$ENCODERFLOW_HOME/stack``. Secrets are generated once into ``stack/secrets.json`` (mode 0600)
and ports are chosen once into ``stack/ports.json`` (or by you: ``ENCODERFLOW_STACK_<KEY>_PORT``), so
``up`` after ``down`` (or after a crash) brings back the same deployment with its data. Once ``up`` has
started everything, a supervisor (one per stack, in a session of its own) restarts any component that
exits, with a growing pause, as compose's ``restart: always`` does; ``stop NAME`` is the way to keep
one stopped, and ``down`` ends the supervisor before anything else.

    python -m encoderflow.stack up | down | status | env [ROLE] | start NAME | stop NAME

Sign-ins: Airflow ``admin`` and ``viewer`` (SimpleAuthManager roles ADMIN and VIEWER), MLflow
``admin``; workers write to MLflow as ``encoderflow-worker``, the api-server reads as
``encoderflow-reader``; an anonymous MLflow client is refused. Passwords: ``stack/secrets.json``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import glob
import io
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from encoderflow import layout, registry, runtime

AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
WORKERS = {"worker-default": ("default", 2), "worker-gpu": ("gpu", 1)}
# Start order; `down` stops in reverse.
COMPONENTS = ("postgres", "redis", "mlflow", *AIRFLOW_COMPONENTS, *WORKERS)
SECRETS = (
    "postgres_airflow",
    "postgres_mlflow",
    "redis",
    "airflow_admin",
    "airflow_viewer",
    "airflow_jwt",
    "airflow_api",
    "mlflow_admin",
    "mlflow_worker",
    "mlflow_reader",
    "mlflow_flask",
)
MLFLOW_USERS = {"encoderflow-worker": "mlflow_worker", "encoderflow-reader": "mlflow_reader"}
# What a process the stack started runs, by the first word of its command line (or of the title
# Airflow and Celery give it): in the stack folder, which each component's children inherit, a stray.
STACK_PROGRAMS = ("airflow", "celery", "mlflow", "gunicorn", "uvicorn")
DEBIAN_PACKAGES = ("postgresql", "redis-server")
# The Airflow settings (AIRFLOW__SECTION__KEY, without the prefix) whose value the topology needs, with
# why: the caller's value for one of them is ignored and `up` says so; every other one reaches every
# component, over the stack's defaults.
OWNED_SETTINGS = {
    "CORE__EXECUTOR": "the stack is a CeleryExecutor deployment",
    "CORE__AUTH_MANAGER": "the stack's logins are SimpleAuthManager's admin and viewer",
    "CORE__SIMPLE_AUTH_MANAGER_USERS": "the stack's logins are admin and viewer",
    "CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": "the stack's passwords are those in stack/secrets.json",
    "DATABASE__SQL_ALCHEMY_CONN": "the metadata DB is the stack's PostgreSQL",
    "CELERY__BROKER_URL": "the Celery broker is the stack's Redis",
    "CELERY__RESULT_BACKEND": "Celery's results are kept in the stack's PostgreSQL",
    "CELERY__CELERY_CONFIG_OPTIONS": "it would replace the stack's broker, result backend and acknowledgement",
    "CELERY__EXTRA_CELERY_CONFIG": "it would override the stack's broker, result backend and acknowledgement",
    "CELERY__TASK_ACKS_LATE": "late acks let Redis replay a killed worker's task a day later",
    "CORE__FERNET_KEY": "the stack generated it (stack/secrets.json) and its DB is encrypted with it",
    "API_AUTH__JWT_SECRET": "the stack generated it (stack/secrets.json) for every component",
    "API__SECRET_KEY": "the stack generated it (stack/secrets.json) for every component",
    "API__HOST": "the stack listens on 127.0.0.1 only",
    "API__PORT": "the api-server's port is the one in stack/ports.json",
    "API__BASE_URL": "the api-server is the one the stack started",
    "CORE__EXECUTION_API_SERVER_URL": "the workers report to the api-server the stack started",
    "CORE__DAGS_FOLDER": "the stack serves this repository's dags/",
    "CORE__PLUGINS_FOLDER": "the runs page is this repository's plugins/",
    "OPERATORS__DEFAULT_QUEUE": "worker-default reads queue 'default': tasks sent elsewhere would wait forever",
}
# How long a component may take to stop before `stop` says what it waits for.
QUIET_STOP_S = 2.0
# The title Airflow's task runner gives itself (``airflow worker -- <id>``, task_runner.startup): the id of
# one try of one task instance in Airflow's DB, the way to name a task process the stack kills. (Its
# environment is no help: the title overwrites it.)
TASK_TITLE = re.compile(r"airflow worker -- ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")
# The stack's [scheduler] task_instance_heartbeat_timeout (Airflow's default: 300 s), yours over it: how long
# a task whose worker died stays `running` before Airflow fails it and retries it. Each running task's
# supervisor (a process apart from the task, so training does not hold it up) heartbeats every 5 s
# ([workers] min_heartbeat_interval), and retries one that fails with a random back-off of up to 90 s
# ([workers] execution_api_retry_wait_max): 120 s outlives an api-server restart and a PostgreSQL outage of
# about half a minute without failing a live task; one failed wrongly is killed by its own supervisor (the
# next heartbeat is refused) and its retry resumes from its backup.
TASK_HEARTBEAT_TIMEOUT_S = 120
HEARTBEAT_TIMEOUT_VAR = "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"
# Keys of stack/ports.json, each with the variable that chooses it at `up`.
PORT_VARS = {
    "postgres": "ENCODERFLOW_STACK_POSTGRES_PORT",
    "redis": "ENCODERFLOW_STACK_REDIS_PORT",
    "api": "ENCODERFLOW_STACK_API_PORT",
    "mlflow": "ENCODERFLOW_STACK_MLFLOW_PORT",
}
# The component that listens on each port: checked free before it starts, so a taken port is named as
# such rather than found in a log after a crash.
LISTENS_ON = {"postgres": "postgres", "redis": "redis", "mlflow": "mlflow", "api-server": "api"}
# The supervisor's pause before restarting a component: doubling from the first, at most the second
# (compose's daemon doubles to a minute; half that keeps an outage's crash loop from outlasting the
# outage by much), back to the first once the component has run STABLE_S.
RESTART_FIRST_S, RESTART_MAX_S = 1.0, 30.0
STABLE_S = 30.0
# In the supervisor's folder: the task processes the last `down` killed ({"at": Unix time, "tasks": {pid: task
# instance id}}), for `up` and `status` to say what Airflow makes of them once it runs again.
DOWN_KILLED = "down-killed.json"
# How the tests' extra_env reaches the supervisor, which restarts components with it.
EXTRA_ENV_VAR = "ENCODERFLOW_STACK_EXTRA_ENV"
# What every component runs under (``python -c WATCHER exit_file log cmd...``): its parent for its whole
# life, so that an exit's status is known whoever started it (`up`'s process is long gone by then, and
# only a parent learns a status). The component gets a session of its own, as before; this watcher ignores
# the signals meant for it and leaves when it ends, having written its status.
WATCHER = """\
import json, os, signal, sys, time
exit_file, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
# Closed by a successful exec: the pid is told only then, so a signal sent at once reaches the program.
execd, failed = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.close(execd)
        os.setsid()
        for s in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_DFL)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.execvp(cmd[0], cmd)
    except BaseException as exc:
        os.write(2, f"cannot start {cmd[0]}: {exc}\\n".encode())
        os.write(failed, b"x")
    os._exit(127)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
os.close(failed)
os.read(execd, 1)
print(pid, flush=True)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
status = os.waitpid(pid, 0)[1]
code = os.waitstatus_to_exitcode(status)
why = f"exit {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
try:
    with open(exit_file + ".tmp", "w") as f:
        json.dump({"pid": pid, "why": why, "at": time.time()}, f)
    os.replace(exit_file + ".tmp", exit_file)
except OSError:
    pass
"""


class _Stopping(BaseException):
    """The supervisor was told to stop (``down``): out of whatever it is doing, not caught as a failure."""


class StackError(RuntimeError):
    """The stack cannot start or answer; the message names the component, its log and the fix."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_private(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _ports_example() -> str:
    return json.dumps({k: 15432 + i for i, k in enumerate(PORT_VARS)})


def _port_number(value, what: str) -> int:
    """``value`` as a TCP port (an int, or its digits from a variable), or a StackError naming ``what``."""
    port = int(value) if isinstance(value, str) and value.isdigit() else value
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise StackError(f"{what} is {value!r}: a port is a whole number from 1 to 65535")
    return port


def _port_problem(port: int) -> str | None:
    """Why nothing could listen on 127.0.0.1:``port`` now (taken, by whom; or not ours to take), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers bind: a port whose last connections linger in TIME_WAIT is free to them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            holder = ""
            with contextlib.suppress(Exception):
                import psutil

                pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid}
                holder = "".join(f", held by pid {pid} ({_command(pid, 80)})" for pid in sorted(pids))
            return f"{'taken' if exc.errno == errno.EADDRINUSE else exc.strerror}{holder}"
    return None


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    if shutil.which(name):
        return shutil.which(name)
    raise StackError(f"PostgreSQL's {name} is not installed: run `make stack-deps` (apt-get install postgresql)")


class Stack:
    """One native deployment under ``home/stack``.

    Args:
        home: ENCODERFLOW_HOME shared by every process.
        extra_env: settings added to every Airflow process (e.g. shorter heartbeat timeouts in tests).
    """

    def __init__(self, home: str | os.PathLike | None = None, extra_env: dict[str, str] | None = None):
        self.home = Path(home).resolve() if home else layout.home()
        self.root = self.home / "stack"
        self.logs, self.pids = self.root / "logs", self.root / "pids"
        self.extra_env = dict(extra_env or {})
        self.as_postgres = os.geteuid() == 0  # PostgreSQL refuses to run as root
        # The cluster's superuser is the OS user it runs as: peer authentication on its socket.
        self.pg_superuser = "postgres" if self.as_postgres else pwd.getpwuid(os.geteuid()).pw_name
        for d in (self.root, self.logs, self.pids):
            d.mkdir(parents=True, exist_ok=True)
        # The logs are the stack's own (PostgreSQL's quotes statements; each is 0600 too): only PostgreSQL,
        # run as user postgres, needs a way in, to its own.
        with contextlib.suppress(OSError):
            self.logs.chmod(0o711 if self.as_postgres else 0o700)
        self.secrets = self._load_or_make(
            "secrets.json", lambda: {k: _new_secret(k) for k in SECRETS} | {"fernet": _fernet_key()}
        )
        self.ports = self._load_ports()
        # The supervisor's folder: its pid and lock, its state for `status`, which components are wanted
        # running, each component's last exit (written by its watcher) and a lock per component.
        self.sup = self.root / "supervisor"
        self._locks: dict[str, list] = {}
        self._spawning, self._stop_pending = False, False
        # The operation under way in this process ("up", "stop worker-gpu", "supervise"): the outermost
        # one is recorded in supervisor.log, and `down`'s kills say that no scheduler is left to see them.
        self._doing: str | None = None

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    def _load_ports(self) -> dict[str, int]:
        """``stack/ports.json``, checked; the keys it lacks (all of them the first time) get free ports."""
        path = self.root / "ports.json"
        try:
            ports = json.loads(path.read_text()) if path.exists() else {}
        except ValueError as exc:
            raise StackError(f"{path} is not JSON ({exc}): write it as {_ports_example()}") from None
        if not isinstance(ports, dict) or set(ports) - set(PORT_VARS):
            raise StackError(f"{path}: keys are {', '.join(PORT_VARS)}, each a port: {_ports_example()}")
        for key, value in ports.items():
            _port_number(value, f"{path}: {key!r}")
        missing = {k: _free_port() for k in PORT_VARS if k not in ports}
        if missing:
            ports |= missing
            _write_private(path, {k: ports[k] for k in PORT_VARS})
        return {k: ports[k] for k in PORT_VARS}

    def _choose_ports(self) -> None:
        """Apply the ``ENCODERFLOW_STACK_<KEY>_PORT`` variables to ``stack/ports.json`` and check that each
        port of a component not running is free on 127.0.0.1, before `up` starts anything."""
        path = self.root / "ports.json"
        chosen = {
            key: _port_number(os.environ[var].strip(), var)
            for key, var in PORT_VARS.items()
            if os.environ.get(var, "").strip()
        }
        moved = {k: p for k, p in chosen.items() if self.ports[k] != p}
        running = [name for name, up in self.status().items() if up]
        if moved and running:
            # Every component has the ports in its environment: one moved under them would cut them off.
            said = ", ".join(f"{PORT_VARS[k]}={p} (now {self.ports[k]})" for k, p in moved.items())
            raise StackError(
                f"{said}: the stack runs ({', '.join(running)}) on the ports of {path}: "
                "stop it (make stack-down), then start it with the new port"
            )
        ports = self.ports | chosen

        def source(key: str) -> str:
            return f"{PORT_VARS[key]}={ports[key]}" if key in chosen else f"{key!r} {ports[key]} in {path}"

        owner: dict[int, str] = {}
        for key, port in ports.items():
            if port in owner:
                raise StackError(f"{source(owner[port])} and {source(key)}: each needs a port of its own")
            owner[port] = key
        for name, key in LISTENS_ON.items():
            if not self.alive(name) and (why := _port_problem(ports[key])):
                raise StackError(
                    f"{name} cannot listen on 127.0.0.1:{ports[key]} ({source(key)}): {why}; "
                    f"choose another with {PORT_VARS[key]}=PORT, or stop what holds it"
                )
        if moved:
            self.ports = ports
            _write_private(path, ports)
            print(f"stack: ports now {json.dumps(ports)} ({path})", flush=True)

    def _load_or_make(self, name: str, make) -> dict:
        path = self.root / name
        if path.exists():
            return json.loads(path.read_text())
        data = make()
        _write_private(path, data)
        return data

    # -- environment ---------------------------------------------------------------------------
    def _pg_url(self, user: str, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://{user}:{self.secrets['postgres_' + user]}@127.0.0.1:{self.ports['postgres']}/{db}"

    def env(self, role: str = "worker-default") -> dict[str, str]:
        """The environment of one Airflow process (``role`` picks its MLflow credentials)."""
        from encoderflow.cli import dags_folder, repo_root

        airflow_home = self.root / "airflow"
        # Other AIRFLOW* and MLFLOW_TRACKING* variables (AIRFLOW_HOME, a tracking server) would point the
        # components at another deployment.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_TRACKING"))}
        env |= {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(airflow_home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self._pg_url("airflow", "airflow", "postgresql+psycopg2"),
            "AIRFLOW__CELERY__RESULT_BACKEND": self._pg_url("airflow", "airflow", "db+postgresql+psycopg2"),
            "AIRFLOW__CELERY__BROKER_URL": f"redis://:{self.secrets['redis']}@127.0.0.1:{self.ports['redis']}/0",
            # Longer than the longest execution_timeout (pretrain, 24 h): the broker never redelivers a
            # task that is still running (with the acks below, one only between its fetch and its start).
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "90000",
            # Acknowledged as it starts (Celery's default; Airflow's is late) and fetched only when a pool
            # process is free: a worker killed mid-task left its message, and one prefetched behind it,
            # unacknowledged in Redis, and past the visibility timeout kombu handed it to a worker again,
            # a day after Airflow had retried the task, to fail on its expired token ("Invalid auth
            # token"). A lost task is Airflow's to retry (task heartbeat and queued timeouts), not the
            # broker's to replay.
            "AIRFLOW__CELERY__TASK_ACKS_LATE": "False",
            "AIRFLOW__CELERY__EXTRA_CELERY_CONFIG": json.dumps({"worker_disable_prefetch": True}),
            "AIRFLOW__CORE__FERNET_KEY": self.secrets["fernet"],
            "AIRFLOW__API_AUTH__JWT_SECRET": self.secrets["airflow_jwt"],
            "AIRFLOW__API__SECRET_KEY": self.secrets["airflow_api"],
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.ports["api"]),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": self.airflow_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.airflow_url}/execution/",
            "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": runtime.WORKER_API_RETRIES,
            HEARTBEAT_TIMEOUT_VAR: str(TASK_HEARTBEAT_TIMEOUT_S),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder()),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(repo_root() / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # As `make airflow`: a trigger runs (paused, it sat in "queued" with no word why). Runs on a
            # schedule only with ENCODERFLOW_SCHEDULE set. The compose file pauses: production's choice.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
            "ENCODERFLOW_HOME": str(self.home),
            "ENCODERFLOW_MLFLOW_UI_URL": self.mlflow_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            # Airflow's retries wait out a longer outage; MLflow's own back-off would hold the worker.
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
            "KERAS_BACKEND": runtime.BACKEND,
            "GX_ANALYTICS_ENABLED": "false",
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        }
        env |= {k: v for k, v in os.environ.items() if k.startswith("AIRFLOW__") and _owned(k) is None}
        user = {"api-server": "encoderflow-reader"}.get(role, "encoderflow-worker" if role in WORKERS else None)
        if user:
            env |= {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": self.secrets[MLFLOW_USERS[user]]}
        return env | self.extra_env

    def ignored_settings(self) -> dict[str, str]:
        """The caller's Airflow settings that :meth:`env` overrides with the stack's, each with why.

        Returns:
            Variable name to reason; one that already has the stack's value is left out.
        """
        ours = self.env()
        return {
            k: why
            for k, v in sorted(os.environ.items())
            if k.startswith("AIRFLOW__") and (why := _owned(k)) is not None and ours.get(k) != v
        }

    # -- processes -----------------------------------------------------------------------------
    def _pid(self, name: str) -> int | None:
        if name == "postgres":
            pidfile = self.root / "postgres" / "postmaster.pid"
        elif name == "supervisor":
            pidfile = self.sup / "pid"
        else:
            pidfile = self.pids / f"{name}.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        if not _running(pid):
            return None
        # A pid file outlives its process, and the number comes back as another process: only the one
        # started then counts (status said "running" for another, and down killed it).
        recorded = pidfile.read_text().split()
        if name != "postgres" and len(recorded) > 1 and recorded[1] != _start_time(pid):
            return None
        return pid

    def strays(self) -> list[tuple[int, str]]:
        """Processes this stack started that outlived their component, each as (pid, start time): a
        program of the stack (Python, or the title Airflow and Celery give theirs) running in the stack
        folder (every component's working directory, which its children inherit) with no live
        component among its ancestors. A Celery worker killed alone leaves its task training (Airflow's
        task runner is in a process group of its own, out of reach of the worker's); Airflow's retry
        then trained beside it in the same run folder. (An environment mark would not do: those titles
        overwrite it.)"""
        import psutil

        leaders = {pid for c in COMPONENTS if (pid := self._pid(c)) is not None}
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.pid == os.getpid() or proc.cwd() != str(self.root) or not _stack_program(proc.cmdline()):
                    continue
                # A person's command (an `airflow` CLI run from the stack folder) has a terminal; every
                # component starts in a new session, without one, and so do its children.
                if proc.terminal() is not None:
                    continue
                # Asked of each process, not of a list of the components' children taken before: a
                # child forked meanwhile (a task the live worker just started) is still theirs.
                if proc.pid in leaders or any(a.pid in leaders for a in proc.parents()):
                    continue
                found.append((proc.pid, _start_time(proc.pid)))
        return found

    def stray_report(self) -> list[str]:
        """Lines for ``status``: each of :meth:`strays` (pid and command), then what ``up`` and ``down`` do
        about them; none when there are none."""
        found = self.strays()
        if not found:
            return []
        lines = [f"  {'stray':<15} pid {pid}: {_command(pid)}" for pid, _ in found]
        stopped = [w for w in WORKERS if not self.alive(w)]
        up = (
            f"up SIGKILLs them before it starts {', '.join(stopped)}"
            if stopped
            else "up leaves them (no worker to start)"
        )
        return [
            *lines,
            f"  processes left by components that died (a killed worker's task trains on): {up}; down SIGKILLs them",
        ]

    def stop_strays(self, timeout: float = 30, tasks: dict[int, str] | None = None) -> list[int]:
        """SIGKILL the :meth:`strays` and wait up to ``timeout`` seconds for them to go; returns their pids.
        Each that was an Airflow task is added to ``tasks`` (pid: task instance id) for
        :meth:`killed_task_lines`.

        Not SIGTERM first: Airflow's task runner forwards it to the task, and a training task went on to
        its end (measured: its retry found the encoder finished), writing while Airflow retried it.
        Airflow has given up on these tasks already; the retry resumes from their last backup. A pid is
        signalled only while its start time is the one seen: its number may belong to another by then.
        """
        killed = []
        for pid, started in self.strays():
            if _start_time(pid) == started:
                ti = _task_instance_id(pid)  # read before the kill: a dead process has no title
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, started))
                    if ti and tasks is not None:
                        tasks[pid] = ti
        deadline = time.monotonic() + timeout
        while any(_start_time(p) == t and _running(p) for p, t in killed) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [pid for pid, _ in killed]

    def alive(self, name: str) -> bool:
        return self._pid(name) is not None

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        """Start ``cmd`` under its :data:`WATCHER`, in a session of its own (`stop` ends its process group
        with it), and record its pid (the component's, not the watcher's)."""
        log = self.logs / f"{name}.log"
        exits = self.sup / "exits"
        exits.mkdir(parents=True, exist_ok=True)
        # A SIGTERM to the supervisor (`down`) waits for this: a component started and not yet in its pid
        # file would be one `down` cannot find.
        self._spawning = True
        try:
            with _open_log(log) as err:
                watcher = subprocess.Popen(
                    [sys.executable, "-c", WATCHER, str(exits / f"{name}.json"), str(log), *cmd],
                    env=env,
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    start_new_session=True,
                )
            with watcher.stdout:
                line = watcher.stdout.readline()
            if not line.strip().isdigit():
                raise StackError(f"{name} did not start (its watcher exited {watcher.wait()}); its log is {log}")
            pid = int(line)
            _write_pidfile(self.pids / f"{name}.pid", pid)
        finally:
            self._spawning = False
        if self._stop_pending:
            raise _Stopping

    def _as_postgres(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if self.as_postgres else cmd

    def _run(self, cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=self.root)
        if proc.returncode != 0:
            raise StackError(f"{what} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}")
        return proc.stdout

    def start(self, name: str, tasks: dict[int, str] | None = None) -> None:
        """Start one component unless it runs; waits until it answers. From now on the supervisor keeps
        it running (until :meth:`stop`). Each Airflow task process it kills first (left by the exited
        one) is added to ``tasks`` (pid: task instance id)."""
        if name not in COMPONENTS:
            raise StackError(f"no component {name!r}: one of {', '.join(COMPONENTS)}")
        # One start at a time per component: yours and the supervisor's restart would both spawn one.
        with self._operation(f"start {name}"), self._lock(name):
            self._want(name, True)
            if self.alive(name):
                return
            killed: dict[int, str] = {}
            if left := self._stop_remnants(name, killed):
                # In compose the container's other processes die with its main one; here they kept its port.
                print(f"stack: stopped {len(left)} process(es) the exited {name} left in its group: pids {left}")
            if name in WORKERS and (left := self.stop_strays(tasks=killed)):
                # Airflow retries what they ran (resuming from its backups), once its heartbeat timeout passes.
                print(f"stack: stopped {len(left)} process(es) a stopped component left running (tasks): pids {left}")
            self._tell_killed(killed)
            if tasks is not None:
                tasks.update(killed)
            if name in LISTENS_ON and (why := _port_problem(port := self.ports[LISTENS_ON[name]])):
                var = PORT_VARS[LISTENS_ON[name]]
                raise StackError(
                    f"{name} cannot listen on 127.0.0.1:{port} (stack/ports.json): {why}; stop what holds it, "
                    f"or move the stack to another port ({var}=PORT at `up`, from stopped)"
                )
            began = time.monotonic()
            start = getattr(self, "_start_" + name.replace("-", "_"), None)
            if start:
                start()
            else:
                self._start_airflow(name)
            # `up` takes a minute or more: a line per component says it is getting on.
            print(f"stack: {name} ready (pid {self._pid(name)}, {time.monotonic() - began:.0f} s)", flush=True)

    def stop(
        self, name: str, sig: int = signal.SIGTERM, timeout: float = 60, tasks: dict[int, str] | None = None
    ) -> None:
        """Stop one component and every process it started; SIGKILL after ``timeout`` seconds. Stopped on
        purpose: the supervisor leaves it stopped until :meth:`start` or :meth:`up`. Each Airflow task
        process killed with it is added to ``tasks`` (pid: task instance id)."""
        if name not in COMPONENTS:
            raise StackError(f"no component {name!r}: one of {', '.join(COMPONENTS)}")
        with self._operation(f"stop {name}"):
            self._stop(name, sig, timeout, tasks)

    def _stop(self, name: str, sig: int, timeout: float, tasks: dict[int, str] | None) -> None:
        # Under the lock: a restart the supervisor is in finishes first, and the stop below ends it.
        with self._lock(name):
            self._want(name, False)
        pid = self._pid(name)
        if pid is None:
            self._forget(name)  # a crash's, or the number of another process by now
            return
        if name == "postgres":
            self._run(
                self._as_postgres([_pg_bin("pg_ctl"), "-D", str(self.root / "postgres"), "-m", "fast", "stop"]),
                "pg_ctl stop",
            )
            return
        # The whole tree, not only the group: Airflow's task supervisor starts each task in a session
        # of its own, and a lost worker machine takes its tasks with it. Read before the signal: an
        # orphan is re-parented to init and out of reach.
        tree = descendants(pid)
        running = {p: ti for p in tree if (ti := _task_instance_id(p))}
        # A worker's tasks are its pool processes' children (Airflow's task supervisor forks each).
        busy = name in WORKERS and (bool(running) or len(tree) > len(_children(pid)))
        for target in [pid, *tree] if sig == signal.SIGKILL else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        began = time.monotonic()
        said = False
        while self.alive(name) and time.monotonic() < began + timeout:
            if not said and time.monotonic() > began + QUIET_STOP_S:
                # Celery's warm shutdown waits for the running task (31-77 s measured): silence read as a hang.
                # An idle worker's few seconds are nothing to announce.
                if busy or name not in WORKERS:
                    doing = "is finishing its running task" if busy else "is shutting down"
                    print(
                        f"stack: {name} (pid {pid}) {doing}: waiting up to {timeout:.0f} s, then killing it", flush=True
                    )
                said = True
            time.sleep(0.2)
        if self.alive(name) or sig == signal.SIGKILL:
            if self.alive(name) and sig != signal.SIGKILL:
                print(f"stack: {name} (pid {pid}) still running after {timeout:.0f} s: killed", flush=True)
            # The tasks still running now are killed with it (all of them, SIGKILLed at once); Airflow learns
            # of it only from its heartbeat timeout.
            if sig != signal.SIGKILL:
                running = {p: ti for p, ti in running.items() if _task_instance_id(p) == ti}
            for target in [pid, *tree]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while self.alive(name):
                time.sleep(0.1)
            # And its tasks: SIGKILL is delivered, not awaited, and a task releasing gigabytes of (GPU) memory
            # takes a moment to go. `down` returning while one still held them, a restart collided with it.
            deadline = time.monotonic() + 10
            while any(_running(p) for p in tree) and time.monotonic() < deadline:
                time.sleep(0.1)
            self._tell_killed(running)
            if tasks is not None:
                tasks.update(running)
        self._forget(name)

    def _forget(self, name: str) -> None:
        # PostgreSQL removes its postmaster.pid itself.
        if name != "postgres":
            (self.pids / f"{name}.pid").unlink(missing_ok=True)

    def up(self) -> None:
        """Start every component that is not running, in dependency order (idempotent), then the
        supervisor that keeps them running."""
        with self._operation("up"):
            for var, why in self.ignored_settings().items():
                print(f"stack: ignoring {var} from your environment: {why}", flush=True)
            self._choose_ports()
            if not any(self.status().values()):
                # A stack made when the JWT key was 24 bytes (PyJWT warned on every token: below 64 for
                # SHA-512): a longer one, only while nothing runs that holds the old one.
                weak = {k: _new_secret(k) for k in SECRETS if k not in self.secrets}  # none yet: made now
                if len(self.secrets.get("airflow_jwt", "")) < 64:  # the others are in PostgreSQL's and MLflow's stores
                    weak["airflow_jwt"] = _new_secret("airflow_jwt")
                if weak:
                    self.secrets |= weak
                    _write_private(self.root / "secrets.json", self.secrets)
            for name in COMPONENTS:
                self.start(name)
            self.start_supervisor()

    def down(self) -> None:
        """Stop the supervisor, what dead components left (SIGKILL), then every component. The task processes
        it kills are kept (:data:`DOWN_KILLED`) for ``up`` and ``status`` to say what Airflow makes of them."""
        with self._operation("down"):
            # The supervisor first: it would start again each component stopped below.
            self.stop_supervisor()
            killed: dict[int, str] = {}

            def sweep() -> None:
                left_tasks: dict[int, str] = {}
                if left := self.stop_strays(tasks=left_tasks):
                    print(
                        f"stack: stopped {len(left)} process(es) left running by components that had died: pids {left}"
                    )
                self._tell_killed(left_tasks)
                killed.update(left_tasks)

            # What dead components left goes while PostgreSQL is up: Airflow's database then says what each
            # was running (swept last, every line said only that the database did not answer).
            sweep()
            for name in reversed(COMPONENTS):
                self.stop(name, tasks=killed)
            sweep()  # a task process that outlived its component's stop
            # Airflow has them running until a scheduler sees their heartbeats stop, after `up`: that is when
            # they are news, and nothing else would name them then.
            if killed:
                self.sup.mkdir(parents=True, exist_ok=True)
                record = {"at": time.time(), "tasks": {str(pid): ti for pid, ti in sorted(killed.items())}}
                _write_private(self.sup / DOWN_KILLED, record)
            else:
                (self.sup / DOWN_KILLED).unlink(missing_ok=True)

    def status(self) -> dict[str, bool]:
        return {name: self.alive(name) for name in COMPONENTS}

    # -- supervision ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, name: str):
        """Hold the lock of component ``name`` (re-entrant in this process; across processes, flock)."""
        import fcntl

        if held := self._locks.get(name):
            held[1] += 1
            try:
                yield
            finally:
                held[1] -= 1
            return
        (self.sup / "locks").mkdir(parents=True, exist_ok=True)
        with open(self.sup / "locks" / name, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            self._locks[name] = [f, 1]
            try:
                yield
            finally:
                del self._locks[name]

    def _want(self, name: str, wanted: bool) -> None:
        mark = self.sup / "wanted" / name
        if wanted:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
        else:
            mark.unlink(missing_ok=True)

    def wanted(self, name: str) -> bool:
        """Whether ``name`` was started and not stopped since: the supervisor restarts it if it exits."""
        return (self.sup / "wanted" / name).exists()

    @contextlib.contextmanager
    def _operation(self, what: str):
        """Do ``what`` (``up``, ``down``, ``start NAME``, ``stop NAME``), asked for on purpose: recorded in
        supervisor.log beside the supervisor's restarts, or the log reads as if the stack had crashed. Only
        the outermost is (``up``'s starts are ``up``), and none in the supervisor, which logs its own."""
        if self._doing is not None:
            yield
            return
        self._doing = what
        self._record([f"{what}, asked by {_user()} (pid {os.getpid()})"])
        try:
            yield
        except StackError as exc:
            self._record([f"{what} failed: {(str(exc).splitlines() or [type(exc).__name__])[0]}"])
            raise
        finally:
            self._doing = None

    def _record(self, lines: list[str]) -> None:
        """Append ``lines`` to supervisor.log as :func:`_log` writes them. The supervisor's own output is that
        log already: from it, nothing (its restarts log what they print)."""
        if not lines or self._doing == "supervise":
            return
        # One write, appended: the supervisor writes to the same file meanwhile. A log that cannot be
        # written must not fail the stop it records.
        with contextlib.suppress(OSError), _open_log(self.logs / "supervisor.log") as log:
            log.write("".join(f"{_stamped(line)}\n" for line in lines).encode())

    def _tell_killed(self, tasks: dict[int, str]) -> None:
        """Print :meth:`killed_task_lines` of ``tasks`` and record them in supervisor.log."""
        lines = self.killed_task_lines(tasks, going_down=self._doing == "down")
        for line in lines:
            print(f"stack: {line}", flush=True)
        self._record(lines)

    def _recorded_pid(self, name: str) -> int | None:
        """The pid in ``name``'s pid file, live or not: a dead one says whose exit and group to look at."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.pids / f"{name}.pid").read_text().split()[0])
        return None

    def _stop_remnants(self, name: str, tasks: dict[int, str] | None = None) -> list[int]:
        """SIGKILL what the exited ``name`` left in its process group (its children: MLflow's and the
        api-server's web workers kept their port, a worker's pool processes); returns their pids, and adds
        each that was an Airflow task to ``tasks``. A member counts only while its working directory is the
        stack folder, which an unrelated group that got the number after every member died lacks."""
        import psutil

        dead = self._recorded_pid(name)
        if dead is None or self.alive(name):
            return []
        left = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.pid != os.getpid() and os.getpgid(proc.pid) == dead and proc.cwd() == str(self.root):
                    ti = _task_instance_id(proc.pid)
                    os.kill(proc.pid, signal.SIGKILL)
                    left.append(proc.pid)
                    if ti and tasks is not None:
                        tasks[proc.pid] = ti
        deadline = time.monotonic() + 30
        while any(_running(p) for p in left) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def last_exit(self, name: str, pid: int, wait: float = 0) -> str | None:
        """How process ``pid`` of ``name`` ended ("exit 1", "killed by SIGKILL"), as its watcher wrote it;
        None when nothing says (PostgreSQL: pg_ctl starts it detached). Waits up to ``wait`` seconds: the
        watcher writes it just after the exit."""
        deadline = time.monotonic() + wait
        while True:
            with contextlib.suppress(OSError, ValueError):
                rec = json.loads((self.sup / "exits" / f"{name}.json").read_text())
                if rec.get("pid") == pid:
                    return rec["why"]
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def heartbeat_timeout(self) -> int:
        """The scheduler's ``[scheduler] task_instance_heartbeat_timeout`` in seconds (the stack's, or yours)."""
        value = self.env("scheduler").get(HEARTBEAT_TIMEOUT_VAR, "").strip()
        return int(value) if value.isdigit() else 300  # Airflow's default

    def task_instances(self, ids: list[str]) -> dict[str, dict] | str:
        """What Airflow's DB says of each task instance try in ``ids`` (the ids of :data:`TASK_TITLE`): its
        ``dag_id``, ``run_id``, ``task_id``, ``map_index``, ``try_number``, ``max_tries``, ``state``,
        ``queue``, ``heartbeat`` (its last, Unix time, or None) and ``current`` (False: an earlier try, in
        Airflow's history). An id Airflow does not know is left out; when the DB does not answer, why (a str)."""
        import psycopg2

        sql = (
            "SELECT id::text, dag_id, run_id, task_id, map_index, try_number, max_tries, state, queue, "
            "extract(epoch FROM last_heartbeat_at), true FROM task_instance WHERE id = ANY(%(ids)s::uuid[]) "
            "UNION ALL SELECT task_instance_id::text, dag_id, run_id, task_id, map_index, try_number, max_tries, "
            "state, queue, NULL, false FROM task_instance_history WHERE task_instance_id = ANY(%(ids)s::uuid[])"
        )
        keys = (
            "dag_id",
            "run_id",
            "task_id",
            "map_index",
            "try_number",
            "max_tries",
            "state",
            "queue",
            "heartbeat",
            "current",
        )
        try:
            conn = psycopg2.connect(
                host="127.0.0.1",
                port=self.ports["postgres"],
                user="airflow",
                password=self.secrets["postgres_airflow"],
                dbname="airflow",
                connect_timeout=5,
            )
            try:
                with conn.cursor() as cur:
                    cur.execute(sql, {"ids": list(ids)})
                    rows = cur.fetchall()
            finally:
                conn.close()
        except psycopg2.Error as exc:
            return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        found: dict[str, dict] = {}
        for ti_id, *values in sorted(rows, key=lambda r: r[-1]):  # the current row last: it wins
            rec = dict(zip(keys, values, strict=True))
            rec["heartbeat"] = float(rec["heartbeat"]) if rec["heartbeat"] is not None else None
            found[ti_id] = rec
        return found

    def killed_task_lines(
        self, tasks: dict[int, str], *, going_down: bool = False, found: dict[str, dict] | str | None = None
    ) -> list[str]:
        """A line per task process the stack killed (``tasks``: pid to task instance id): which try of
        which task of which run it was and what Airflow says of it now; while it still has it running,
        when it will fail it and what then runs the retry: once its last heartbeat is older than
        :meth:`heartbeat_timeout` (nothing tells it sooner), and only with a scheduler (``going_down``:
        the stack is stopping, scheduler included) and a worker for the task's queue.

        Args:
            tasks: pid to task instance id, as :meth:`stop_strays` collects them.
            going_down: the kill is part of ``down``.
            found: :meth:`task_instances` of those ids, when the caller asked already (once for many).
        """
        if not tasks:
            return []
        if found is None:
            found = self.task_instances(sorted(set(tasks.values())))
        timeout = self.heartbeat_timeout()
        lines = []
        for pid, ti_id in sorted(tasks.items()):
            rec = found.get(ti_id) if isinstance(found, dict) else None
            if rec is None:
                why = f"Airflow's database did not answer: {found}" if isinstance(found, str) else "unknown to Airflow"
                lines.append(
                    f"killed task process {pid}: task instance {ti_id} ({why}); Airflow fails a running task once its "
                    f"last heartbeat is {timeout} s old ([scheduler] task_instance_heartbeat_timeout), then retries "
                    "it if it has tries left"
                )
                continue
            n, retries = rec["try_number"], rec["max_tries"] or 0
            task = rec["task_id"] + (
                f"[{rec['map_index']}]" if rec["map_index"] is not None and rec["map_index"] >= 0 else ""
            )
            what = (
                f"killed task process {pid}: {rec['dag_id']} run {rec['run_id']}, task {task}, "
                f"try {n} of {max(n, retries + 1)}"
            )
            if not _airflow_runs(rec):
                lines.append(f"{what}: Airflow has it {rec['state'] or 'without a state'} already")
                continue
            # As the scheduler decides (its purge of tasks without heartbeats): retries configured and left.
            retried = 0 < retries and n <= retries
            if going_down:
                # Its scheduler stops with the stack: the timeout is looked at again only after `up`.
                fails = (
                    f"then it fails it once its last heartbeat is {timeout} s old "
                    "([scheduler] task_instance_heartbeat_timeout)"
                )
                then = f" and retries it (try {n + 1} of {retries + 1})" if retried else ": no tries left"
                lines.append(f"{what}: the stack is going down, so Airflow sees it only after `up`: {fails}{then}")
                continue
            due = (rec["heartbeat"] or time.time()) + timeout
            when = f"about {_clock(due)}" if due > time.time() else "any moment now"
            queue = rec.get("queue")
            worker = next((w for w, (q, _) in WORKERS.items() if q == queue), None)
            if not retried:
                then = "fails it: no tries left"
            elif queue and worker is None:
                then = f"queues try {n + 1} of {retries + 1} for queue {queue}, which no worker of the stack reads"
            elif worker and not self.wanted(worker) and not self.alive(worker):
                # Stopped on purpose: the supervisor leaves it so, and the retry waits in its queue.
                then = (
                    f"queues try {n + 1} of {retries + 1} for queue {queue}, which waits for {worker} "
                    f"(stopped: `python -m encoderflow.stack start {worker}`)"
                )
            else:
                then = f"retries it (try {n + 1} of {retries + 1}) after its retry delay"
            if self._scheduler_stopped():
                # No scheduler looks at heartbeats, so no time can be given.
                lines.append(
                    f"{what}: Airflow keeps it running while the scheduler is stopped (`python -m encoderflow.stack "
                    f"start scheduler`); once one runs, it fails it when its last heartbeat is {timeout} s old "
                    f"([scheduler] task_instance_heartbeat_timeout), then {then}"
                )
                continue
            lines.append(
                f"{what}: Airflow keeps it running until its last heartbeat is {timeout} s old "
                f"([scheduler] task_instance_heartbeat_timeout), {when}, then {then}"
            )
        return lines

    def _scheduler_stopped(self) -> bool:
        """Whether the stack runs (a component is wanted) with its scheduler stopped on purpose."""
        others = any(self.wanted(c) for c in COMPONENTS if c != "scheduler")
        return others and not self.wanted("scheduler") and not self.alive("scheduler")

    def supervisor_pid(self) -> int | None:
        return self._pid("supervisor")

    def start_supervisor(self, timeout: float = 60) -> int:
        """Start the supervisor unless one runs (:meth:`supervise`, detached); returns its pid."""
        if (pid := self.supervisor_pid()) is not None:
            return pid
        self.sup.mkdir(parents=True, exist_ok=True)
        log = self.logs / "supervisor.log"
        # The caller's environment, as `up` gave each component: a restart gets what the first start got.
        env = dict(os.environ) | {"ENCODERFLOW_HOME": str(self.home), EXTRA_ENV_VAR: json.dumps(self.extra_env)}
        with _open_log(log) as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "encoderflow.stack", "supervise"],
                env=env,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # No terminal: closing the one that ran `up` (SIGHUP to its session) does not reach it.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while (pid := self.supervisor_pid()) is None and time.monotonic() < deadline:
            if proc.poll() is not None and self.supervisor_pid() is None:
                break
            time.sleep(0.1)
        if pid is None:
            raise StackError(f"the supervisor did not start; its log is {log}:\n{_tail(log)}")
        print(f"stack: supervisor running (pid {pid}): a component that exits is restarted; log: {log}", flush=True)
        return pid

    def stop_supervisor(self, timeout: float = 60) -> None:
        """End the supervisor (a restart it is in is cut short; `down` stops that component next)."""
        pid = self.supervisor_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _running(pid):
                print(f"stack: supervisor (pid {pid}) still running after {timeout:.0f} s: killed", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while _running(pid):
                    time.sleep(0.1)
        (self.sup / "pid").unlink(missing_ok=True)
        (self.sup / "state.json").unlink(missing_ok=True)

    def restarts(self) -> dict[str, dict]:
        """The running supervisor's record per component: ``restarts``, ``last`` (Unix time), ``last_why``
        (the exit that restart followed), ``why`` (the latest exit), ``next`` (when it tries again,
        while it waits) and ``killed`` (the task processes that restart killed: ``at``, Unix time, and
        ``tasks``, pid to task instance id; or None); {} with no supervisor."""
        if self.supervisor_pid() is None:
            return {}
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.sup / "state.json").read_text())
        return {}

    def supervision_notes(self, last_down: bool = True) -> dict[str, str]:
        """Per component, what ``status`` adds: its restarts and the task processes the last one killed,
        the one it waits for, or that it was stopped on purpose; with ``last_down``, under ``"last down"``,
        the task processes the last ``down`` killed (while PostgreSQL runs: before, Airflow has nothing new
        to say of them), until it has none of them running (said then once more, and forgotten).
        Each killed task is said as Airflow has it now, asking its database once for all of them."""
        state, supervised = self.restarts(), self.supervisor_pid() is not None
        # A supervisor older than this code kept the lines it printed, whose forecast went stale: none.
        killed = {name: k for name, rec in state.items() if isinstance(k := (rec or {}).get("killed"), dict)}
        down = self._down_killed() if last_down and self.alive("postgres") else None
        ids = sorted({ti for k in [*killed.values(), *([down] if down else [])] for ti in k["tasks"].values()})
        found = self.task_instances(ids) if ids else {}

        def lines(k: dict) -> list[str]:
            tasks = {int(pid): ti for pid, ti in k["tasks"].items()}
            return [f"{_clock(k['at'])} {line}" for line in self.killed_task_lines(tasks, found=found)]

        notes = {}
        for name in COMPONENTS:
            rec, said = state.get(name) or {}, []
            if n := rec.get("restarts"):
                said.append(f"restarted {n} time{'s' * (n != 1)}, last {_clock(rec['last'])}: {rec['last_why']}")
            if self.alive(name):
                pass
            elif rec.get("next") and self.wanted(name):
                said.append(f"exited ({rec['why']}): restarting in {max(0, rec['next'] - time.time()):.0f} s")
            elif supervised and not self.wanted(name):
                said.append(f"stopped on purpose: not restarted (`start {name}` or `up` starts it)")
            # The tasks its last restart killed, a line each: which run and try, and what Airflow has of it now.
            said = ["; ".join(said)] if said else []
            said += lines(killed[name]) if name in killed else []
            if said:
                notes[name] = f"\n  {'':<15} ".join(said)
        if down:
            notes["last down"] = f"\n  {'':<15} ".join(lines(down))
            # Said once more when Airflow has none of them running any more, then left to supervisor.log.
            if isinstance(found, dict) and not any(
                (row := found.get(ti)) and _airflow_runs(row) for ti in down["tasks"].values()
            ):
                (self.sup / DOWN_KILLED).unlink(missing_ok=True)
        return notes

    def _down_killed(self) -> dict | None:
        """The record of :data:`DOWN_KILLED`, or None."""
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads((self.sup / DOWN_KILLED).read_text())
            if isinstance(rec, dict) and isinstance(rec.get("tasks"), dict) and rec["tasks"]:
                return rec
        return None

    def supervise(self) -> int:
        """Keep running every component that was started and not stopped since: compose's ``restart:
        always``. Each exit is logged with its status and the component's log, then the component is
        started again after a pause (:data:`RESTART_FIRST_S`, doubling to :data:`RESTART_MAX_S`) that
        gives a crash loop (PostgreSQL down) room; in dependency order, so PostgreSQL comes back before
        what needs it. One per stack: a second one leaves at once. Runs until SIGTERM (``down``)."""
        import fcntl

        self.sup.mkdir(parents=True, exist_ok=True)
        lock = open(self.sup / "lock", "a")  # noqa: SIM115 - held for this process's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another supervisor (pid {self.supervisor_pid()}) keeps this stack: this one leaves")
            return 0

        def on_stop(signum, frame):
            if self._spawning:
                self._stop_pending = True
            else:
                raise _Stopping

        self._doing = "supervise"  # its restarts are not an operator's starts: it logs them itself
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        _write_pidfile(self.sup / "pid", os.getpid())
        state = {name: {"restarts": 0, "failures": 0} for name in COMPONENTS}
        seen: dict[str, tuple[int, float]] = {}  # the live pid of each, since when
        due: dict[str, float] = {}  # when each exited one is to be restarted (monotonic)
        _log(f"supervisor (pid {os.getpid()}) keeps {self.root} running")
        try:
            # Gone with the stack folder (removed under it): nothing left to keep running.
            while (self.sup / "lock").exists():
                for name in COMPONENTS:
                    try:
                        self._tend(name, state, seen, due)
                    except Exception:  # noqa: BLE001 - one bad look (a full disk) must not end supervision
                        _log(f"{name}: {traceback.format_exc().strip()}")
                with contextlib.suppress(OSError):
                    _write_private(self.sup / "state.json", state)
                time.sleep(1)
        except _Stopping:
            _log("supervisor stopping")
        finally:
            if self.supervisor_pid() == os.getpid():
                (self.sup / "pid").unlink(missing_ok=True)
        return 0

    def _tend(self, name: str, state: dict, seen: dict, due: dict) -> None:
        """One look at ``name``: note it running, note its exit, or restart it once its pause is over."""
        rec = state[name]
        if not self.wanted(name):
            due.pop(name, None)
            rec["next"] = None
            return
        if (pid := self._pid(name)) is not None:
            if seen.get(name, (None,))[0] != pid:
                seen[name] = (pid, time.monotonic())
            elif time.monotonic() - seen[name][1] >= STABLE_S:
                rec["failures"] = 0
            return
        if name not in due:
            dead = self._recorded_pid(name)
            why = self.last_exit(name, dead, wait=2) if dead is not None and dead != rec.get("reported") else None
            rec["reported"] = dead
            # A start that failed before anything ran (a taken port) has no exit of its own to report.
            rec["why"] = why or rec.pop("error", None) or "exit status unknown"
            rec.pop("error", None)
            rec["failures"] += 1
            pause = min(RESTART_FIRST_S * 2 ** (rec["failures"] - 1), RESTART_MAX_S)
            due[name], rec["next"] = time.monotonic() + pause, time.time() + pause
            _log(f"{name} exited ({rec['why']}; its log: {self.logs / (name + '.log')}): restarting in {pause:.0f} s")
            _write_private(self.sup / "state.json", state)
        if time.monotonic() < due[name]:
            return
        with self._lock(name):
            del due[name]
            rec["next"] = None
            if not self.wanted(name) or self.alive(name):  # stopped, or started, meanwhile
                return
            # As `up` last left them (a port moved, a secret renewed while everything was stopped).
            self.ports = self._load_ports()
            self.secrets = json.loads((self.root / "secrets.json").read_text())
            rec["restarts"] += 1
            rec["last"], rec["last_why"] = time.time(), rec["why"]
            _write_private(self.sup / "state.json", state)
            _log(f"restarting {name} (restart {rec['restarts']}, after: {rec['why']})")
            out = io.StringIO()
            killed: dict[int, str] = {}
            try:
                with contextlib.redirect_stdout(out):
                    self.start(name, tasks=killed)
            except Exception as exc:  # noqa: BLE001 - any failure is one more exit to pause after
                rec["error"] = f"start failed: {(str(exc).splitlines() or [type(exc).__name__])[0].rstrip(':')}"
                _log(f"{name}: {rec['error']}")
            finally:
                lines = [line.removeprefix("stack: ") for line in out.getvalue().splitlines()]
                for line in lines:
                    _log(line)
                # For `status`: Airflow has a killed task running until its heartbeat timeout, and then
                # retries it; nothing else on the screen would say which run that was. What was killed, not
                # what was said then: `status` asks Airflow what is true of it by then.
                tasks = {str(pid): ti for pid, ti in sorted(killed.items())}
                rec["killed"] = {"at": time.time(), "tasks": tasks} if tasks else None

    # -- components ----------------------------------------------------------------------------
    def _start_postgres(self) -> None:
        data, run = self.root / "postgres", self.root / "postgres-run"
        fresh = not (data / "PG_VERSION").exists()
        if fresh:
            data.mkdir(exist_ok=True)
            run.mkdir(exist_ok=True)
            if self.as_postgres:
                shutil.chown(data, "postgres", "postgres")
                shutil.chown(run, "postgres", "postgres")
                self._check_reachable(data)
            self._run(
                self._as_postgres(
                    [
                        _pg_bin("initdb"),
                        "-D",
                        str(data),
                        "-U",
                        self.pg_superuser,
                        # Peer: only this OS user is the superuser over the socket (trust let every local
                        # user in as superuser, past every password in secrets.json).
                        "--auth-local=peer",
                        "--auth-host=scram-sha-256",
                        "-E",
                        "UTF8",
                    ]
                ),
                "initdb",
            )
        run.mkdir(exist_ok=True)
        run.chmod(0o700)
        _no_local_trust(data / "pg_hba.conf")
        log = self.logs / "postgres.log"
        _open_log(log).close()  # pg_ctl appends to it, as it is
        if self.as_postgres:
            shutil.chown(log, "postgres", "postgres")
        opts = f"-c listen_addresses=127.0.0.1 -p {self.ports['postgres']} -k {run}"
        self._run(
            self._as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "start"]),
            f"PostgreSQL start (log: {log})",
        )
        if fresh:
            psql = [
                _pg_bin("psql"),
                "-h",
                str(run),
                "-p",
                str(self.ports["postgres"]),
                "-U",
                self.pg_superuser,
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
            ]
            for user, dbs in (("airflow", ("airflow",)), ("mlflow", ("mlflow", "mlflow_auth"))):
                sql = f"CREATE ROLE {user} LOGIN PASSWORD '{self.secrets['postgres_' + user]}';"
                self._run(self._as_postgres([*psql, "-c", sql]), f"create role {user}")
                for db in dbs:
                    self._run(self._as_postgres([*psql, "-c", f"CREATE DATABASE {db} OWNER {user};"]), f"create {db}")

    def _check_reachable(self, path: Path) -> None:
        probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(path)], capture_output=True)
        if probe.returncode != 0:
            raise StackError(
                f"PostgreSQL runs as user postgres and cannot reach {path}: put ENCODERFLOW_HOME under a "
                "folder every user may traverse (chmod o+x on each parent)"
            )

    def _start_redis(self) -> None:
        if not shutil.which("redis-server"):
            raise StackError("redis-server is not installed: run `make stack-deps` (apt-get install redis-server)")
        data = self.root / "redis"
        data.mkdir(exist_ok=True)
        # Its append-only file holds the Celery messages, each with a task's Airflow token: as private as
        # redis.conf (a stack made before this was 0755, its files 0644 under umask 022).
        data.chmod(0o700)
        conf = self.root / "redis.conf"
        _write_text_private(
            conf,
            f"bind 127.0.0.1\nport {self.ports['redis']}\nrequirepass {self.secrets['redis']}\ndir {data}\n"
            "appendonly yes\nprotected-mode yes\n",
        )
        self._spawn("redis", ["redis-server", str(conf)], dict(os.environ))
        self._wait(lambda: _redis_ping(self.ports["redis"], self.secrets["redis"]), "redis", 30)

    def _start_mlflow(self) -> None:
        store = self.root / "mlflow"
        (store / "artifacts").mkdir(parents=True, exist_ok=True)
        ini = store / "auth.ini"
        _write_text_private(
            ini,
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {self._pg_url('mlflow', 'mlflow_auth', 'postgresql+psycopg2')}\nadmin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env |= {
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["mlflow_admin"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets["mlflow_flask"],  # signs the UI's CSRF tokens
        }
        port = self.ports["mlflow"]
        # In its environment (private to its user), not on its command line (ps shows that to every user).
        env["MLFLOW_BACKEND_STORE_URI"] = self._pg_url("mlflow", "mlflow", "postgresql+psycopg2")
        cmd = registry.server_command(
            port,
            "--app-name",
            "basic-auth",
            "--serve-artifacts",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--allowed-hosts",
            f"127.0.0.1:{port},localhost:{port}",
        )
        self._spawn("mlflow", cmd, env)
        self._wait(lambda: _http_ok(f"{self.mlflow_url}/health"), "mlflow", 180)
        self._mlflow_users()

    def _mlflow_users(self) -> None:
        """Create the workers' and the api-server's MLflow users, those missing only."""
        for user, key in MLFLOW_USERS.items():
            # Asked first: creating one that exists fails in PostgreSQL, which logged an ERROR and the INSERT,
            # password hash and all, at every start.
            query = urllib.parse.urlencode({"username": user})
            if not self.mlflow_admin("GET", f"/api/2.0/mlflow/users/get?{query}", missing_ok=True):
                body = {"username": user, "password": self.secrets[key]}
                self.mlflow_admin("POST", "/api/2.0/mlflow/users/create", body)

    def mlflow_admin(self, method: str, path: str, body: dict | None = None, missing_ok: bool = False) -> dict:
        """One MLflow REST call as its admin; an existing user is not an error, nor (``missing_ok``: {}) a
        missing one."""
        token = base64.b64encode(f"admin:{self.secrets['mlflow_admin']}".encode()).decode()
        req = urllib.request.Request(
            self.mlflow_url + path,
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            payload = exc.read().decode(errors="replace")
            if "RESOURCE_ALREADY_EXISTS" in payload or "already exists" in payload:
                return {}
            if missing_ok and exc.code == 404 and "RESOURCE_DOES_NOT_EXIST" in payload:
                return {}
            raise StackError(f"MLflow {method} {path}: HTTP {exc.code} {payload[:300]}") from None

    def _airflow_init(self) -> None:
        marker = self.root / "airflow" / ".initialised"
        home = self.root / "airflow"
        home.mkdir(exist_ok=True)
        home.chmod(0o700)  # Airflow's own logs (tasks, scheduler, dag-processor) are under it
        _write_private(
            home / "passwords.json", {"admin": self.secrets["airflow_admin"], "viewer": self.secrets["airflow_viewer"]}
        )
        if marker.exists():
            return
        env = self.env("scheduler")
        print("stack: first start: migrating Airflow's metadata DB", flush=True)
        self._run([sys.executable, "-m", "airflow", "db", "migrate"], "airflow db migrate", env)
        self._run(
            [sys.executable, "-m", "airflow", "pools", "set", "gpu", "1", "one training job on the accelerator"],
            "airflow pools set gpu",
            env,
        )
        marker.touch()

    def _start_airflow(self, name: str) -> None:
        if name not in AIRFLOW_COMPONENTS and name not in WORKERS:
            raise StackError(f"no component {name!r}: one of {', '.join(COMPONENTS)}")
        self._airflow_init()
        airflow = [sys.executable, "-m", "airflow"]
        if name in WORKERS:
            queue, concurrency = WORKERS[name]
            # Logs live on this machine's disk, which the api-server reads: no log server ports to open.
            cmd = [
                *airflow,
                "celery",
                "worker",
                "--queues",
                queue,
                "--concurrency",
                str(concurrency),
                "--celery-hostname",
                f"{queue}@%h",
                "--skip-serve-logs",
                "--without-mingle",
                "--without-gossip",
            ]
        elif name == "triggerer":
            cmd = [*airflow, "triggerer", "--skip-serve-logs"]
        else:
            cmd = [*airflow, name]
        log = self.logs / f"{name}.log"
        before, since = log.stat().st_size if log.exists() else 0, time.time()
        self._spawn(name, cmd, self.env(name))
        if name == "api-server":
            self._wait(lambda: _http_ok(f"{self.airflow_url}/api/v2/monitor/health"), name, 180)
        elif name in WORKERS:
            # This start's lines only: the log is appended to, and a line of the last start matched at once.
            self._wait(lambda: b" ready." in _read_from(log, before), name, 180)
        else:  # scheduler, dag-processor, triggerer: a heartbeat of this start in Airflow's health
            key = name.replace("-", "_")
            self._wait(lambda: _heartbeat_after(self.airflow_health(), key, since), name, 180)

    def airflow_health(self) -> dict | None:
        """The api-server's ``/api/v2/monitor/health`` (metadatabase, scheduler, triggerer, dag processor),
        or None when it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.airflow_url}/api/v2/monitor/health", timeout=10) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None

    def _wait(self, ready, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not self.alive(name):
                break
            time.sleep(0.5)
        tail = (
            (self.logs / f"{name}.log").read_text(errors="replace")[-1500:]
            if (self.logs / f"{name}.log").exists()
            else ""
        )
        state = "exited" if not self.alive(name) else f"did not answer within {timeout:.0f} s"
        raise StackError(f"{name} {state}; its log is {self.logs / (name + '.log')}:\n{tail}")


def _stack_program(cmdline: list[str]) -> bool:
    """Whether a command line is one of the stack's programs (not, say, ``tail -f logs/mlflow.log`` in
    its folder); a Python program counts when it runs one of them (``python -m airflow ...``). A
    component's :data:`WATCHER` names it in its arguments, and leaves with it: never one."""
    first = Path((cmdline[0].split() or [""])[0]).name if cmdline else ""
    if cmdline[1:3] == ["-c", WATCHER]:
        return False
    if first.startswith("python"):
        return any(word in arg for arg in cmdline[1:4] for word in STACK_PROGRAMS)
    return first.startswith(STACK_PROGRAMS)


def _owned(var: str) -> str | None:
    """Why the stack owns the Airflow setting ``var`` (``AIRFLOW__SECTION__KEY``, or its ``_CMD`` or
    ``_SECRET`` form), or None when the caller's value is to be kept."""
    key = var.upper().removeprefix("AIRFLOW__")
    return OWNED_SETTINGS.get(key) or OWNED_SETTINGS.get(re.sub(r"_(CMD|SECRET)$", "", key))


def _command(pid: int, width: int = 160) -> str:
    """``pid``'s command line (or the title Airflow and Celery give it), cut to ``width`` characters."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    line = " ".join(w.decode(errors="replace") for w in words).strip()
    return line if len(line) <= width else line[: width - 1] + "…"


def _task_instance_id(pid: int) -> str | None:
    """The task instance try that process ``pid`` runs, when it is an Airflow task (:data:`TASK_TITLE`)."""
    m = TASK_TITLE.match(_command(pid, 400))
    return m.group(1) if m else None


def _stat(pid: int) -> list[str]:
    """``/proc/<pid>/stat``'s fields after the command name (state first), or [] when there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_time(pid: int) -> str:
    """When ``pid`` started (clock ticks after boot, ``/proc/<pid>/stat``): with the pid, an identity."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _write_pidfile(path: Path, pid: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{pid} {_start_time(pid)}")
    os.replace(tmp, path)


def _airflow_runs(rec: dict) -> bool:
    """Whether Airflow has this try (a row of :meth:`Stack.task_instances`) running still: its current try,
    running or restarting."""
    return bool(rec["current"]) and rec["state"] in ("running", "restarting")


def _stamped(line: str) -> str:
    """``line`` as supervisor.log has each: after the time."""
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"


def _log(line: str) -> None:
    """One line of the supervisor's log, with the time."""
    print(_stamped(line), flush=True)


def _user() -> str:
    """Who runs this process: the name of its user (its uid when it has none), and who ran sudo."""
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        name = f"uid {os.geteuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{name} (sudo from {sudo})" if sudo and sudo != name else name


def _clock(at: float) -> str:
    """``at`` (Unix time) as HH:MM:SS today, with the date otherwise."""
    same_day = time.strftime("%Y-%m-%d", time.localtime(at)) == time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", time.localtime(at))


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _new_secret(name: str) -> str:
    # The JWT signing key is hashed with SHA-512, for which PyJWT wants at least 64 bytes.
    return secrets.token_urlsafe(48 if name == "airflow_jwt" else 18)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return _stat(pid)[:1] != ["Z"]  # a zombie has exited


def _read_from(path: Path, offset: int) -> bytes:
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        f.seek(offset)
        return f.read()
    return b""


def _heartbeat_after(health: dict | None, component: str, since: float) -> bool:
    """Whether Airflow's health holds a heartbeat of ``component`` (``scheduler``, ``dag_processor``,
    ``triggerer``) from after ``since`` (a Unix time): one from before a restart is the old process's."""
    from datetime import datetime

    beat = ((health or {}).get(component) or {}).get(f"latest_{component}_heartbeat")
    return bool(beat) and datetime.fromisoformat(beat).timestamp() > since


def _no_local_trust(hba: Path) -> None:
    """A cluster made before peer authentication (``initdb --auth-local=trust``) let every local user
    in as its superuser: its socket lines become ``peer`` before it starts."""
    if not hba.exists():
        return
    text = hba.read_text()
    hardened = re.sub(r"(?m)^(local\s.*\s)trust\s*$", r"\1peer", text)
    if hardened != text:
        stat = hba.stat()
        hba.write_text(hardened)
        os.chown(hba, stat.st_uid, stat.st_gid)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (none when ``pid`` itself is gone)."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _children(pid: int) -> list[int]:
    """The live children of ``pid`` (none when ``pid`` itself is gone)."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def _fernet_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def _open_log(path: Path):
    """``path`` opened to append to, readable by its owner only (0600, a log made before included)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def _write_text_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _redis_ping(port: int, password: str) -> bool:
    import redis

    try:
        with redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m encoderflow.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down", "status", "env", "start", "stop", "supervise"))
    parser.add_argument(
        "role", nargs="?", help="env: whose environment (default worker-default); start, stop: which component"
    )
    args = parser.parse_args(argv)
    try:
        stack = Stack()
        if args.action == "up":
            stack.up()
        elif args.action == "down":
            stack.down()
        elif args.action == "supervise":
            extra = os.environ.pop(EXTRA_ENV_VAR, "")
            stack.extra_env = json.loads(extra) if extra else {}
            return stack.supervise()
        elif args.action in ("start", "stop"):
            if args.role not in COMPONENTS:
                raise StackError(f"{args.action}: name a component: one of {', '.join(COMPONENTS)}")
            getattr(stack, args.action)(args.role)
            if args.action == "stop" and stack.supervisor_pid() is not None:
                print(f"stack: {args.role} stopped; the supervisor leaves it so until `start {args.role}` or `up`")
        elif args.action == "env":
            roles = (*AIRFLOW_COMPONENTS, *WORKERS)
            role = args.role or "worker-default"
            if role not in roles:
                raise StackError(f"env: no role {role!r}: one of {', '.join(roles)}")
            for k, v in sorted(stack.env(role).items()):
                if k.startswith(("AIRFLOW", "MLFLOW", "ENCODERFLOW")):
                    print(f"export {k}={v!r}")
            return 0
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    status = stack.status()
    notes = stack.supervision_notes(last_down=args.action in ("up", "status"))
    supervisor = stack.supervisor_pid()
    if args.action != "down":
        print(
            f"  {'supervisor':<15} "
            + (
                f"running (pid {supervisor}): restarts a component that exits"
                if supervisor
                else "stopped: a component that exits stays stopped (`up` starts the supervisor)"
            )
            + f"  log: {stack.logs / 'supervisor.log'}"
        )
    for name, up in status.items():
        print(f"  {name:<15} {'running' if up else 'stopped'}  log: {stack.logs / (name + '.log')}")
        if name in notes:
            print(f"  {'':<15} {notes[name]}")
    if "last down" in notes:
        # After `up`, Airflow has them running with no process until their heartbeat timeout: this says why.
        print(f"  {'last down':<15} {notes['last down']}")
    if args.action in ("up", "status"):
        for line in stack.stray_report():
            print(line)
    # A live process is not a working one: with PostgreSQL down the api-server and the workers run on
    # (the scheduler, dag-processor and triggerer exit, and the supervisor restarts them until it is back).
    unhealthy = []
    if args.action in ("up", "status") and status.get("api-server"):
        health = stack.airflow_health() or {}
        unhealthy = [k for k, v in health.items() if isinstance(v, dict) and v.get("status") not in ("healthy", None)]
        if unhealthy:
            print(f"  Airflow says unhealthy: {', '.join(unhealthy)} (its /api/v2/monitor/health; logs above)")
    if args.action in ("up", "status"):
        print(f"Airflow  {stack.airflow_url}  (admin or viewer; passwords in {stack.root / 'secrets.json'})")
        print(f"MLflow   {stack.mlflow_url}  (admin; workers write as encoderflow-worker)")
        print(f"Runs     {stack.airflow_url}/encoderflow/")
    if args.action in ("down", "start", "stop"):
        return 0
    return 0 if all(stack.status().values()) and not unhealthy else 1


if __name__ == "__main__":
    sys.exit(main())
