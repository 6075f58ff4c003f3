# Two commands set everything up on a fresh machine: `make run` and `make test`.
# Each creates .venv from requirements.txt on first use; the stamp makes re-runs free.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

PRESET   ?= guide
DATA_DIR ?=
MIRROR   ?=
# Extra overrides, e.g. SET="pretrain.epochs=2 finetune.epochs=1"
SET      ?=

export ENCODERFLOW_HOME ?= $(CURDIR)/.encoderflow

RUN_ARGS := --preset $(PRESET) \
	$(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
	$(if $(MIRROR),--mirror $(MIRROR)) \
	$(foreach s,$(SET),--set $(s))

.PHONY: run test test-fast airflow venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/encoderflow run $(RUN_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -ra

# Everything but the end-to-end Airflow runs.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slow"

airflow: $(STAMP)
	$(BIN)/encoderflow airflow

clean:
	rm -rf $(VENV) build src/*.egg-info
