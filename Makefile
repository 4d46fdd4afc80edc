# The two commands: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint migrate venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/outbox dev

test: $(STAMP) lint
	$(BIN)/pytest -n auto

lint: $(STAMP)
	$(BIN)/ruff check outbox tests
	$(BIN)/ruff format --check outbox tests
	$(BIN)/mypy outbox

migrate: $(STAMP)
	$(BIN)/outbox migrate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
