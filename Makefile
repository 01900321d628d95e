# dtem_lightning — common tasks. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTHON ?= python3
ACCELERATOR ?= cpu

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint format bench-throughput

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## Create .venv and install the package with its dev extra

test: $(VENV)/.installed ## Run the default test suite (under 10 minutes on 2 CPU cores)
	$(BIN)/pytest -q -m "not slow"

test-all: $(VENV)/.installed ## Run every test, the slow ones included
	$(BIN)/pytest -q

lint: $(VENV)/.installed ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed ## Format and autofix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-throughput: $(VENV)/.installed ## Images/s of DeiT-S at r = 0/8/13/16 for NoMerge, ToMe, DTEMHard
	$(PY) experiments/throughput.py
