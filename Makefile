# Mailroom: `make run` brings the system up, `make test` proves it. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit integration bench services clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

# The whole system against the local RabbitMQ, PostgreSQL and Redis; Ctrl-C stops it.
run: $(STAMP)
	$(BIN)/mailroom dev

# Everything CI runs: lint, types, then the whole suite against the real services.
test: $(STAMP) services lint typecheck
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check shared services tests
	$(BIN)/ruff format --check shared services tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# Starts RabbitMQ, PostgreSQL and Redis when they are installed but not running, and installs
# the mail lab's Dovecot (the tests start their own private instance).
services:
	@scripts/ensure-services
	@scripts/install-mail-lab

bench: $(STAMP) services
	$(BIN)/python -m tests.perf.config_event_latency
	$(BIN)/python -m tests.perf.fetcher_throughput
	$(BIN)/python -m tests.perf.sender_throughput
	$(BIN)/python -m tests.perf.sender_far_server
	$(BIN)/python -m tests.perf.sender_fairness

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var
