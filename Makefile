# Aegis developer commands. `make test` and `make run` work on a fresh machine with python3 >= 3.11.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run up demo test lint bench services clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Aegis's main job on embedded defaults (SQLite + in-memory stores, in a temporary directory):
## the all-in-one server and gateway, a small multi-agent system, the reference scenarios and a
## report of every outcome; exits non-zero if one was not as expected (docs/quickstart.md).
run: install
	$(BIN)/aegis demo

demo: run

## Aegis serving on embedded defaults (SQLite under ./.aegis, in-memory stores): token service,
## admin API and metrics on http://127.0.0.1:8080, until interrupted.
up: install
	$(BIN)/aegis up

## The whole test suite. Redis and PostgreSQL must be up on 127.0.0.1 (see `make services`).
test: install services
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: install
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

## Start the local Redis and PostgreSQL the tests talk to, if they are not running.
services:
	@bash scripts/services.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
