# Everyday targets. `make demo` and `make test` work on a fresh machine: they create .venv,
# install the CPU build of PyTorch first where there is no NVIDIA GPU (a bare `torch`
# requirement would pull a multi-GB CUDA build), then the project with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# 2.13.0 is the CPU build on these machines; on a GPU machine pip resolves torch from pyproject.toml.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-integration test-slow typecheck docs docs-build lint format bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet "$(TORCH_CPU)"; fi
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) launch.py

# The README's test command (and CI's, .ci/run): the quick checks first (type check, docs build:
# well under a minute together), then unit, integration (local Ray + S3 on loopback), slow.
test: setup typecheck docs-build
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

# mypy over the installed package's modules ([tool.mypy] in pyproject.toml). mypy names modules
# by folder, and the package's folder is the repository root: build/typecheck/shardtune links to
# it so that files are checked as shardtune.data..., the names their imports use.
typecheck: setup
	mkdir -p build/typecheck && ln -sfn ../.. build/typecheck/shardtune
	$(VENV)/bin/mypy

# The guide (docs/, mkdocs.yml): `make docs` serves it with live reload; `make docs-build` writes
# site/ and fails on any warning (a broken link, a missing bench table, a page left out of nav).
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs
docs: setup
	$(MKDOCS) serve

docs-build: setup
	$(MKDOCS) build --strict --quiet

# One short benchmark (a few minutes); it writes docs/bench/stream_bench.md. The others, and what
# they take: docs/benchmarks.md.
bench: setup
	$(PY) -m bench.stream_bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache site build/typecheck build/mypy_cache
