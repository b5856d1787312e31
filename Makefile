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

# Debian packages the tests use: a real Prometheus server (and promtool) for the metrics
# tests; Go with sprig and yaml.v3 to render the Helm chart (helm/render: there is no helm
# here); g++ for the engine's fused CPU decode step (engine/csrc, built on first use); iproute2
# for the multi-node test's network namespace (tests/test_multinode.py; skipped without root).
APT_PACKAGES := prometheus golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v3-dev g++ iproute2
GOCODE := /usr/share/gocode/src
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test lint serve demo bench chart system-packages gpu-check gpu-train
install: $(VENV)/.installed

system-packages:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v go >/dev/null && command -v g++ >/dev/null && \
		command -v ip >/dev/null && \
		[ -d $(GOCODE)/github.com/Masterminds/sprig ] && [ -d $(GOCODE)/gopkg.in/yaml.v3 ] || \
		($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES))

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install system-packages lint
	$(BIN)/python -m pytest -q

# Braid over HTTP (OpenAI API) on the embedded Countdown model: a local Ray cluster, one
# replica, http://127.0.0.1:8000/v1; Ctrl-C stops it. Options: make serve ARGS="--replicas 2".
serve: install
	$(BIN)/python -m cluster.serve $(ARGS)

# A minute with Braid: two replicas of the embedded model, live thread trees, timelines.
demo: install
	$(BIN)/python -m cluster.demo $(ARGS)

bench: install
	$(BIN)/python -m bench.kv_memory
	$(BIN)/python -m bench.engine
	$(BIN)/python -m bench.forkjoin
	$(BIN)/python -m bench.cluster

# On a machine with a CUDA GPU: the engine and fork-join tests on it and bench.engine --device
# cuda, one JSON line at the end (under 8 minutes); without a GPU it says so and exits 0.
# Give pip a CUDA build of torch there, e.g. TORCH="torch==2.13.0 --index-url <your CUDA wheels>".
gpu-check: install
	$(BIN)/python -m bench.gpu_check

# On a machine with a CUDA GPU: both embedded models trained on from the shipped checkpoints,
# at once on the one GPU, GPU_MINUTES each (the same budget, so the comparison stays fair),
# into /tmp/braid/train/{parallel,sequential}; evaluate there, copy over countdown/model* if better.
GPU_MINUTES ?= 10
gpu-train: install
	$(BIN)/python -m countdown.train --device cuda --format parallel --init-from countdown/model \
		--out /tmp/braid/train/parallel --minutes $(GPU_MINUTES) --batch-tokens 65536 --lr 5e-4 & p=$$!; \
	$(BIN)/python -m countdown.train --device cuda --format sequential --init-from countdown/model-sequential \
		--out /tmp/braid/train/sequential --minutes $(GPU_MINUTES) --batch-tokens 65536 --lr 5e-4 & s=$$!; \
	wait $$p; r=$$?; wait $$s && exit $$r

# The Helm chart's manifests without a helm binary (Go + sprig): make chart ARGS="-f helm/braid/values-gpu.yaml"
chart: system-packages
	GO111MODULE=off GOPATH=/usr/share/gocode go run ./helm/render --chart helm/braid $(ARGS)
