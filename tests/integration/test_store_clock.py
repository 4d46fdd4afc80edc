"""The claim's clock is a parameter (the database's own when not given): a claim as of a
later time takes a message that is due only then, under a lease counted from that time."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import psycopg

from outbox import db
from outbox.settings import Settings
from outbox.states import MessageStatus
from outbox.store import NewMessage, Store


def scheduled(send_at: datetime) -> NewMessage:
    return NewMessage(
        id=str(uuid.uuid4()),
        client_message_id=None,
        to="5511999999999",
        type="text",
        payload={"body": "later", "preview_url": False},
        request_hash=b"\x00",
        send_at=send_at,
        expires_at=None,
        sender="default",
    )


def test_a_claim_as_of_a_later_time_takes_the_message_due_then(
    settings: Settings, sql_conn: psycopg.Connection
) -> None:
    send_at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    message = scheduled(send_at)

    async def scenario() -> None:
        pool = db.create_pool(settings)
        await pool.open(wait=True)
        try:
            store = Store(pool)
            await store.messages.insert([("user-1", message)], 4)
            now = await store.queue.claim("d-1", 10, 30)
            # Not due yet, by the database.
            assert (now.claimed, now.next_due_at, now.more) == ([], send_at, False)
            early = await store.queue.claim("d-1", 10, 30, now=send_at - timedelta(seconds=1))
            assert (early.claimed, early.next_due_at) == ([], send_at)
            due = await store.queue.claim("d-1", 10, 30, now=send_at)
            assert [(c.id, c.attempt) for c in due.claimed] == [(uuid.UUID(message.id), 1)]
            assert due.next_due_at is None  # nothing else is pending
        finally:
            await pool.close()

    asyncio.run(scenario())
    row = sql_conn.execute(
        "SELECT status, locked_by, locked_until FROM outbox.messages WHERE id = %s",
        [message.id],
    ).fetchone()
    assert row == (MessageStatus.IN_FLIGHT, "d-1", send_at + timedelta(seconds=30))
