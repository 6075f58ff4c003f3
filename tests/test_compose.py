"""docker-compose.yaml and the Dockerfile, checked statically (no Docker engine needed).

The compose file must parse, build or pull every image from something that exists, give the GPU
worker its device reservation and queue, mount the one ENCODERFLOW_HOME volume at the same path
in every Airflow service, and have no password with a literal default: every secret is a required
variable that stops ``docker compose`` with a message, and .env.example lists each of them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
SECRET = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN|(^|_)KEY$")
# ${NAME}, ${NAME:-x}, ${NAME-x}, ${NAME:?x}, ${NAME?x}, ${NAME:+x}, $NAME; $$ is a literal $.
VAR = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")
OFFICIAL = {
    "postgres",
    "redis",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-init",
}


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation, enough of it to check what `docker compose config` would say."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise MissingVariable(f"required variable {name} is missing a value: {arg}")
        if op == ":-" and not value or op == "-" and value is None:
            return arg
        if op in (":+", "+"):
            return arg if value else ""
        return value or ""

    return VAR.sub(sub, text)


def compose_text() -> str:
    """The file as compose interpolates it: YAML comments are not interpolated."""
    return "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))


def strings(node: Any, path: str = ""):
    """(path, string) for every string in the parsed compose file."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


def airflow_services(services) -> dict[str, Any]:
    return {name: s for name, s in services.items() if name.startswith("airflow-")}


def dockerfile_stages() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M | re.I)}


