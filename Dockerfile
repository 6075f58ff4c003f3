# syntax=docker/dockerfile:1
# One image for every container of docker-compose.yaml, two flavours:
#   docker build --target cpu -t encoderflow:cpu .   api-server, scheduler, dag-processor, triggerer,
#                                                    CPU worker, init, MLflow server
#   docker build --target gpu -t encoderflow:gpu .   the worker on queue `gpu` (JAX with CUDA 12)
# The Python stack is exactly the one `make` builds (requirements.txt + constraints.txt), plus what
# a distributed deployment needs: the Celery executor, PostgreSQL drivers.

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm AS base

ARG AIRFLOW_UID=50000
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIRFLOW_HOME=/opt/airflow \
    ENCODERFLOW_HOME=/encoderflow \
    KERAS_BACKEND=jax \
    GX_ANALYTICS_ENABLED=false \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

# Group 0 owns what the containers write, as in the official Airflow image, so any AIRFLOW_UID works.
# Named volumes start as a copy of these folders, ownership included.
RUN useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir /opt/airflow --create-home --shell /bin/bash airflow \
    && mkdir -p /encoderflow /opt/airflow/logs /opt/airflow/config /mlflow/artifacts \
    && chown -R "${AIRFLOW_UID}:0" /encoderflow /opt/airflow /mlflow \
    && chmod -R g+rwX /encoderflow /opt/airflow /mlflow

WORKDIR /opt/encoderflow
COPY requirements.txt constraints.txt ./
# The deployment extras are pinned here (not in requirements.txt): `make` and CI need neither
# Celery nor PostgreSQL. Versions resolved against constraints.txt.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r requirements.txt \
        "apache-airflow-providers-celery==3.26.0" \
        "apache-airflow-providers-postgres==7.1.1" \
        "psycopg2-binary==2.9.13"

COPY pyproject.toml README.md ./
COPY src ./src
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps . && python -c "import encoderflow.cli"
# docker-compose.yaml mounts the working tree's dags/ and plugins/ over these; the copies make the
# image usable on its own.
COPY dags ./dags
COPY plugins ./plugins
ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/encoderflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/encoderflow/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False

USER ${AIRFLOW_UID}
WORKDIR /opt/airflow
ENTRYPOINT ["airflow"]
CMD ["version"]


# JAX on CUDA 12 for the `gpu` queue. The CUDA libraries come as pip wheels (jax's [cuda12] extra),
# so only the host's NVIDIA driver is needed (NVIDIA Container Toolkit; the compose file reserves
# the device). TensorFlow stays on the CPU: it only feeds data, and encoderflow hides every GPU
# from it before first use (encoderflow.data.tokenizer.cpu_only_tensorflow), so JAX owns the device.
FROM base AS gpu
ARG AIRFLOW_UID=50000
USER root
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c /opt/encoderflow/constraints.txt "jax[cuda12]==0.10.2"
USER ${AIRFLOW_UID}


# Last, so a plain `docker build .` gives the CPU image.
FROM base AS cpu
