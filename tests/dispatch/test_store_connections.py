"""The store borrows pool connections with getconn/putconn: a statement interrupted
half-way, or a transaction that failed, must not leave its connection to the next
caller in a bad state."""

from __future__ import annotations

import asyncio
import uuid

import psycopg

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
                waiting = asyncio.create_task(store.cancel_message(uuid.UUID(message_id), None))
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
                await asyncio.gather(waiting, return_exceptions=True)
                holder.rollback()
            # The pool's only connection serves the next statements, in a clean state.
            status = (await store.get_message(uuid.UUID(message_id), None) or {})["status"]
            cancelled = await store.cancel_message(uuid.UUID(message_id), None)
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

    async def scenario() -> tuple[str, int]:
        pool = db.create_pool(one_connection)
        await pool.open(wait=True)
        try:
            store = Store(pool)
            try:
                async with store._connection() as conn:
                    await conn.execute("BEGIN")
                    await conn.execute("SELECT 1 / 0")
            except psycopg.errors.DivisionByZero:
                pass
            async with store._connection() as conn:
                status = conn.info.transaction_status.name
            return status, await store.schema_version()
        finally:
            await pool.close()

    status, version = asyncio.run(scenario())
    assert status == "IDLE"
    assert version > 0
