"""The purge's clock is a parameter (the database's own when not given): a purge as of a
later time deletes what the retention will let go by then, and nothing sooner."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import psycopg

from outbox.purge import dry_run, run_purge
from outbox.store import PurgeCounts
from tests.purge.conftest import add_message, count, make_settings, open_store

ERRORED = "SELECT count(*) FROM outbox.messages WHERE status = 'error'"


def test_a_purge_as_of_a_later_time_deletes_what_the_retention_lets_go_by_then(
    sql_conn: psycopg.Connection[Any], database_url: str
) -> None:
    add_message(sql_conn, "error", finished_ago="6 days", attempts=1)  # retention: 7 days
    database_now = sql_conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    settings = make_settings(database_url)

    async def purge_at(days_later: float, *, dry: bool = False) -> PurgeCounts:
        at = database_now + timedelta(days=days_later)
        async with open_store(settings) as store:
            if dry:
                return await dry_run(store, settings, now=at)
            return await run_purge(store, settings, now=at)

    assert asyncio.run(purge_at(0)).errored == 0
    assert asyncio.run(purge_at(0.9)).errored == 0  # not yet seven days old by then
    assert count(sql_conn, ERRORED) == 1
    assert asyncio.run(purge_at(1.1, dry=True)).errored == 1
    assert count(sql_conn, ERRORED) == 1  # a dry run deletes nothing
    assert asyncio.run(purge_at(1.1)) == PurgeCounts(errored=1)
    assert count(sql_conn, ERRORED) == 0
    assert count(sql_conn, "SELECT count(*) FROM outbox.attempts") == 0
