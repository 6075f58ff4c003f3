# Two commands set everything up on a fresh machine: `make run` and `make test`.
# Each creates .venv from requirements.txt on first use; the stamp makes re-runs free.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

# JAX's accelerator flavour: cuda12 when `nvidia-smi -L` lists a GPU, else cpu; ACCEL=cpu|cuda12
# overrides. Both sets resolve against constraints.txt (it pins the CUDA wheels too). TensorFlow is
# the CPU build either way. The stamp records the flavour: switching ACCEL rebuilds .venv.
ifeq ($(origin ACCEL),undefined)
ACCEL := $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && echo cuda12 || echo cpu)
endif
ACCELS := cpu cuda12
ifneq ($(words $(ACCEL)) $(filter $(ACCEL),$(ACCELS)),1 $(ACCEL))
$(error ACCEL='$(ACCEL)' is not supported: use ACCEL=cpu or ACCEL=cuda12 (default: cuda12 when `nvidia-smi -L` lists a GPU))
endif
JAX_VERSION := $(shell sed -n 's/^jax==//p' constraints.txt)
JAX         := jax[$(ACCEL)]==$(JAX_VERSION)
STAMP       := $(VENV)/.installed-$(ACCEL)
PIP_INSTALL := -r requirements.txt "$(JAX)" -c constraints.txt
# `make venv-dry-run REPORT=r.json` also writes pip's JSON report of the resolved set.
REPORT ?=

# Empty: the CLI's default preset (config.DEFAULT_PRESET, the guide's).
PRESET   ?=
DATA_DIR ?=
MIRROR   ?=
# Extra overrides, e.g. SET="pretrain.epochs=2 finetune.epochs=1"
SET      ?=
# FORCE=1 trains even when data, config and code equal the champion's (otherwise the run is skipped).
FORCE    ?=
# Your own corpus and labeled data, declared in a YAML file (README, "Your own data").
DATA_FILE ?=

export ENCODERFLOW_HOME ?= $(CURDIR)/.encoderflow

RUN_ARGS := $(if $(PRESET),--preset $(PRESET)) \
	$(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
	$(if $(MIRROR),--mirror $(MIRROR)) \
	$(if $(DATA_FILE),--data-file $(DATA_FILE)) \
	$(foreach s,$(SET),--set $(s)) \
	$(if $(FORCE),--force)

.PHONY: run test test-fast lint format docs airflow venv venv-dry-run doctor clean stack stack-down stack-status stack-deps gpu-wheels gpu-aot

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@for s in $(VENV)/.installed-*; do \
		if [ -e "$$s" ] && [ "$$s" != "$(STAMP)" ]; then \
			echo "$(VENV) was built for $${s##*/.installed-}, ACCEL=$(ACCEL) asked: rebuilding it"; rm -rf $(VENV); break; \
		fi; \
	done
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_INSTALL)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@rm -f $(VENV)/.installed
	@touch $(STAMP)

# What `make venv` would install for ACCEL, resolved from scratch against the pins; changes nothing.
venv-dry-run:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m pip install --dry-run --ignore-installed \
		$(if $(REPORT),--report $(REPORT)) $(PIP_INSTALL)

run: $(STAMP)
	$(BIN)/encoderflow run $(RUN_ARGS)

# pytest-xdist workers: the Airflow end-to-end files run one after another on one of them, every other
# file on the rest (tests/conftest.py). At most 4: each worker holds its own TensorFlow and JAX.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; [ $$n -lt 2 ] && n=2; echo $$n)
PYTEST    := $(BIN)/python -m pytest -ra -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

test: lint
	$(PYTEST)

# Everything but the end-to-end Airflow runs.
test-fast: lint
	$(PYTEST) -m "not slow"

# ruff's settings are in pyproject.toml; `make format` rewrites, `make lint` only checks.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# docs/parameters.md is generated from the config declarations (a test fails when it is stale).
docs: $(STAMP)
	$(BIN)/python -c "from encoderflow.config import parameters_markdown as md; print(md(), end='')" > docs/parameters.md

airflow: $(STAMP)
	$(BIN)/encoderflow airflow

# One screen on what a run here would use (Python, JAX devices, dtype policy, disk, data sources).
doctor: $(STAMP)
	$(BIN)/encoderflow doctor $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(MIRROR),--mirror $(MIRROR))

# The docker-compose topology natively (PostgreSQL, Redis, Celery workers `default` and `gpu`, api-server,
# scheduler, dag-processor, triggerer, MLflow with basic auth), all under $(ENCODERFLOW_HOME)/stack.
stack: stack-deps $(STAMP)
	$(BIN)/python -m encoderflow.stack up

stack-down: $(STAMP)
	$(BIN)/python -m encoderflow.stack down

stack-status: $(STAMP)
	$(BIN)/python -m encoderflow.stack status

# Debian's PostgreSQL and Redis servers (and Chromium, for the browser test), installed only when missing.
stack-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# The wheels benchmarks/gpu.sh needs on a CUDA machine that has jax but no registry (Python 3.12,
# Linux x86-64): keras and keras-hub at the pinned versions, plus the two small packages keras needs
# that such an image lacks. Install there with the line at the top of benchmarks/gpu.sh.
GPU_WHEELS = keras keras-hub namex optree
gpu-wheels:
	mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(foreach p,$(GPU_WHEELS),$$(grep -i '^$(p)==' constraints.txt))
	ls .whl

clean:
	rm -rf $(VENV) $(AOT_VENV) build src/*.egg-info

# benchmarks/gpu_aot.py: compiles the GPU check's training steps for an H100 here, with no GPU (XLA's
# deviceless compile), in a venv of its own with the lent device's stack (Python 3.12, jax 0.11.2 and
# its CUDA 13 plugin, keras and keras-hub at our pins; ~4.4 GB of CUDA wheels, no TensorFlow).
# AOT_OUT: where its tables go; AOT_ARGS: more flags (e.g. --top 10, --cell, --fused-blocks).
AOT_PYTHON ?= python3.12
AOT_VENV   := .venv-aot
AOT_OUT    ?= out/gpu-aot
AOT_ARGS   ?=

gpu-aot: $(AOT_VENV)/.installed
	PYTHONPATH=src $(AOT_VENV)/bin/python benchmarks/gpu_aot.py --out $(AOT_OUT) $(AOT_ARGS)

# --no-deps: every package is pinned in the file, and keras-hub's tensorflow-text stays out, as on the device.
$(AOT_VENV)/.installed: benchmarks/gpu-aot-requirements.txt
	@$(AOT_PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null || { \
		echo "make gpu-aot needs Python 3.12 (jax 0.11.2 does; '$(AOT_PYTHON)' is not it): AOT_PYTHON=/path/to/python3.12"; exit 1; }
	rm -rf $(AOT_VENV)
	$(AOT_PYTHON) -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/python -m pip install --quiet --no-deps -r benchmarks/gpu-aot-requirements.txt
	touch $@
