# The two commands: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The pinned, hash-checked dependency set (`make lock` writes both from pyproject.toml):
# LOCK is what the image installs, DEV_LOCK the same pins plus the dev extra.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
UV := $(BIN)/uv
UV_STAMP := $(VENV)/.uv

.PHONY: run test lint migrate schema venv clean bench bench-peers fuzz lock audit

# uv installs the locked set in seconds where pip takes most of a minute. It is itself
# pinned in DEV_LOCK: the venv's pip installs that one entry, hashes checked.
$(UV_STAMP): $(DEV_LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	awk '/^uv==/ { keep = 1 } keep { print } keep && !/\\$$/ { exit }' $(DEV_LOCK) > $(VENV)/uv.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(VENV)/uv.txt
	touch $(UV_STAMP)

# Exactly the locked set (sync also removes what the lock no longer has), then outbox
# itself, editable. A dependency added to pyproject.toml without `make lock` is not
# installed: tests/ops/test_lock.py fails, naming it.
$(STAMP): $(DEV_LOCK) pyproject.toml $(UV_STAMP)
	$(UV) pip sync --quiet --python $(BIN)/python --require-hashes $(DEV_LOCK)
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Re-resolve after editing pyproject.toml's dependencies: pins already in the locks are
# kept where they still fit; UPGRADE=1 moves every pin to the newest release that does.
# One universal resolution (any OS, Python >= 3.11); the runtime lock is constrained to
# the dev lock's pins, so the image runs the versions the tests ran.
LOCK_ARGS = --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade)
lock: $(UV_STAMP)
	$(UV) pip compile $(LOCK_ARGS) --extra dev pyproject.toml -o $(DEV_LOCK)
	$(UV) pip compile $(LOCK_ARGS) --constraint $(DEV_LOCK) pyproject.toml -o $(LOCK)

# Known vulnerabilities in the locked set (pip-audit against PyPI's advisory data, else
# OSV's). Not part of `make test`: a newly published advisory must not turn CI red.
# Exit 1 when a pinned release has one; where neither database answers, one line says
# so and nothing is audited: exit 0, or 2 with AUDIT_STRICT=1 (for a job that must know).
audit: $(STAMP)
	@$(BIN)/python -m tests.ops.audit $(DEV_LOCK)

run: $(STAMP)
	$(BIN)/outbox dev

test: $(STAMP) lint
	$(BIN)/pytest -n auto

lint: $(STAMP)
	$(BIN)/ruff check outbox tests bench
	$(BIN)/ruff format --check outbox tests bench
	$(BIN)/mypy outbox

# The benchmark's workloads (bench/README.md) against the real processes on a fresh database of the local PostgreSQL
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

# sql/schema.sql: a scratch database on the test server, migrated and dumped (outbox/schemadump.py).
schema: $(STAMP)
	$(BIN)/python -m outbox.schemadump

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
