# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torchaudio must match torch exactly; espnet 202511 resolves with this pair.
TORCH := torch==2.11.0 torchaudio==2.11.0
# Debian and PyPI packages of the offline speech recipe (TTS engines, voice transforms, pocketsphinx).
RECIPE_DEPS := egs/synth_domains/asr1/local/install_deps.sh

.PHONY: setup demo test lint benchmark fusion-bench

setup: $(STAMP)

$(STAMP): pyproject.toml $(RECIPE_DEPS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'pip<25'
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[espnet,dev]'
	bash $(RECIPE_DEPS) $(BIN)/python
	touch $(STAMP)

demo: $(STAMP)
	bash egs/synth_domains/asr1/run.sh --profile quick

# Two pytest workers, one test file each at a time (module fixtures are built once): 16 minutes
# here against 27 in one process.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" -q --durations=15 -n $(PYTEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

benchmark: $(STAMP)
	$(BIN)/python benchmarks/adapter_speed.py

# Our merge methods against FusionBench's on the same tensors (tests/merging/test_fusion_bench.py),
# in a separate environment: fusion-bench resolves beside espnet but pulls datasets, pandas, pyarrow
# and tensorboard, which the main install does not need.
FUSION_VENV := .venv-fusion
fusion-bench:
	$(PYTHON) -m venv $(FUSION_VENV)
	$(FUSION_VENV)/bin/python -m pip install --quiet torch==2.11.0 -e '.[fusion]'
	$(FUSION_VENV)/bin/python -m pytest -q tests/merging/test_fusion_bench.py
