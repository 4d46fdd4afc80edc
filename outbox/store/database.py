"""Statements from sql/queries.sql run on pooled connections: the one place that sends SQL
for the roles' stores (messages, queue, events, jobs, figures)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, LiteralString, cast

from psycopg import AsyncClientCursor, AsyncConnection, AsyncCursor
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool

from outbox.settings import SQL_DIR

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(path: Path = SQL_DIR / "queries.sql") -> dict[str, LiteralString]:
    parts = _HEADER.split(path.read_text())
    return {
        name: cast(LiteralString, body.strip())
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


QUERIES = load_queries()


def _joined(head: LiteralString, tail: LiteralString) -> LiteralString:
    """One statement from a beginning and an ending (a `;` ending the first is dropped)."""
    return head.rstrip().removesuffix(";") + "\n" + tail


# Statements that share their beginning: an insert where none of the rows is a replay,
# or some may be; the view of one message, read, or as an admin's retry leaves it.
QUERIES["insert_messages"] = _joined(QUERIES["insert_new_messages"], QUERIES["replays_clause"])
QUERIES["get_message"] = _joined(QUERIES["message_view"], QUERIES["get_message_from"])
QUERIES["retry_message"] = _joined(QUERIES["message_view"], QUERIES["retry_message_from"])


class Pooled:
    """A connection borrowed from the pool for one `async with` block.

    The pool's own `connection()` also enters the connection's context, whose exit
    commits: on these autocommit connections a no-op that still takes the
    connection's lock and a trip through its wait loop, 10 µs back to back and
    25–45 µs after an idle moment here, on every statement (the claim of one message
    in M4 included). `putconn` alone brings the connection back to idle, rolling
    back an open transaction and closing one returned mid-operation."""

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def __aenter__(self) -> AsyncConnection[Any]:
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        self._conn: AsyncConnection[Any] = await self._pool.getconn()
        if task is not None and task.cancelling() > cancelling:
            # Cancelled as the connection arrived, and psycopg_pool's wait returned it
            # anyway (asyncio.wait_for on 3.11: outbox/cancellation.py): cancelled it is.
            await self._pool.putconn(self._conn)
            raise asyncio.CancelledError
        return self._conn

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pool.putconn(self._conn)


class Database:
    """A pool and how its statements run (under the API's statement timeout, if any)."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        session_conninfo: str = "",
        statement_timeout: float | None = None,
    ) -> None:
        self.pool = pool
        # Session state (the jobs' advisory locks) needs a direct server connection, not
        # one through a transaction pooler; the pool's own conninfo when not given.
        self.session_conninfo = session_conninfo
        # Every statement of this store runs under it (the API's store): in milliseconds,
        # at least 1 (PostgreSQL reads 0 as no timeout).
        self.set_timeout: str | None = (
            f"SET LOCAL statement_timeout = {max(1, round(statement_timeout * 1000))}"
            if statement_timeout
            else None
        )

    def connection(self) -> Pooled:
        return Pooled(self.pool)

    async def execute(
        self,
        conn: AsyncConnection[Any],
        query: LiteralString,
        params: Mapping[str, Any] | None = None,
        *,
        dicts: bool = False,
        prepare: bool | None = None,
    ) -> AsyncCursor[Any]:
        """Run one statement; its results are in the cursor returned.

        With a statement timeout, in the same round trip: `SET LOCAL statement_timeout`
        and the statement go as one simple-protocol query, which PostgreSQL runs as one
        transaction, so the setting ends with it, never left on the server connection (a
        transaction pooler hands that to someone else next). The parameters are bound
        client-side (every query casts them). Measured against psycopg's pipeline mode
        (the same two statements up to one Sync, bound server-side and prepared), per
        single-row insert: +16 µs of this process's CPU and +90 µs of PostgreSQL's (the
        statement planned each time), against +95 and +25; the pipeline's event-loop
        turns slowed the gateway's fan-out enough to cut WebSocket clients off. A
        statement cut short raises QueryCanceled; the connection is idle again."""
        if self.set_timeout is None:
            cursor: AsyncCursor[Any] = conn.cursor(row_factory=dict_row) if dicts else conn.cursor()
            await cursor.execute(query, params, prepare=prepare)
            return cursor
        timed = AsyncClientCursor(conn, row_factory=dict_row if dicts else tuple_row)
        await timed.execute(f"{self.set_timeout};\n{query}", params)
        timed.nextset()  # from the SET's result to the statement's
        return timed

    async def fetchone(
        self, query: LiteralString, params: Mapping[str, Any] | None = None, *, dicts: bool = False
    ) -> Any:
        """One statement on a connection of its own; its first row (None: no row)."""
        async with self.connection() as conn:
            cursor = await self.execute(conn, query, params, dicts=dicts)
            return await cursor.fetchone()

    async def fetchall(
        self,
        query: LiteralString,
        params: Mapping[str, Any] | None = None,
        *,
        dicts: bool = False,
        prepare: bool | None = None,
    ) -> list[Any]:
        """One statement on a connection of its own; all its rows."""
        async with self.connection() as conn:
            cursor = await self.execute(conn, query, params, dicts=dicts, prepare=prepare)
            return await cursor.fetchall()
