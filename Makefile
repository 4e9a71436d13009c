# README command 1: `make run`  -> environment + `dvc repro` of the embedded default + results table
# README command 2: `make test` -> environment + test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: env run test lint ui bench clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: env
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show
	$(BIN)/s2r report

test: env
	$(BIN)/python -m pytest -q

lint: env
	$(BIN)/ruff check src tests

ui: env
	$(BIN)/s2r ui

bench: env
	$(BIN)/s2r benchmark mixing --fractions 0,0.125,0.5,1

clean:
	rm -rf $(VENV)
