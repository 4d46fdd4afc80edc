"""The API's statement timeout through PgBouncer in transaction mode: set per transaction,
it limits the API's statement and never stays on the server connection that the pooler
hands to the next client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg
import pytest

from outbox import db
from outbox.settings import Settings
from outbox.store import Store
from tests.ops.conftest import PgBouncer

NO_FILTER = {"status": None, "client_message_id": None, "sender": None, "after": None}


def test_the_statement_timeout_stays_in_its_transaction_through_pgbouncer(
    start_pgbouncer: Callable[..., PgBouncer], settings: Settings, database_url: str
) -> None:
    bouncer = start_pgbouncer(pool_size=1)  # one server connection for every client
    pooled = Settings(
        **{
            **settings.model_dump(),
            "database_url": bouncer.url(),
            "db_pgbouncer": True,
            "db_pool_size": 1,
        }
    )
    other_kwargs = db.connection_kwargs(pooled)

    def another_client() -> tuple[int, str]:
        """A client of its own through PgBouncer: the server connection and its setting."""
        with psycopg.connect(bouncer.url(), **other_kwargs) as other:
            row = other.execute("SELECT pg_backend_pid(), current_setting('statement_timeout')")
            pid, timeout = row.fetchone() or (0, "")
            other.execute("SELECT pg_sleep(0.4)")  # longer than the API's timeout: not cut
            return pid, timeout

    async def scenario() -> None:
        pool = db.create_pool(pooled)
        await pool.open(wait=True)
        try:
            store = Store(pool, statement_timeout=0.2)
            server_pid, default = await asyncio.to_thread(another_client)
            for _ in range(8):  # past psycopg's prepare threshold, were it preparing
                assert await store.messages.listing(None, limit=10, **NO_FILTER) == []
            assert await asyncio.to_thread(another_client) == (server_pid, default)

            with psycopg.connect(database_url) as holder:  # direct: holds the table
                holder.execute("LOCK TABLE outbox.messages IN ACCESS EXCLUSIVE MODE")
                with pytest.raises(psycopg.errors.QueryCanceled):
                    await store.messages.listing("user-1", limit=10, **NO_FILTER)
            assert await asyncio.to_thread(another_client) == (server_pid, default)
            assert await store.messages.listing(None, limit=10, **NO_FILTER) == []
        finally:
            await pool.close()

    asyncio.run(scenario())
    assert "prepared statement" not in bouncer.log.read_text()
