# Quick start: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision: the releases whose wheels this machine keeps on disk.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# CI runs every test; locally `make test-fast` skips the slow breadth tests.
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint install install-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PIP) install -q $(TORCH_PINS)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[test,timm,serve,ray,video,storage]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/featuremaps demo

lint: install-test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: lint
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

bench: install-test
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) featuremaps-demo featuremaps-out .pytest_cache .mypy_cache .ruff_cache
