"""The store borrows pool connections with getconn/putconn: a statement interrupted
half-way, or a transaction that failed, must not leave its connection to the next
caller in a bad state."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from outbox import db
from outbox.settings import Settings
from outbox.store import Store
from tests.dispatch.conftest import insert_messages
from tests.support import wait_for


def test_a_statement_cancelled_while_waiting_leaves_the_pool_usable(
    sql_conn: psycopg.Connection, database_url: str, settings: Settings
) -> None:
    (message_id,) = insert_messages(sql_conn, 1)
    one_connection = settings.model_copy(update={"db_pool_size": 1, "db_pool_timeout": 5.0})

    async def scenario() -> tuple[bool, bool]:
        pool = db.create_pool(one_connection)
        await pool.open(wait=True)
        try:
            store = Store(pool)
            with psycopg.connect(database_url) as holder:
                # Another transaction holds the row: the cancel waits on its lock.
                holder.execute(
                    "SELECT 1 FROM outbox.messages WHERE id = %s FOR UPDATE", [message_id]
                )
                waiting = asyncio.create_task(store.messages.cancel(uuid.UUID(message_id), None))
                await asyncio.to_thread(
                    wait_for,
                    lambda: (
                        sql_conn.execute(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                        ).fetchone()[0]  # type: ignore[index]
                        == 1
                    ),
                    what="the cancel waiting on the row lock",
                )
                waiting.cancel()
                (outcome,) = await asyncio.gather(waiting, return_exceptions=True)
                assert isinstance(outcome, asyncio.CancelledError), outcome
                holder.rollback()
            # The pool's only connection serves the next statements, in a clean state.
            row = await store.messages.get(uuid.UUID(message_id), None)
            status = row.status if row is not None else None
            cancelled = await store.messages.cancel(uuid.UUID(message_id), None)
            return status == "pending", cancelled
        finally:
            await pool.close()

    still_pending, cancelled_after = asyncio.run(scenario())
    assert still_pending, "the interrupted cancel changed the row"
    assert cancelled_after, "the next cancel on the pool's only connection did not apply"


def test_a_failed_transaction_is_rolled_back_before_the_connection_is_reused(
    sql_conn: psycopg.Connection, settings: Settings
) -> None:
    one_connection = settings.model_copy(update={"db_pool_size": 1, "db_pool_timeout": 5.0})

    async def scenario() -> tuple[int, int, str, int]:
        pool = db.create_pool(one_connection)
        await pool.open(wait=True)
        try:
            store = Store(pool)
            with pytest.raises(psycopg.errors.DivisionByZero):  # the error reaches the caller
                async with store.db.connection() as conn:
                    first_backend = conn.info.backend_pid
                    await conn.execute("BEGIN")
                    await conn.execute("SELECT 1 / 0")
            async with store.db.connection() as conn:
                status = conn.info.transaction_status.name
                second_backend = conn.info.backend_pid
            return first_backend, second_backend, status, await store.schema_version()
        finally:
            await pool.close()

    first_backend, second_backend, status, version = asyncio.run(scenario())
    assert second_backend == first_backend, "the connection was not reused"
    assert status == "IDLE"
    assert version > 0
