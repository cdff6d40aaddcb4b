# Set-up commands (see README): `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision are pinned in pyproject.toml (torch==2.14.1, torchvision==0.29.1).

.PHONY: demo test test-slow lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import adaptnn, torch; print('adaptnn', adaptnn.__version__, 'torch', torch.__version__)"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import pytest"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/adaptnn quickstart

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
