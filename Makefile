# Every target sets itself up: a virtual environment in .venv with the project installed
# (editable) and its test extras. torch is pinned and installed first: a CPU build of 2.13.0 is
# what the project is developed with, and an unpinned torch would pull a multi-GB CUDA build.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: all setup demo test test-quick lint format bench clean distclean help
.DEFAULT_GOAL := help

help:
	@echo "make demo       reconstruct the bundled demo data into $(DEMO_DIR)/"
	@echo "make test       lint, then the test suite (Testing/)"
	@echo "make test-quick lint, then the tests not marked slow (a quick loop)"
	@echo "make lint       ruff check and ruff format --check"
	@echo "make format     ruff format (rewrites files)"
	@echo "make bench      benchmarks (bench/run_all.py), tables into docs/benchmarks.md"
	@echo "make setup      only create $(VENV) and install the project"
	@echo "make clean      remove outputs and caches; make distclean also removes $(VENV)"

all: test

# A half-made environment (e.g. no ensurepip) is removed so that the next run starts clean.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

# Reinstalled only when pyproject.toml changes (or the environment is new).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/gaussiansvr demo --output-dir $(DEMO_DIR)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .

test: lint
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest

test-quick: lint
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	@if [ -f bench/run_all.py ]; then \
		$(BIN)/python bench/run_all.py; \
	else \
		echo "bench/run_all.py not found: no benchmark to run"; exit 1; \
	fi

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
