"""The purge: retention boundaries, cascades, batches, `outbox purge` as a process."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import psycopg

from outbox import purge
from outbox.store import PurgeCounts
from tests.e2e.conftest import OUTBOX, clean_env
from tests.purge.conftest import add_message, count, make_settings, open_store


def test_errored_rows_older_than_7_days_go_with_their_attempts_and_events(
    sql_conn: psycopg.Connection[Any],
) -> None:
    kept = add_message(sql_conn, "error", finished_ago="6 days 23 hours", attempts=4, events=1)
    doomed = add_message(sql_conn, "error", finished_ago="7 days 1 hour", attempts=4, events=1)
    others = [
        add_message(sql_conn, "pending", attempts=1, events=1),
        add_message(sql_conn, "in_flight", locked_until_in="-1 hour", attempts=2),
        add_message(sql_conn, "sent", finished_ago="8 days", attempts=1, events=1),
        add_message(sql_conn, "cancelled", finished_ago="8 days"),
    ]

    row = sql_conn.execute("CALL outbox.purge_errored()").fetchone()

    assert row == (1,)
    ids = {r[0] for r in sql_conn.execute("SELECT id FROM outbox.messages").fetchall()}
    assert ids == {kept, *others}
    assert (
        count(sql_conn, "SELECT count(*) FROM outbox.attempts WHERE message_id = %s", doomed) == 0
    )
    assert count(sql_conn, "SELECT count(*) FROM outbox.events WHERE message_id = %s", doomed) == 0
    assert count(sql_conn, "SELECT count(*) FROM outbox.attempts WHERE message_id = %s", kept) == 4
    assert count(sql_conn, "SELECT count(*) FROM outbox.events WHERE message_id = %s", kept) == 1
    statuses = sql_conn.execute(
        "SELECT status, count(*) FROM outbox.messages GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert statuses == [
        ("cancelled", 1),
        ("error", 1),
        ("in_flight", 1),
        ("pending", 1),
        ("sent", 1),
    ]


def test_the_procedure_takes_an_interval_and_reports_a_notice(
    sql_conn: psycopg.Connection[Any],
) -> None:
    add_message(sql_conn, "error", finished_ago="2 days")
    add_message(sql_conn, "error", finished_ago="12 hours")
    notices: list[str] = []
    sql_conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))

    assert sql_conn.execute("CALL outbox.purge_errored('1 day', 10)").fetchone() == (1,)
    assert any("1 errored messages" in notice for notice in notices), notices


def test_sent_cancelled_and_event_retention(
    sql_conn: psycopg.Connection[Any], database_url: str
) -> None:
    old_sent = add_message(sql_conn, "sent", finished_ago="31 days", events=1)
    old_cancelled = add_message(sql_conn, "cancelled", finished_ago="31 days")
    add_message(sql_conn, "sent", finished_ago="29 days")
    recent = add_message(sql_conn, "sent", finished_ago="1 hour")
    sql_conn.execute(
        """INSERT INTO outbox.events (message_id, user_id, event, data, created_at)
           VALUES (%(id)s, 'user-1', 'message_sent', '{}', now() - interval '8 days'),
                  (%(id)s, 'user-1', 'message_sent', '{}', now() - interval '6 days')""",
        {"id": recent},
    )
    settings = make_settings(database_url)

    async def go() -> PurgeCounts:
        async with open_store(settings) as store:
            return await purge.run_purge(store, settings)

    counts = asyncio.run(go())

    assert counts == PurgeCounts(errored=0, sent=2, events=1)
    ids = {r[0] for r in sql_conn.execute("SELECT id FROM outbox.messages").fetchall()}
    assert old_sent not in ids and old_cancelled not in ids and len(ids) == 2
    assert count(sql_conn, "SELECT count(*) FROM outbox.events") == 1


def test_a_retention_of_0_keeps(sql_conn: psycopg.Connection[Any], database_url: str) -> None:
    add_message(sql_conn, "sent", finished_ago="400 days")
    add_message(sql_conn, "error", finished_ago="400 days")
    sql_conn.execute(
        """INSERT INTO outbox.events (message_id, user_id, event, data, created_at)
           SELECT id, 'user-1', 'message_sent', '{}', now() - interval '400 days'
           FROM outbox.messages"""
    )
    settings = make_settings(database_url, sent_retention=0, event_retention="0")

    async def go() -> PurgeCounts:
        async with open_store(settings) as store:
            return await purge.run_purge(store, settings)

    assert asyncio.run(go()) == PurgeCounts(errored=1, sent=0, events=0)
    assert count(sql_conn, "SELECT count(*) FROM outbox.messages WHERE status = 'sent'") == 1
    assert sql_conn.execute("CALL outbox.purge_sent('0 days')").fetchone() == (0,)
    assert count(sql_conn, "SELECT count(*) FROM outbox.events") == 1


def _add_errored(conn: psycopg.Connection[Any], n: int, ago: str) -> None:
    conn.execute(
        """WITH m AS (
               INSERT INTO outbox.messages
                   (id, user_id, "to", type, payload, request_hash, status, attempts,
                    max_attempts, finished_at)
               SELECT gen_random_uuid(), 'user-1', '5511999999999', 'text', '{}', '\\x00',
                      'error', 2, 4, now() - %s::interval
               FROM generate_series(1, %s)
               RETURNING id, finished_at)
           INSERT INTO outbox.attempts
               (message_id, attempt, dispatcher, started_at, finished_at, outcome)
           SELECT id, a, 'd-1', finished_at, finished_at, 'transient'
           FROM m, generate_series(1, 2) a""",
        [ago, n],
    )


def test_20000_errored_rows_are_purged_in_batches(
    sql_conn: psycopg.Connection[Any], database_url: str
) -> None:
    _add_errored(sql_conn, 20_000, "8 days")
    _add_errored(sql_conn, 500, "1 day")
    settings = make_settings(database_url, purge_batch_size=3000)
    batches: list[int] = []

    async def go() -> PurgeCounts:
        async with open_store(settings) as store:
            original = store.jobs.purge_batch

            async def spy(kind: str, cutoff: Any, batch_size: int) -> int:
                deleted = await original(kind, cutoff, batch_size)
                if kind == "errored":
                    batches.append(deleted)
                return deleted

            store.jobs.purge_batch = spy  # type: ignore[method-assign]
            return await purge.run_purge(store, settings)

    counts = asyncio.run(go())

    assert counts.errored == 20_000
    assert batches == [3000] * 6 + [2000]  # each batch its own transaction
    assert count(sql_conn, "SELECT count(*) FROM outbox.messages") == 500
    assert count(sql_conn, "SELECT count(*) FROM outbox.attempts") == 1000


def test_the_procedure_purges_20000_rows_in_batches(sql_conn: psycopg.Connection[Any]) -> None:
    _add_errored(sql_conn, 20_000, "8 days")
    notices: list[str] = []
    sql_conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))

    assert sql_conn.execute("CALL outbox.purge_errored(batch_size => 1500)").fetchone() == (20_000,)
    assert count(sql_conn, "SELECT count(*) FROM outbox.messages") == 0
    assert count(sql_conn, "SELECT count(*) FROM outbox.attempts") == 0
    assert any("20000 errored messages" in notice for notice in notices)


def test_the_combined_procedure(sql_conn: psycopg.Connection[Any]) -> None:
    add_message(sql_conn, "error", finished_ago="8 days", attempts=1, events=1)
    add_message(sql_conn, "sent", finished_ago="31 days")
    add_message(sql_conn, "sent", finished_ago="1 day")

    assert sql_conn.execute("CALL outbox.purge()").fetchone() == (1, 1, 0)
    assert count(sql_conn, "SELECT count(*) FROM outbox.messages") == 1


def _run(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OUTBOX, *args],
        env=clean_env(OUTBOX_DATABASE_URL=database_url, OUTBOX_LOG_FORMAT="json"),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dry_run_deletes_nothing_and_prints_the_count(
    sql_conn: psycopg.Connection[Any], database_url: str
) -> None:
    for _ in range(3):
        add_message(sql_conn, "error", finished_ago="8 days", attempts=1)
    add_message(sql_conn, "error", finished_ago="6 days")

    result = _run("purge", "--dry-run", database_url=database_url)

    assert result.returncode == 0, result.stderr
    assert "would delete 3 errored messages" in result.stdout
    assert count(sql_conn, "SELECT count(*) FROM outbox.messages") == 4

    result = _run("purge", "--dry-run", "--older-than", "5d", database_url=database_url)
    assert "would delete 4 errored messages" in result.stdout


def test_outbox_purge_deletes_and_logs_count_and_duration(
    sql_conn: psycopg.Connection[Any], database_url: str
) -> None:
    for _ in range(2):
        add_message(sql_conn, "error", finished_ago="36 hours", attempts=1)

    result = _run("purge", "--older-than", "1d", database_url=database_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("deleted 2 errored messages")
    [line] = [json.loads(x) for x in result.stderr.splitlines() if "purge finished" in x]
    assert line["rows"] == 2 and line["duration_ms"] >= 0
    assert count(sql_conn, "SELECT count(*) FROM outbox.messages") == 0


def test_bad_older_than_is_one_line(database_url: str) -> None:
    result = _run("purge", "--older-than", "soon", database_url=database_url)
    assert result.returncode == 2
    assert result.stderr.startswith("outbox: --older-than:") and result.stderr.count("\n") == 1


def test_dry_run_on_an_empty_database(database_url: str) -> None:
    settings = make_settings(database_url)

    async def main() -> PurgeCounts:
        async with open_store(settings) as store:
            return await purge.dry_run(store, settings)

    assert asyncio.run(main()) == PurgeCounts()
