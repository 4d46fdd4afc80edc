"""Helpers: rows with timestamps set directly in SQL, a Store on its own pool."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from outbox.settings import Settings
from outbox.store import Store


def add_message(
    conn: psycopg.Connection[Any],
    status: str,
    *,
    finished_ago: str | None = None,
    next_attempt_in: str = "0 seconds",
    locked_until_in: str | None = None,
    attempts: int = 0,
    events: int = 0,
    last_error: str | None = None,
) -> uuid.UUID:
    """One message (its attempts and events too), timestamps relative to now()."""
    message_id = uuid.uuid4()
    conn.execute(
        """INSERT INTO outbox.messages
               (id, user_id, "to", type, payload, request_hash, status, attempts, max_attempts,
                next_attempt_at, locked_by, locked_until, last_error, finished_at)
           VALUES (%(id)s, 'user-1', '5511999999999', 'text', '{"text": "hi"}', '\\x00',
                   %(status)s, %(attempts)s, 4, now() + %(next)s::interval,
                   CASE WHEN %(locked)s::interval IS NOT NULL THEN 'd-1' END,
                   now() + %(locked)s::interval, %(last_error)s,
                   now() - %(finished)s::interval)""",
        {
            "id": message_id,
            "status": status,
            "attempts": attempts,
            "next": next_attempt_in,
            "locked": locked_until_in,
            "last_error": last_error,
            "finished": finished_ago,
        },
    )
    for attempt in range(1, attempts + 1):
        conn.execute(
            """INSERT INTO outbox.attempts
                   (message_id, attempt, dispatcher, started_at, finished_at, outcome, error)
               VALUES (%s, %s, 'd-1', now(), now(), 'transient', 'boom')""",
            [message_id, attempt],
        )
    for _ in range(events):
        conn.execute(
            """INSERT INTO outbox.events (message_id, user_id, event, data)
               VALUES (%s, 'user-1', 'message_sent', '{}')""",
            [message_id],
        )
    return message_id


def count(conn: psycopg.Connection[Any], query: str, *params: Any) -> int:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def make_settings(database_url: str, **overrides: Any) -> Settings:
    return Settings(database_url=database_url, log_format="json", db_pool_size=2, **overrides)


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    from outbox import db

    pool = db.create_pool(settings)
    await pool.open(wait=True)
    try:
        yield Store(pool)
    finally:
        await pool.close()
