# `make demo` and `make test` set everything up on a fresh machine, then run.
# torch==2.13.0 is installed first (the CPU wheel), so that installing crisp never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.crisp-installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/crisp demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The four performance benchmarks of the README (about 4 minutes each on 2 cores).
bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/selfdistill_vs_trl.py
	$(BIN)/python bench/grpo_vs_trl.py
	$(BIN)/python bench/long_sequence_kl.py
	$(BIN)/python bench/rollout_throughput.py

clean:
	rm -rf runs .pytest_cache
