# FoloVLLM: `make demo` and `make test` each work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
NEWEST := $(shell ls -d m[0-9]_*/__main__.py 2>/dev/null | sort | tail -n 1 | cut -d/ -f1)
MODEL  ?=
PROMPT ?= Hello, my name is

.PHONY: setup demo test test-fast lint docs docs-build bench clean

# One stamp file: the venv exists and the project with its dev extras is installed.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The CPU build of torch, unless a torch is importable already (a GPU machine keeps its own).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m $(NEWEST) $(if $(MODEL),--model $(MODEL)) "$(PROMPT)"

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

docs: setup
	$(VENV)/bin/mkdocs serve

docs-build: setup
	$(VENV)/bin/mkdocs build --strict

bench: setup
	$(PY) -m benchmarks.throughput --milestone $(NEWEST) --scale 0.02

clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache
