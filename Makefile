# metarun — `make help` lists the targets.
PYTHON ?= python3
TORCH ?= torch
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-all lint bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: TORCH=$(TORCH) (e.g. TORCH=torch==2.13.0)  ARGS='overrides for make run'"

install: $(STAMP) ## create .venv, install torch (TORCH variable) and metarun in editable mode with dev tools

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=64" wheel
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: install ## run the default job: ProtoNet on the built-in synthetic data (CPU, < 2 min)
	$(BIN)/metarun $(ARGS)

test: install ## run the fast test suite
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: install ## run every test, the slow ones too
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

lint: install ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install ## speed benchmarks, as ratios against baselines measured in the same run
	$(BIN)/python -m benchmarks.run_all $(ARGS)

L2L_VENV ?= .venv-l2l
L2L_TORCH ?= torch==2.14.1 torchvision==0.29.1
.PHONY: bench-env
bench-env: ## side env .venv-l2l: newest torch, learn2learn 0.2.0 (for benchmarks.bench_l2l)
	PYTHON=$(PYTHON) L2L_VENV=$(L2L_VENV) L2L_TORCH="$(L2L_TORCH)" bash benchmarks/l2l_env.sh

clean: ## remove run outputs, caches and build files (keeps .venv)
	rm -rf outputs/2* outputs/multirun build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -not -path "./$(L2L_VENV)/*" -prune -exec rm -rf {} +
