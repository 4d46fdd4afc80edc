"""A retention of 0 keeps, in every path: the SQL procedures and the dispatchers' schedule.

(pg_cron's path, registration and the job's command, is in test_pg_cron.)"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from outbox.schedule import PURGE_JOB, Outcome, Scheduler, pg_cron_command
from outbox.settings import Settings
from tests.purge.conftest import add_message, count, make_settings, open_store

TICK = datetime(2030, 1, 10, 3, 0, tzinfo=UTC)


def old_rows(conn: psycopg.Connection[Any]) -> None:
    """One of each kind a purge deletes, far older than any default retention."""
    add_message(conn, "error", finished_ago="400 days", attempts=4, events=1)
    add_message(conn, "sent", finished_ago="400 days", attempts=1)
    add_message(conn, "cancelled", finished_ago="400 days")
    # the errored message's event
    conn.execute("UPDATE outbox.events SET created_at = now() - interval '400 days'")


def kept(conn: psycopg.Connection[Any]) -> tuple[int, int, int, int]:
    return (
        count(conn, "SELECT count(*) FROM outbox.messages WHERE status = 'error'"),
        count(conn, "SELECT count(*) FROM outbox.messages WHERE status IN ('sent', 'cancelled')"),
        count(conn, "SELECT count(*) FROM outbox.attempts"),
        count(conn, "SELECT count(*) FROM outbox.events"),
    )


@pytest.mark.parametrize("older_than", ["0 seconds", "-1 day", None])
def test_purge_errored_with_a_zero_interval_keeps_them(
    sql_conn: psycopg.Connection[Any], older_than: str | None
) -> None:
    old_rows(sql_conn)
    notices: list[str] = []
    sql_conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))

    row = sql_conn.execute("CALL outbox.purge_errored(%s::interval)", [older_than]).fetchone()

    assert row == (0,)
    assert kept(sql_conn) == (1, 2, 5, 1)
    assert any("retention 0" in notice for notice in notices), notices


def test_the_job_a_zero_retention_registered_before_the_fix_keeps_everything(
    sql_conn: psycopg.Connection[Any],
) -> None:
    """The command `outbox migrate --pg-cron` wrote for three zero retentions until now."""
    old_rows(sql_conn)
    command = (
        "CALL outbox.purge(interval '0 seconds', interval '0 seconds', interval '0 seconds', 5000)"
    )
    assert sql_conn.execute(command).fetchone() == (0, 0, 0)
    assert kept(sql_conn) == (1, 2, 5, 1)


def test_the_pg_cron_command_writes_a_zero_retention_as_null() -> None:
    settings = Settings(
        database_url="postgresql://unused", error_retention=0, sent_retention=0, event_retention=0
    )
    assert pg_cron_command(settings) == "CALL outbox.purge(NULL, NULL, NULL, 5000)"


def test_the_dispatchers_scheduled_purge_with_zero_retentions_keeps_everything(
    sql_conn: psycopg.Connection[Any], database_url: str
) -> None:
    old_rows(sql_conn)
    sql_conn.execute(
        "INSERT INTO outbox.job_runs (job, tick, finished_at, rows) VALUES (%s, %s, %s, 0)",
        [PURGE_JOB, TICK.replace(day=9), TICK.replace(day=9)],
    )
    settings = make_settings(database_url, error_retention=0, sent_retention=0, event_retention=0)

    async def go() -> Outcome:
        async with open_store(settings) as store:
            return await Scheduler(settings, store, now=lambda: TICK).run_due()

    assert asyncio.run(go()) is Outcome.RAN  # the real purge ran for this tick
    run = sql_conn.execute(
        "SELECT rows, detail FROM outbox.job_runs WHERE job = %s AND tick = %s", [PURGE_JOB, TICK]
    ).fetchone()
    assert run is not None and run[0] == 0, run
    assert kept(sql_conn) == (1, 2, 5, 1)
