# authproxy — every target installs what it needs into ./.venv on first use.
# A fresh machine needs only Python 3.11, make and the package index.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test check fmt lint typecheck bench clean lock

venv: $(STAMP)

# Pinned, complete lock (direct and transitive); the project itself is installed editable.
$(STAMP): requirements/dev.lock requirements/oracle.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/oracle.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/authproxy demo

test: $(STAMP)
	$(BIN)/python -m pytest

fmt: $(STAMP)
	$(BIN)/ruff format proxy keycache tests loadtests

lint: $(STAMP)
	$(BIN)/ruff format --check proxy keycache tests loadtests
	$(BIN)/ruff check proxy keycache tests loadtests

typecheck: $(STAMP)
	$(BIN)/mypy --strict proxy keycache

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python -m loadtests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
