# The two README commands: `make demo` and `make test`. Each creates .venv if missing and installs idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export RAY_DATA_DISABLE_PROGRESS_BARS ?= 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo serve test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the dependency list or pins change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m jobs.demo

# Keeps the demo's models up on http://127.0.0.1:8000 (run `make demo` first); Ctrl-C stops it.
serve: install
	$(BIN)/python -m jobs.serve --config jobs/configs/serve_demo.yaml

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_tokenize.py
	$(BIN)/python benchmarks/bench_minhash.py
	$(BIN)/python benchmarks/bench_prepare_scale.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_serve.py

clean:
	rm -rf outputs .pytest_cache
