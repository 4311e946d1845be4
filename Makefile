# Set-up and entry points. `make demo` and `make test` are the two commands the README gives:
# each builds what it needs (a virtualenv in .venv, Azurite in node_modules) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
AZURITE := node_modules/.bin/azurite-blob

.PHONY: demo test lint typecheck pytest docs bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,docs]'
	touch $@

$(AZURITE): package.json
	npm install --no-audit --no-fund --no-package-lock --loglevel=error
	touch $@

demo: $(BIN)/.installed $(AZURITE)
	$(BIN)/joblib-azurebatch demo

lint: $(BIN)/.installed
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check --no-cache .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

pytest: $(BIN)/.installed $(AZURITE)
	$(BIN)/pytest -q -ra

test: lint typecheck docs pytest

docs: $(BIN)/.installed
	$(BIN)/mkdocs build --strict

# The peers the benchmark compares (dask, matplotlib for its plot) are the bench extra's.
$(VENV)/.bench-installed: $(BIN)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

# `make bench BENCH_ARGS=--quick` for a smoke run; see `python -m bench.run --help`.
bench: $(VENV)/.bench-installed $(AZURITE)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache site
