# `make serve` and `make test` set up everything on a fresh machine (a virtualenv in .venv).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: serve test lint

serve: $(VENV)/.installed
	$(PY) -m service

test: $(VENV)/.installed
	$(PY) -m ruff check service trainer tests bench
	$(PY) -m mypy
	$(PY) -m pytest

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@
