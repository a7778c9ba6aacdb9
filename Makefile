# Two entry points: `make demo` (the main job on its embedded default) and `make test`.
# Both create/reuse the local virtualenv .venv and install what they need.
# `make test` is the fast tier (lint, types, unit and multi-rank tests); `make test-slow` runs
# the cases marked slow (end to end, shaped links, fault injection); `make test-all` both, as CI.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all gpu-check results clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch==2.13.0 is pinned here so pip takes the local CPU build instead of a CUDA download,
	# and held there while the extras resolve (torchtitan's dependencies must not move it).
	$(BIN)/pip install -q torch==2.13.0
	echo torch==2.13.0 > $(VENV)/torch-pin.txt
	$(BIN)/pip install -q -c $(VENV)/torch-pin.txt -e '.[cli,dev,hf,torchtitan]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/deto train

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slow

test-all: test test-slow

# The first check on a machine with a GPU (at most 5 minutes): no install needed, torch suffices.
gpu-check:
	OMP_NUM_THREADS=1 PYTHONPATH=src python3 -m deto selftest --device cuda

# The committed benchmark results (docs/benchmarks.md): as root, at a clean commit.
SEEDS ?= 0,1,2
RESULTS ?= benchmarks/results/$(shell date +%Y-%m-%d)-cpu-2x2
results: $(STAMP)
	$(BIN)/deto bench --schemes hsdp,full,flexdemo,flexdemo-lean,none --bandwidth 100mbit,1gbit --seeds $(SEEDS) --out $(RESULTS)
	$(BIN)/deto bench --schemes hsdp,flexdemo,flexdemo-lean,none --bandwidth 25mbit --seeds $(SEEDS) --out $(RESULTS)-25mbit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
