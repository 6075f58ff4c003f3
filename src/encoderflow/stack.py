"""The production topology of ``docker-compose.yaml``, natively: ``make stack`` / ``make stack-down``.

PostgreSQL (Airflow's metadata DB, MLflow's store and MLflow's user store), Redis (the Celery
broker), Airflow's api-server, scheduler, dag-processor and triggerer, two Celery workers (queue
``default``; queue ``gpu``, one task at a time, for the ``gpu`` pool) and an MLflow tracking
server with basic auth and ``--serve-artifacts``: every process on loopback, every file under
``$ENCODERFLOW_HOME/stack``. Secrets are generated once into ``stack/secrets.json`` (mode 0600)
and ports are chosen once into ``stack/ports.json``, so ``up`` after ``down`` (or after a crash)
brings back the same deployment with its data.

    python -m encoderflow.stack up | down | status | env [ROLE]

Sign-ins: Airflow ``admin`` and ``viewer`` (SimpleAuthManager roles ADMIN and VIEWER), MLflow
``admin``; workers write to MLflow as ``encoderflow-worker``, the api-server reads as
``encoderflow-reader``; an anonymous MLflow client is refused. Passwords: ``stack/secrets.json``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import glob
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
import urllib.error
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
        self.secrets = self._load_or_make(
            "secrets.json", lambda: {k: _new_secret(k) for k in SECRETS} | {"fernet": _fernet_key()}
        )
        self.ports = self._load_or_make(
            "ports.json", lambda: {k: _free_port() for k in ("postgres", "redis", "api", "mlflow")}
        )
        self.airflow_url = f"http://127.0.0.1:{self.ports['api']}"
        self.mlflow_url = f"http://127.0.0.1:{self.ports['mlflow']}"

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
        component among its ancestors. A Celery worker killed alone leaves its task training, in a
        session of its own; Airflow's retry then trained beside it in the same run folder. (An
        environment mark would not do: those titles overwrite it.)"""
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

    def stop_strays(self, timeout: float = 30) -> list[int]:
        """SIGKILL the :meth:`strays` and wait up to ``timeout`` seconds for them to go; returns their pids.

        Not SIGTERM first: Airflow's task runner forwards it to the task, and a training task went on to
        its end (measured: its retry found the encoder finished), writing while Airflow retried it.
        Airflow has given up on these tasks already; the retry resumes from their last backup. A pid is
        signalled only while its start time is the one seen: its number may belong to another by then.
        """
        killed = []
        for pid, started in self.strays():
            if _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, started))
        deadline = time.monotonic() + timeout
        while any(_start_time(p) == t and _running(p) for p, t in killed) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [pid for pid, _ in killed]

    def alive(self, name: str) -> bool:
        return self._pid(name) is not None

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it from here
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: `stop` ends its children with it
        )
        log.close()
        tmp = self.pids / f"{name}.pid.tmp"
        tmp.write_text(f"{proc.pid} {_start_time(proc.pid)}")
        os.replace(tmp, self.pids / f"{name}.pid")

    def _as_postgres(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if self.as_postgres else cmd

    def _run(self, cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=self.root)
        if proc.returncode != 0:
            raise StackError(f"{what} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}")
        return proc.stdout

    def start(self, name: str) -> None:
        """Start one component unless it runs; waits until it answers."""
        if self.alive(name):
            return
        if name in WORKERS and (left := self.stop_strays()):
            # Airflow retries what they ran (resuming from its backups), once its heartbeat timeout passes.
            print(f"stack: stopped {len(left)} process(es) a stopped component left running (tasks): pids {left}")
        began = time.monotonic()
        start = getattr(self, "_start_" + name.replace("-", "_"), None)
        if start:
            start()
        else:
            self._start_airflow(name)
        # `up` takes a minute or more: a line per component says it is getting on.
        print(f"stack: {name} ready (pid {self._pid(name)}, {time.monotonic() - began:.0f} s)", flush=True)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        """Stop one component and every process it started; SIGKILL after ``timeout`` seconds."""
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
        # A worker's tasks are its pool processes' children (Airflow's task supervisor forks each).
        busy = name in WORKERS and len(tree) > len(_children(pid))
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
                doing = "is finishing its running task" if busy else "is shutting down"
                print(f"stack: {name} (pid {pid}) {doing}: waiting up to {timeout:.0f} s, then killing it", flush=True)
                said = True
            time.sleep(0.2)
        if self.alive(name) or sig == signal.SIGKILL:
            if self.alive(name) and sig != signal.SIGKILL:
                print(f"stack: {name} (pid {pid}) still running after {timeout:.0f} s: killed", flush=True)
            for target in [pid, *tree]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while self.alive(name):
                time.sleep(0.1)
        self._forget(name)

    def _forget(self, name: str) -> None:
        # PostgreSQL removes its postmaster.pid itself.
        if name != "postgres":
            (self.pids / f"{name}.pid").unlink(missing_ok=True)

    def up(self) -> None:
        """Start every component that is not running, in dependency order (idempotent)."""
        for var, why in self.ignored_settings().items():
            print(f"stack: ignoring {var} from your environment: {why}", flush=True)
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

    def down(self) -> None:
        for name in reversed(COMPONENTS):
            self.stop(name)
        if left := self.stop_strays():
            print(f"stack: stopped {len(left)} process(es) left running by components that had died: pids {left}")

    def status(self) -> dict[str, bool]:
        return {name: self.alive(name) for name in COMPONENTS}

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
        log.touch()
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
        for user, key in MLFLOW_USERS.items():
            self.mlflow_admin("POST", "/api/2.0/mlflow/users/create", {"username": user, "password": self.secrets[key]})

    def mlflow_admin(self, method: str, path: str, body: dict | None = None) -> dict:
        """One MLflow REST call as its admin; an existing user is not an error."""
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
            raise StackError(f"MLflow {method} {path}: HTTP {exc.code} {payload[:300]}") from None

    def _airflow_init(self) -> None:
        marker = self.root / "airflow" / ".initialised"
        home = self.root / "airflow"
        home.mkdir(exist_ok=True)
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
    its folder); a Python program counts when it runs one of them (``python -m airflow ...``)."""
    first = Path((cmdline[0].split() or [""])[0]).name if cmdline else ""
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
    parser.add_argument("action", choices=("up", "down", "status", "env"))
    parser.add_argument("role", nargs="?", default="worker-default", help="for env: whose environment")
    args = parser.parse_args(argv)
    stack = Stack()
    try:
        if args.action == "up":
            stack.up()
        elif args.action == "down":
            stack.down()
        elif args.action == "env":
            if args.role not in (*AIRFLOW_COMPONENTS, *WORKERS):
                raise StackError(f"env: no role {args.role!r}: one of {', '.join((*AIRFLOW_COMPONENTS, *WORKERS))}")
            for k, v in sorted(stack.env(args.role).items()):
                if k.startswith(("AIRFLOW", "MLFLOW", "ENCODERFLOW")):
                    print(f"export {k}={v!r}")
            return 0
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    status = stack.status()
    for name, up in status.items():
        print(f"  {name:<15} {'running' if up else 'stopped'}  log: {stack.logs / (name + '.log')}")
    if args.action in ("up", "status"):
        for line in stack.stray_report():
            print(line)
    # A live process is not a working one: with PostgreSQL down every Airflow process still runs.
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
    return 0 if args.action == "down" or (all(stack.status().values()) and not unhealthy) else 1


if __name__ == "__main__":
    sys.exit(main())
