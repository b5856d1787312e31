# Braid's two entry points: `make serve` runs the main job, `make test` runs the suite.
# Each creates .venv and installs what it needs. On CPU-only machines torch==2.13.0 is
# installed first so pip does not pull a multi-GB CUDA build.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

.PHONY: install test lint serve bench
install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/python -m pytest -q

# The Serve app on the embedded model lands with the serving milestone; until then this
# says so instead of pretending.
serve: install
	@echo "make serve: not available yet - Braid's HTTP service arrives with the serving milestone."
	@echo "What runs today: make test, make bench (KV cache memory)."
	@exit 1

bench: install
	$(BIN)/python -m bench.kv_memory
	$(BIN)/python -m bench.engine
	$(BIN)/python -m bench.forkjoin
