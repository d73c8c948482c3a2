# tlpipe — the two commands: `make demo` and `make test`. Both bootstrap .venv with uv from uv.lock.
SHELL := /bin/bash
# Processes (Ray workers included) must cache bytecode, or each recompiles torch at start-up.
unexport PYTHONDONTWRITEBYTECODE
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
# uv from PATH, else installed with pip (python3 -m uv works wherever pip put it).
UV = $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
DEMO_DATA ?= $(CURDIR)/../shared/data/clothing-small.tar.gz
PYTEST_ARGS ?=

.PHONY: help venv demo test test-fast bench lint clean

help:
	@echo "make demo   - validate, extract and probe clothing-small end to end (offline, CPU)"
	@echo "make test   - run the test suite (bootstraps .venv)"
	@echo "make bench  - run the benchmarks (~2 h, incl. a 10-minute soak) and write BENCHMARKS.md"

$(VENV)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen
	@touch $@

venv: $(VENV)/.synced

demo: venv
	$(PY) -m cli.demo --data "$(DEMO_DATA)"

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: venv
	$(PY) -m bench.extract --write
	$(PY) -m bench.extract --int8 --write
	$(PY) -m bench.probe --cifar 5000 --no-sklearn-all --repeats 2 --write
	$(PY) -m bench.probe --cifar 500 --write
	$(PY) -m bench.serve --write
	$(PY) -m bench.serve --multi --rounds 3 --duration 8 --warmup 2 --clients 4,16 --write
	$(PY) -m bench.serve_int8 --duration 12 --clients 1,4,16 --write
	$(PY) -m bench.soak --minutes 10 --write
	$(PY) -m bench.multilabel --train 1200 --val 300 --test 500 --size 128 --values 20 --write
	$(PY) -m bench.accuracy --dataset both --write --keep-root
	$(PY) -m bench.selection_speed --cifar-subset 300/50/100 --cifar-subset 600/100/100 --write
	$(PY) -m bench.mlp_width --write

clean:
	rm -rf $(VENV) .pytest_cache
