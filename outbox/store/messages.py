"""Messages as the API writes and reads them: inserts (coalesced singles and all-or-nothing
batches), one message, a listing page, cancel and an admin's retry."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg import AsyncConnection

from outbox.store.database import QUERIES, Database

CLIENT_MESSAGE_ID_INDEX = "messages_client_message_id"  # unique (user_id, client_message_id)


@dataclass(slots=True)  # not frozen: built once per message of a request
class NewMessage:
    id: str  # a UUIDv7 in its text form, as the response shows it
    client_message_id: str | None
    to: str
    type: str
    payload: dict[str, Any]
    request_hash: bytes
    send_at: datetime | None
    expires_at: datetime | None


@dataclass(slots=True)
class Inserted:
    """The id the message has in the database; `replayed` when it existed already."""

    id: str
    replayed: bool


class Conflict(Exception):
    """A client_message_id already names a different message of this user."""

    def __init__(self, index: int = 0) -> None:
        super().__init__(index)
        self.index = index


def _raise_unless_replay(exc: psycopg.errors.UniqueViolation) -> None:
    """A client_message_id taken is what insert_new_messages may meet (a replay, a
    conflict, or a request racing ours): anything else is a real error."""
    if exc.diag.constraint_name != CLIENT_MESSAGE_ID_INDEX:
        raise exc


class Messages:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert(
        self, rows: list[tuple[str, NewMessage]], max_attempts: int
    ) -> list[Inserted | None]:
        """Insert (user_id, message) rows in one statement, each standing alone (coalesced
        requests); None marks a conflict. A (user_id, client_message_id) pair must not
        repeat within one call."""
        document = self._document(rows, max_attempts)
        async with self._db.connection() as conn:
            try:
                return await self._insert(conn, rows, document, replays=False)
            except psycopg.errors.UniqueViolation as exc:
                _raise_unless_replay(exc)
            return await self._insert(conn, rows, document, replays=True)

    async def insert_all_or_nothing(
        self,
        chunks: Iterable[list[tuple[str, NewMessage]]],
        max_attempts: int,
        on_inserted: Callable[[int, list[tuple[str, NewMessage]], list[Inserted]], None],
    ) -> None:
        """Every row of every chunk in one transaction, or none: a conflict raises
        Conflict with the row's index counted across the chunks (the batch endpoint).

        One statement per chunk. While PostgreSQL runs one, the next is built (the
        iteration of `chunks` does the caller's work per row) and the one before is
        handed to `on_inserted` with the index of its first row, so a large batch keeps
        this process and the database busy at once instead of in turn. Returns once
        all is committed.

        The statements assume no row is a replay; when one is, the transaction rolls
        back and runs again with replays looked for, over the chunks built so far and
        then the rest (`on_inserted` sees those rows again, at the same indexes).
        """
        built: list[list[tuple[str, NewMessage]]] = []
        source = iter(chunks)

        def every_chunk() -> Iterator[list[tuple[str, NewMessage]]]:
            yield from list(built)
            for chunk in source:
                built.append(chunk)
                yield chunk

        try:
            await self._insert_chunks(every_chunk(), max_attempts, on_inserted, replays=False)
        except psycopg.errors.UniqueViolation as exc:
            _raise_unless_replay(exc)
            await self._insert_chunks(every_chunk(), max_attempts, on_inserted, replays=True)

    async def _insert_chunks(
        self,
        chunks: Iterator[list[tuple[str, NewMessage]]],
        max_attempts: int,
        on_inserted: Callable[[int, list[tuple[str, NewMessage]], list[Inserted]], None],
        *,
        replays: bool,
    ) -> None:
        async with self._db.connection() as conn, conn.transaction():
            if self._db.set_timeout is not None:  # for the whole transaction
                await conn.execute(self._db.set_timeout)
            offset = 0
            following = next(chunks, None)
            previous: list[tuple[str, NewMessage]] = []
            running: asyncio.Task[list[Inserted | None]] | None = None
            try:
                while following is not None:
                    current, document = following, self._document(following, max_attempts)
                    done = await running if running is not None else None
                    running = asyncio.create_task(
                        self._insert(conn, current, document, replays=replays, timed=False)
                    )
                    await asyncio.sleep(0)  # the statement goes out, then the rest is done
                    if done is not None:
                        offset = self._accept(done, offset, previous, on_inserted)
                    previous = current
                    following = next(chunks, None)
                if running is not None:
                    self._accept(await running, offset, previous, on_inserted)
            finally:
                # An error while the statement runs: let it end before the rollback.
                if running is not None and not running.done():
                    await asyncio.gather(running, return_exceptions=True)

    @staticmethod
    def _accept(
        results: list[Inserted | None],
        offset: int,
        rows: list[tuple[str, NewMessage]],
        on_inserted: Callable[[int, list[tuple[str, NewMessage]], list[Inserted]], None],
    ) -> int:
        accepted: list[Inserted] = []
        for index, result in enumerate(results):
            if result is None:
                raise Conflict(offset + index)  # leaving the transaction rolls back
            accepted.append(result)
        on_inserted(offset, rows, accepted)
        return offset + len(rows)

    @staticmethod
    def _document(rows: list[tuple[str, NewMessage]], max_attempts: int) -> str:
        """The rows as the one JSON parameter of insert_messages."""
        return orjson.dumps(
            [
                {
                    "id": message.id,
                    "user_id": user_id,
                    "client_message_id": message.client_message_id,
                    "to": message.to,
                    "type": message.type,
                    "payload": message.payload,
                    "request_hash": message.request_hash.hex(),
                    "max_attempts": max_attempts,
                    "send_at": message.send_at,
                    "expires_at": message.expires_at,
                }
                for user_id, message in rows
            ]
        ).decode()

    async def _insert(
        self,
        conn: AsyncConnection[Any],
        rows: list[tuple[str, NewMessage]],
        document: str,
        *,
        replays: bool,
        timed: bool = True,
    ) -> list[Inserted | None]:
        """The rows of `document` inserted; with `replays` False, a replay among them
        raises UniqueViolation (see insert_new_messages). `timed` False: in a transaction
        that has its statement timeout set already."""
        query = QUERIES["insert_messages"] if replays else QUERIES["insert_new_messages"]
        if timed:
            cursor = await self._db.execute(conn, query, {"messages": document})
        else:
            cursor = await conn.execute(query, {"messages": document})
        if not replays:
            return [Inserted(message.id, replayed=False) for _, message in rows]
        returned = await cursor.fetchall()
        ids = {row[0] for row in returned}
        existing = {(row[1], row[2]): row[0] for row in returned if row[2] is not None}
        results: list[Inserted | None] = []
        for user_id, message in rows:
            if message.id in ids:
                results.append(Inserted(message.id, replayed=False))
            elif (user_id, message.client_message_id) in existing:
                results.append(Inserted(existing[(user_id, message.client_message_id)], True))
            else:
                results.append(None)
        return results

    async def get(self, message_id: uuid.UUID, user_id: str | None) -> dict[str, Any] | None:
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
                conn, QUERIES["get_message"], {"id": message_id, "user_id": user_id}, dicts=True
            )
            return await cursor.fetchone()

    async def listing(
        self,
        user_id: str | None,
        *,
        status: str | None,
        client_message_id: str | None,
        after: uuid.UUID | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
                conn,
                QUERIES["list_messages"],
                {
                    "user_id": user_id,
                    "status": status,
                    "client_message_id": client_message_id,
                    "after": after,
                    "limit": limit,
                },
                dicts=True,
                prepare=False,
            )
            return await cursor.fetchall()

    async def cancel(self, message_id: uuid.UUID, user_id: str | None) -> bool:
        """True when this call moved the message from pending to cancelled."""
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
                conn, QUERIES["cancel_message"], {"id": message_id, "user_id": user_id}
            )
            return await cursor.fetchone() is not None

    async def retry(self, message_id: uuid.UUID, budget: int) -> dict[str, Any] | None:
        """Requeue an errored or cancelled message with `budget` more attempts; its view
        (as get_message gives it), or None when it was not in a state to retry."""
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
                conn, QUERIES["retry_message"], {"id": message_id, "budget": budget}, dicts=True
            )
            return await cursor.fetchone()
