"""The API's queries run under OUTBOX_API_STATEMENT_TIMEOUT, set per transaction (SET LOCAL):
a query cut short answers 503 with Retry-After, and the pool's connection serves the next
request, its own setting untouched."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from outbox import db
from outbox.settings import Settings
from outbox.store import NewMessage, Store
from tests.integration.conftest import ClientFactory
from tests.support import wait_for

SEND = "/api/v1/whatsapp/send/"
MESSAGES = "/api/v1/whatsapp/messages"
TEXT = {"to": "5511999999999", "type": "text", "text": "hi"}
NO_FILTER: dict[str, Any] = {
    "status": None,
    "client_message_id": None,
    "sender": None,
    "after": None,
    "limit": 50,
}


def test_a_query_past_the_timeout_answers_503_and_the_connection_serves_the_next_request(
    client_with: ClientFactory, database_url: str, auth: Callable[..., dict[str, str]]
) -> None:
    # One pool connection: the requests after the timeouts are served by the same one.
    with client_with(api_statement_timeout=0.3, db_pool_size=1) as http:
        sent = http.post(SEND, json=TEXT, headers=auth())
        assert sent.status_code == 202, sent.text
        with psycopg.connect(database_url) as holder:
            # Held by another transaction, the table makes every query of the API wait.
            holder.execute("LOCK TABLE outbox.messages IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            listing = http.get(
                MESSAGES, params={"status": "cancelled", "limit": 500}, headers=auth(), timeout=10
            )
            sending = http.post(SEND, json=TEXT, headers=auth(), timeout=10)
            batch = http.post(SEND + "batch", json={"messages": [TEXT]}, headers=auth(), timeout=10)
            elapsed = time.monotonic() - started
        for response in (listing, sending, batch):
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) > 0
            assert response.json()["error"]["code"] == "unavailable"
        assert elapsed < 5, elapsed  # three timeouts of 0.3 s, not a wait for the lock

        listed = http.get(MESSAGES, headers=auth())
        assert listed.status_code == 200, listed.text
        assert [m["task_id"] for m in listed.json()["messages"]] == [sent.json()["task_id"]]
        assert http.post(SEND, json=TEXT, headers=auth()).status_code == 202


def new_message() -> NewMessage:
    return NewMessage(
        id=str(uuid.uuid4()),
        client_message_id=None,
        to="5511999999999",
        type="text",
        payload={"body": "hi", "preview_url": False},
        request_hash=b"\x00",
        send_at=None,
        expires_at=None,
        sender="default",
    )


def lock_waits(database_url: str, count: int) -> None:
    # Its own autocommit connection: pg_stat_activity is read once per transaction.
    with psycopg.connect(database_url, autocommit=True) as conn:

        def waiting() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone()
            return row is not None and row[0] == count

        wait_for(waiting, what=f"{count} statement(s) waiting on a lock")


def test_the_timeout_holds_for_each_statement_only_and_leaves_the_connection_idle(
    settings: Settings, database_url: str
) -> None:
    one_connection = settings.model_copy(update={"db_pool_size": 1})

    async def timeout_on_the_connection(store: Store) -> tuple[int, str, TransactionStatus]:
        async with store.db.connection() as conn:
            cursor = await conn.execute("SHOW statement_timeout")
            row = await cursor.fetchone()
            assert row is not None
            return conn.info.backend_pid, row[0], conn.info.transaction_status

    async def scenario() -> None:
        pool = db.create_pool(one_connection)
        await pool.open(wait=True)
        try:
            store = Store(pool, statement_timeout=0.2)
            pid, default, _ = await timeout_on_the_connection(store)
            await store.messages.insert([("user-1", new_message())], 4)
            assert len(await store.messages.listing("user-1", **NO_FILTER)) == 1
            assert await timeout_on_the_connection(store) == (pid, default, TransactionStatus.IDLE)

            with psycopg.connect(database_url) as holder:
                holder.execute("LOCK TABLE outbox.messages IN ACCESS EXCLUSIVE MODE")
                calls = [
                    lambda: store.messages.listing("user-1", **NO_FILTER),
                    lambda: store.messages.insert([("user-1", new_message())], 4),
                    lambda: store.messages.insert_batch([("user-1", new_message())], 4),
                    lambda: store.messages.get(uuid.uuid4(), None),
                ]
                for call in calls:
                    with pytest.raises(psycopg.errors.QueryCanceled):
                        await call()
                # A request that goes away while its statement waits (its task cancelled).
                patient = Store(pool, statement_timeout=30)
                waiting = asyncio.create_task(patient.messages.listing("user-1", **NO_FILTER))
                await asyncio.to_thread(lock_waits, database_url, 1)
                waiting.cancel()
                (outcome,) = await asyncio.gather(waiting, return_exceptions=True)
                assert isinstance(outcome, asyncio.CancelledError), outcome
            # The same connection, idle, with the server's own setting: nothing was left on it.
            assert await timeout_on_the_connection(store) == (pid, default, TransactionStatus.IDLE)
            assert len(await store.messages.listing("user-1", **NO_FILTER)) == 1
        finally:
            await pool.close()

    asyncio.run(scenario())
