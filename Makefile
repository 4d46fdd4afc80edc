# The two commands: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint migrate venv clean bench bench-peers fuzz

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
	$(BIN)/ruff check outbox tests bench
	$(BIN)/ruff format --check outbox tests bench
	$(BIN)/mypy outbox

# Issue 5's workloads against the real processes on a fresh database of the local PostgreSQL
# (or OUTBOX_BENCH_DATABASE_URL, whose outbox tables it empties): table on stdout,
# bench/results/<timestamp>.json.
# BENCH_QUICK=1 for a smoke run; `$(BIN)/python -m bench.selfcheck` checks the bench itself.
bench: $(STAMP)
	$(BIN)/python -m bench.run

# Schemathesis from the published /openapi.json against a real `outbox serve` on a fresh
# database of the local PostgreSQL (or OUTBOX_TEST_DATABASE_URL's server): every phase
# and check, as a user and as an admin; totals on stdout, exit 1 on any failure or 5xx.
# FUZZ_EXAMPLES (cases per operation and phase, default 100) and FUZZ_SEED tune it;
# `make test` runs a short version (tests/fuzz).
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz

# The peers (floor, PgQueuer, graphile-worker) with the harness beside the checkout.
PEERS := ../shared/peers
bench-peers:
	@if [ -x $(PEERS)/run.sh ]; then \
		$(PEERS)/run.sh floor pgqueuer graphile summary; \
	else \
		echo "bench-peers: no peer harness at $(PEERS)/run.sh (expected beside this checkout); nothing run" >&2; \
		exit 1; \
	fi

migrate: $(STAMP)
	$(BIN)/outbox migrate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
