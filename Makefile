# Set-up commands (see README): `make demo` and `make test` work on a fresh clone.
# pyproject.toml declares the supported version ranges; constraints.txt pins the exact versions used here
# (torch==2.14.1, torchvision==0.29.1) and every install below passes it with `-c`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
PYTEST := $(PY) -m pytest -q

# bash with pipefail: a failed pip install fails the target even though its output is filtered.
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -ec

.PHONY: demo test test-integration test-slow test-gpu test-all lint format clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import adaptnn, torch; print('adaptnn', adaptnn.__version__, 'torch', torch.__version__)"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import pytest, timm, transformers"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/adaptnn quickstart

# Test tiers (markers in pyproject.toml); each test belongs to exactly one of the first three.
test: $(VENV)/.installed-dev  ## unit tier: the default, a few minutes on 2 cores
	$(PYTEST) -m 'not slow and not integration'

test-integration: $(VENV)/.installed-dev  ## DDP launches, run-directory workflows, training integration
	$(PYTEST) -m 'integration and not slow'

test-slow: $(VENV)/.installed-dev  ## long checks (benchmarks, compiled training)
	$(PYTEST) -m slow

test-gpu: $(VENV)/.installed-dev  ## CUDA checks (also collected by the unit tier, where they skip without a GPU)
	$(PYTEST) -m gpu

test-all: test test-integration test-slow  ## every tier, as CI runs them

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
