"""`outbox migrate --pg-cron` on a throwaway cluster with pg_cron preloaded.

The cluster is started from the local PostgreSQL binaries in a temporary directory on a
free port (never the shared server); the job is registered, not waited for."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from outbox.schedule import PG_CRON_JOB_NAME, Scheduler
from tests.e2e.conftest import OUTBOX, clean_env
from tests.private_pg import PG_BIN, PrivateCluster
from tests.purge.conftest import add_message, count, make_settings, open_store


def _pg_config(option: str) -> Path | None:
    try:
        out = subprocess.run(
            [str(PG_BIN / "pg_config"), option], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return Path(out.stdout.strip())


def _missing() -> str | None:
    if not (PG_BIN / "initdb").exists():
        return f"no PostgreSQL binaries in {PG_BIN} (set OUTBOX_TEST_PG_BIN)"
    lib, share = _pg_config("--pkglibdir"), _pg_config("--sharedir")
    if lib is None or share is None:
        return "pg_config did not answer"
    if not (lib / "pg_cron.so").exists() or not (share / "extension/pg_cron.control").exists():
        return (
            f"pg_cron is not installed for {PG_BIN} "
            "(apt-get install postgresql-15-cron; .ci/run does it)"
        )
    return None


@pytest.fixture
def pg_cron_url() -> Iterator[str]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="outbox-pgcron-"))
    try:
        cluster = PrivateCluster(
            base, "-c shared_preload_libraries=pg_cron -c cron.database_name=outbox_cron"
        )
        cluster.start()
        try:
            yield cluster.create_database("outbox_cron")
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _migrate(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OUTBOX, "migrate", "--pg-cron"],
        env=clean_env(OUTBOX_DATABASE_URL=url, OUTBOX_LOG_FORMAT="json", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_registers_the_purge_in_pg_cron(pg_cron_url: str) -> None:
    result = _migrate(pg_cron_url)
    assert result.returncode == 0, result.stderr

    with psycopg.connect(pg_cron_url) as conn:
        jobs = conn.execute(
            "SELECT jobid, jobname, schedule, command, database, active FROM cron.job"
        ).fetchall()
    assert len(jobs) == 1
    jobid, name, schedule, command, database, active = jobs[0]
    assert (name, schedule, database, active) == (
        PG_CRON_JOB_NAME,
        "0 3 * * *",
        "outbox_cron",
        True,
    )
    assert command == (
        "CALL outbox.purge(interval '604800 seconds', interval '2592000 seconds', "
        "interval '604800 seconds', 5000)"
    )
    with psycopg.connect(pg_cron_url, autocommit=True) as conn:
        conn.execute(command)  # what pg_cron will run, runs

    # Again, with another schedule: the same job, updated.
    result = _migrate(pg_cron_url, OUTBOX_PURGE_SCHEDULE="30 4 * * 1", OUTBOX_SENT_RETENTION="0")
    assert result.returncode == 0, result.stderr
    with psycopg.connect(pg_cron_url) as conn:
        again = conn.execute("SELECT jobid, schedule, command FROM cron.job").fetchall()
    assert again[0][:2] == (jobid, "30 4 * * 1") and len(again) == 1
    assert again[0][2].startswith("CALL outbox.purge(interval '604800 seconds', NULL, ")

    # The dispatchers see it and leave the job to pg_cron.
    settings = make_settings(pg_cron_url)

    async def owned() -> bool:
        async with open_store(settings) as store:
            return await Scheduler(settings, store).pg_cron_owns_job()

    assert asyncio.run(owned()) is True


def test_a_zero_retention_registered_in_pg_cron_keeps_those_rows(pg_cron_url: str) -> None:
    """OUTBOX_ERROR_RETENTION=0 and OUTBOX_EVENT_RETENTION=0 keep; the sent retention still
    applies. Until migration 009 the job's first run deleted every errored message."""
    result = _migrate(pg_cron_url, OUTBOX_ERROR_RETENTION="0", OUTBOX_EVENT_RETENTION="0")
    assert result.returncode == 0, result.stderr
    with psycopg.connect(pg_cron_url, autocommit=True) as conn:
        errored = add_message(conn, "error", finished_ago="400 days", attempts=4, events=1)
        add_message(conn, "sent", finished_ago="400 days", attempts=1)
        conn.execute("UPDATE outbox.events SET created_at = now() - interval '400 days'")
        row = conn.execute(
            "SELECT command FROM cron.job WHERE jobname = %s", [PG_CRON_JOB_NAME]
        ).fetchone()
    assert row is not None
    # As pg_cron runs it: one simple-protocol query on a connection of its own.
    with psycopg.connect(pg_cron_url, autocommit=True) as conn:
        done = conn.pgconn.exec_(row[0].encode())
        assert done.status == psycopg.pq.ExecStatus.TUPLES_OK, done.error_message
        assert count(conn, "SELECT count(*) FROM outbox.messages WHERE id = %s", errored) == 1
        assert count(conn, "SELECT count(*) FROM outbox.attempts") == 4
        assert count(conn, "SELECT count(*) FROM outbox.events") == 1
        assert count(conn, "SELECT count(*) FROM outbox.messages WHERE status = 'sent'") == 0


def test_migrate_pg_cron_where_it_is_not_preloaded_is_one_line(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SHOW shared_preload_libraries").fetchone()
        available = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_cron'"
        ).fetchone()
    if row and "pg_cron" in row[0]:
        pytest.skip("the test server preloads pg_cron: registering there is not for tests")
    result = _migrate(database_url)
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]
    # Installed but not preloaded, or not installed at all: either way one line saying so.
    reason = "shared_preload_libraries" if available == (1,) else "not installed"
    assert last.startswith("outbox: --pg-cron:") and reason in last, last
