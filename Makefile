# Everyday targets. `make demo` and `make test` work on a fresh machine: they create .venv,
# install the CPU build of PyTorch first where there is no NVIDIA GPU (a bare `torch`
# requirement would pull a multi-GB CUDA build), then the project with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# 2.13.0 is the CPU build on these machines; on a GPU machine pip resolves torch from pyproject.toml.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-integration test-slow lint format bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet "$(TORCH_CPU)"; fi
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) launch.py

# The README's test command: unit, then integration (local Ray + S3 on loopback), then slow.
test: setup
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)
	$(PY) -m pytest tests/integration -q -x $(PYTEST_ARGS)
	$(PY) -m pytest tests/slow -q -x $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest tests/integration -q -x $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest tests/slow -q -x $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) -m bench.stream_bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