def test_parses_in_the_official_layout(services):
    assert OFFICIAL <= set(services), OFFICIAL - set(services)
    assert {"airflow-worker-gpu", "mlflow", "mlflow-postgres"} <= set(services)
    for name, svc in airflow_services(services).items():
        env = svc.get("environment", {})
        assert env.get("AIRFLOW__CORE__EXECUTOR") == "CeleryExecutor", name
        if name not in ("airflow-init", "airflow-cli"):
            assert svc["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully", name
    assert services["airflow-apiserver"]["command"] == "api-server"
    assert services["airflow-dag-processor"]["command"] == "dag-processor"


def test_every_image_or_build_exists(services):
    stages = dockerfile_stages()
    assert {"cpu", "gpu"} <= stages
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            build = svc["build"]
            context = REPO / interpolate(build["context"] if isinstance(build, dict) else build, {})
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert dockerfile.is_file(), (name, dockerfile)
            assert isinstance(build, dict) and build.get("target") in stages, (name, build)
        else:
            image = svc["image"]
            # Pulled images are pinned to a release line, never `latest` or untagged.
            assert re.fullmatch(r"[a-z0-9./-]+:[\w.-]+", image) and not image.endswith(":latest"), (name, image)
    # Everything the Dockerfile copies is in the build context.
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", DOCKERFILE.read_text(), re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which is not in the repository"


def test_images_match_the_pinned_stack():
    """The images install exactly the venv's pins (requirements + constraints), and JAX on CUDA for gpu."""
    text = DOCKERFILE.read_text()
    constraints = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert "pip install -r requirements.txt" in text
    jax = re.search(r'"jax\[cuda12\]==([\w.]+)"', text)
    assert jax and jax.group(1) == constraints["jax"], "the GPU image's jax must be the venv's"
    assert "-c /opt/encoderflow/constraints.txt" in text
    for extra in re.findall(r'"(apache-airflow-providers-[\w-]+|psycopg2-binary)(==)?', text):
        assert extra[1] == "==", f"{extra[0]} is not pinned"
    gpu_stage = text.split("AS gpu", 1)[1].split("FROM ", 1)[0]
    assert "jax[cuda12]" in gpu_stage
    # TensorFlow stays the CPU build: no CUDA flavour of it is installed anywhere.
    assert not re.search(r"tensorflow\[and-cuda\]|tensorflow-gpu", text)


def test_gpu_worker_reserves_a_gpu_and_listens_on_gpu(services):
    gpu = services["airflow-worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    cmd = gpu["command"]
    assert cmd[:2] == ["celery", "worker"] and cmd[cmd.index("--queues") + 1] == "gpu"
    assert cmd[cmd.index("--concurrency") + 1] == "1"
    assert gpu["build"]["target"] == "gpu"
    cpu = services["airflow-worker"]["command"]
    assert interpolate(cpu[cpu.index("--queues") + 1], {}) == "default"
    # The DAG sends training to that queue and pool (presets in the adapter); init creates the pool.
    dag = (REPO / "dags" / "encoder_pretraining.py").read_text()
    adapter = (REPO / "src" / "encoderflow" / "airflow_adapter.py").read_text()
    assert re.search(r'GPU = \{"queue": "gpu", "pool": "gpu", "pool_slots": 1\}', adapter)
    assert "@task(**af.GPU" in dag
    init = "\n".join(services["airflow-init"]["command"])
    assert "airflow pools set gpu 1 " in init


def test_shared_volume_at_the_same_path_in_every_airflow_service(compose, services):
    assert "encoderflow-home" in compose["volumes"]
    for name, svc in airflow_services(services).items():
        mounts = [v for v in svc.get("volumes", []) if isinstance(v, str) and v.split(":")[0] == "encoderflow-home"]
        assert mounts == ["encoderflow-home:/encoderflow"], (name, svc.get("volumes"))
        assert svc["environment"]["ENCODERFLOW_HOME"] == "/encoderflow", name
    mlflow = services["mlflow"]
    assert any(v.startswith("mlflow-artifacts:") for v in mlflow["volumes"])
    args = " ".join(mlflow["command"])
    assert '--backend-store-uri="$$MLFLOW_STORE_URI"' in args and "--app-name=basic-auth" in args
    assert mlflow["environment"]["MLFLOW_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    assert mlflow["environment"]["MLFLOW_STORE_URI"].endswith("@mlflow-postgres/mlflow")
    assert "--artifacts-destination=/mlflow/artifacts" in args
    # Workers write to MLflow with their own user, created by mlflow-init before they start.
    common = services["airflow-worker"]["environment"]
    assert common["MLFLOW_TRACKING_USERNAME"] == "encoderflow-worker"
    assert services["airflow-worker"]["depends_on"]["mlflow-init"]["condition"] == "service_completed_successfully"
    assert services["airflow-apiserver"]["environment"]["MLFLOW_TRACKING_USERNAME"] == "encoderflow-reader"
    assert "viewer:viewer" in common["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    # A task the scheduler re-queues at a restart waits for the api-server as long as in the native stack.
    from encoderflow import runtime

    assert common["AIRFLOW__WORKERS__EXECUTION_API_RETRIES"] == runtime.WORKER_API_RETRIES


def test_celery_acknowledges_and_fetches_as_the_native_stack_does(services, tmp_path):
    """A worker killed mid-task left its message unacknowledged, replayed by Redis a day later."""
    import json

    from encoderflow.stack import Stack

    native = Stack(tmp_path / "home").env("worker-gpu")
    for name in ("airflow-worker", "airflow-worker-gpu"):
        env = services[name]["environment"]
        assert env["AIRFLOW__CELERY__TASK_ACKS_LATE"] == native["AIRFLOW__CELERY__TASK_ACKS_LATE"] == "False"
        assert json.loads(env["AIRFLOW__CELERY__EXTRA_CELERY_CONFIG"]) == {"worker_disable_prefetch": True}
        assert env["AIRFLOW__CELERY__EXTRA_CELERY_CONFIG"] == native["AIRFLOW__CELERY__EXTRA_CELERY_CONFIG"]


def test_no_password_has_a_literal_default(compose):
    required = set()
    for path, value in strings(compose):
        key = path.rsplit(".", 1)[-1]
        for m in VAR.finditer(value):
            name = m.group("name") or m.group("bare")
            if name and SECRET.search(name):
                assert m.group("op") == ":?", f"{path}: {m.group(0)} must be required: ${{{name}:?message}}"
                required.add(name)
        # A secret-looking key holds a required variable, never a literal.
        if SECRET.search(key) and not key.startswith("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"):
            assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), f"{path} = {value!r} is a literal secret"
        # user:password@host in a URL: the password is a required variable.
        for cred in re.findall(r"://[^:/@\s]*:([^@\s]+)@", value):
            assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", cred), f"{path}: literal password in {value!r}"
    assert required >= {
        "POSTGRES_PASSWORD",
        "MLFLOW_DB_PASSWORD",
        "REDIS_PASSWORD",
        "AIRFLOW_ADMIN_PASSWORD",
        "AIRFLOW_FERNET_KEY",
        "AIRFLOW_JWT_SECRET",
        "AIRFLOW_API_SECRET_KEY",
        "AIRFLOW_VIEWER_PASSWORD",
        "MLFLOW_ADMIN_PASSWORD",
        "MLFLOW_WORKER_PASSWORD",
        "MLFLOW_READER_PASSWORD",
        "MLFLOW_FLASK_SECRET_KEY",
    }, required


def test_required_variables_fail_clearly_and_env_example_lists_them(compose):
    text = compose_text()
    required = sorted({m.group("name") for m in VAR.finditer(text) if m.group("op") in (":?", "?")})
    example = env_example()
    for name in required:
        assert name in example, f"{name} is required by docker-compose.yaml but not listed in .env.example"
        assert example[name] == "", f".env.example gives {name} a value; secrets have no defaults"
    # Unset: compose would stop, naming the variable and pointing at .env.example.
    with pytest.raises(MissingVariable, match=r"required variable \w+ is missing a value: set \w+ in \.env"):
        interpolate(text, {})
    for name in required:
        env = {n: "x" for n in required if n != name}
        with pytest.raises(MissingVariable, match=name):
            interpolate(text, env)
    # All set: everything resolves, secrets land where they belong.
    env = {n: f"value-of-{n.lower()}" for n in required}
    resolved = yaml.safe_load(interpolate(text, env))
    common = resolved["services"]["airflow-scheduler"]["environment"]
    assert (
        common["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        == "postgresql+psycopg2://airflow:value-of-postgres_password@postgres/airflow"
    )
    assert common["AIRFLOW__CELERY__BROKER_URL"] == "redis://:value-of-redis_password@redis:6379/0"
    assert (
        resolved["services"]["airflow-init"]["environment"]["AIRFLOW_ADMIN_PASSWORD"]
        == "value-of-airflow_admin_password"
    )
    assert "${" not in interpolate(text.replace("$$", ""), env)  # $$ is compose's escape for a literal $


def compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(compose_cli() is None, reason="no docker compose here; the checks above stand in for it")
def test_docker_compose_config_accepts_it(tmp_path):
    """Where a compose CLI exists (no engine needed): its own validation, and its refusal without .env."""
    required = [n for n in env_example()]
    full, empty = tmp_path / "full.env", tmp_path / "empty.env"
    full.write_text("".join(f"{n}=ci-{n.lower()}\n" for n in required))
    empty.write_text("")
    cli = compose_cli()
    ok = subprocess.run(
        [*cli, "--env-file", str(full), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(
        [*cli, "--env-file", str(empty), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert refused.returncode != 0 and "in .env (see .env.example)" in refused.stderr, refused.stderr
