# `make serve` and `make test` set up everything on a fresh machine (a virtualenv in .venv; checkov, which
# checks the Kubernetes manifests, in a virtualenv of its own, .venv-tools, since it pins libraries the
# project uses in other versions).
VENV ?= .venv
TOOLS ?= .venv-tools
PYTHON ?= python3
PY := $(VENV)/bin/python
CHECKOV ?= checkov>=3.2,<4

.PHONY: serve test lint

serve: $(VENV)/.installed
	$(PY) -m service

test: $(VENV)/.installed $(TOOLS)/.installed
	$(PY) -m ruff check service trainer tests bench
	$(PY) -m mypy
	$(PY) -m pytest

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet '$(CHECKOV)'
	touch $@
