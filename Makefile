# README command 1: `make run`  -> environment + `dvc repro` of the embedded default + results table
# README command 2: `make test` -> environment + lint + type check + test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: env run run-second-cpu test test-postgres lint ui bench gpu-check clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: env
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show
	$(BIN)/s2r report --readme README.md   # also rewrites README's generated results block (paper verdicts)

# The same pipeline on a second CPU type's kernels (docs/verdicts.md): ATen's portable code path and oneDNN capped
# to AVX (no AVX2 / FMA), so every training's numerics differ from `make run`'s; the verdicts must not. Run after
# `make run`: its verdicts are kept as data/metrics/verdicts-first-cpu.json and the report lists any that changed.
# Slower: ~2x the CPU time of `make run` on an AVX2 machine. (MKL_ENABLE_INSTRUCTIONS changes nothing here.)
SECOND_CPU := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX
run-second-cpu: env
	cp data/metrics/verdicts.json data/metrics/verdicts-first-cpu.json
	$(SECOND_CPU) $(BIN)/dvc repro --force
	$(BIN)/s2r report --compare data/metrics/verdicts-first-cpu.json

# ruff and mypy first: they fail in seconds (mypy ~1 min cold, ~1 s with its cache) where pytest takes minutes.
test: env
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# Only the PostgreSQL tests, against a throwaway server (tests/services/postgres.sh; installs PostgreSQL from
# Debian packages if needed), stopped afterwards. A set S2R_TEST_POSTGRES_URL is used as is. tests/test_team.py
# starts its own cluster and MLflow server (s2r team up) with those binaries.
test-postgres: env
	@set -e; url="$$S2R_TEST_POSTGRES_URL"; \
	if [ -z "$$url" ]; then \
	  trap 'bash tests/services/postgres.sh stop' EXIT; \
	  out=$$(bash tests/services/postgres.sh); url=$$(printf '%s\n' "$$out" | tail -n 1); \
	fi; \
	S2R_TEST_POSTGRES_URL="$$url" $(BIN)/python -m pytest -q -m postgres tests/test_tune_postgres.py tests/test_team.py

lint: env
	$(BIN)/ruff check src tests
	$(BIN)/mypy

ui: env
	$(BIN)/s2r ui

bench: env
	$(BIN)/s2r benchmark mixing --fractions 0,0.125,0.5,1

# On a CUDA machine: every method in bf16 (train, resume, evaluate) + CUT timed at paper settings, one JSON.
# Without CUDA: one line, exit 0. Side by side with the official CUT: make gpu-check CUT_REFERENCE=/path/to/checkout
gpu-check: env
	$(BIN)/s2r gpu-check $(if $(CUT_REFERENCE),--reference $(CUT_REFERENCE))

clean:
	rm -rf $(VENV)
