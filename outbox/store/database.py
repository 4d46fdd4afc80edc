"""Statements from sql/queries.sql run on pooled connections: the one place that sends SQL
for the roles' stores (messages, queue, events, jobs, figures), and how their rows become
typed values."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, LiteralString, TypeVar, cast

from psycopg import AsyncClientCursor, AsyncConnection, AsyncCursor, sql
from psycopg.rows import BaseRowFactory, RowMaker, no_result
from psycopg_pool import AsyncConnectionPool

from outbox.settings import SQL_DIR

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
Row = TypeVar("Row")

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(path: Path = SQL_DIR / "queries.sql") -> dict[str, LiteralString]:
    parts = _HEADER.split(path.read_text())
    return {
        name: cast(LiteralString, body.strip())
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


QUERIES = load_queries()


class ColumnMismatch(TypeError):
    """A statement's columns are not the fields of the class its rows map to."""


def dataclass_row(cls: type[T]) -> BaseRowFactory[T]:
    """Rows as instances of the dataclass `cls`, whose fields are the statement's columns,
    by name and in order: a statement and its row class cannot drift apart unnoticed.

    psycopg's class_row gives the same guarantee by building a dict and calling `cls`
    with keywords for every row (+0.9 µs a row here: +0.45 ms on a claim of 512); the
    names are compared once per result instead, and each row built from its values."""
    fields = [field.name for field in dataclasses.fields(cls)]

    def factory(cursor: Any) -> RowMaker[T]:
        if cursor.description is None:
            return no_result
        check_columns(cursor, fields, cls.__name__)

        def make(values: Sequence[Any]) -> T:
            return cls(*values)

        return make

    return factory


def check_columns(cursor: Any, names: Sequence[str], what: str) -> None:
    """Raise ColumnMismatch unless the cursor's columns are `names`, in that order."""
    columns = [column.name for column in cursor.description or ()]
    if columns != list(names):
        raise ColumnMismatch(f"{what} expects columns {list(names)}, the statement gives {columns}")


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
        # at least 1 (PostgreSQL reads 0 as no timeout). A setting, not a statement of
        # queries.sql: composed here, its value a literal.
        self.set_timeout: sql.Composed | None = (
            sql.SQL("SET LOCAL statement_timeout = {}").format(
                sql.Literal(max(1, round(statement_timeout * 1000)))
            )
            if statement_timeout
            else None
        )
        self._timed: dict[str, bytes] = {}  # each statement after the setting, composed once

    def connection(self) -> Pooled:
        return Pooled(self.pool)

    def _timed_query(self, query: LiteralString) -> bytes:
        """`query` preceded by the timeout's SET LOCAL: one simple-protocol query."""
        timed = self._timed.get(query)
        if timed is None:
            assert self.set_timeout is not None
            composed = sql.SQL(";\n").join([self.set_timeout, sql.SQL(query)])
            timed = self._timed[query] = composed.as_bytes()
        return timed

    async def execute(
        self,
        conn: AsyncConnection[Any],
        query: LiteralString,
        params: Mapping[str, Any] | None = None,
        *,
        row: BaseRowFactory[Row],
        prepare: bool | None = None,
    ) -> AsyncCursor[Row]:
        """Run one statement; its results, as `row` makes them, are in the cursor returned.

        With a statement timeout, in the same round trip: `SET LOCAL statement_timeout`
        and the statement go as one simple-protocol query, which PostgreSQL runs as one
        transaction, so the setting ends with it, never left on the server connection (a
        transaction pooler hands that to someone else next). The parameters are bound
        client-side (every query casts them). Measured against psycopg's pipeline mode
        (the same two statements up to one Sync, bound server-side and prepared), per
        single-row insert: +16 µs of this process's CPU and +90 µs of PostgreSQL's (the
        statement planned each time), against +95 and +25; the pipeline's event-loop
        turns slowed the status feed's fan-out enough to cut WebSocket clients off. A
        statement cut short raises QueryCanceled; the connection is idle again."""
        if self.set_timeout is None:
            cursor = conn.cursor(row_factory=row)
            await cursor.execute(query, params, prepare=prepare)
            return cursor
        timed = AsyncClientCursor(conn, row_factory=row)
        await timed.execute(self._timed_query(query), params)
        timed.nextset()  # from the SET's result to the statement's
        return timed

    async def fetchone(
        self,
        query: LiteralString,
        params: Mapping[str, Any] | None = None,
        *,
        row: BaseRowFactory[Row],
    ) -> Row | None:
        """One statement on a connection of its own; its first row (None: no row)."""
        async with self.connection() as conn:
            cursor = await self.execute(conn, query, params, row=row)
            return await cursor.fetchone()

    async def fetchall(
        self,
        query: LiteralString,
        params: Mapping[str, Any] | None = None,
        *,
        row: BaseRowFactory[Row],
        prepare: bool | None = None,
    ) -> list[Row]:
        """One statement on a connection of its own; all its rows."""
        async with self.connection() as conn:
            cursor = await self.execute(conn, query, params, row=row, prepare=prepare)
            return await cursor.fetchall()
