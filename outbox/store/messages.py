"""Messages as the API writes and reads them: inserts (coalesced singles, and a batch all or
nothing), one message, a listing page, cancel and an admin's retry."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict

import orjson
import psycopg
from psycopg.rows import scalar_row

from outbox.states import MessageStatus
from outbox.store.database import QUERIES, Database, dataclass_row

CLIENT_MESSAGE_ID_INDEX = "messages_client_message_id"  # unique (user_id, client_message_id)
# A message's delivery as the API names it: the receipt states by their column's value
# (018_delivery_receipts.sql, outbox.delivery_name), and `accepted`, a sent message with
# no receipt yet.
DELIVERY_STATES: dict[str, int] = {"failed": 1, "delivered": 2, "read": 3}
ACCEPTED = "accepted"
DELIVERIES = (ACCEPTED, "delivered", "read", "failed")
# A batch goes to PostgreSQL in statements of this many rows, one transaction, sent in a
# pipeline: PostgreSQL runs each while the next one's JSON is built and sent.
BATCH_STATEMENT_ROWS = 250


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
    sender: str
    priority: int = 1  # 0 high, 1 normal, 2 low (the column's values)
    ordered: bool = True  # sent after the earlier ordered messages of its conversation


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


class HistoryEntry(TypedDict):
    """One attempt in a message's `history` (JSON: its times as PostgreSQL writes them)."""

    attempt: int
    started_at: str
    finished_at: str | None
    outcome: str  # an AttemptOutcome
    error: str | None


@dataclass(slots=True)
class ListedRow:
    """A message as the view outbox.listed_message shows it (018_delivery_receipts.sql):
    the view's columns, by name and in order."""

    id: uuid.UUID
    user_id: str
    status: MessageStatus
    to: str
    type: str
    client_message_id: str | None
    attempts: int
    max_attempts: int
    next_attempt_at: datetime
    send_at: datetime | None
    expires_at: datetime | None
    last_error: str | None
    provider_message_id: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    sender: str
    throttles: int  # times the provider throttled it (each spent no attempt)
    priority: str  # high | normal | low
    ordered: bool
    # Why a pending message waits: {"reason", "until"?, "task_id"?} (migration 017)
    waiting_for: dict[str, Any] | None
    # Its receipts (018_delivery_receipts.sql): the state (1 failed, 2 delivered, 3 read;
    # None: no receipt yet) and the provider's time of each status, first reported.
    delivery_state: int | None
    provider_sent_at: datetime | None
    delivered_at: datetime | None
    read_at: datetime | None
    failed_at: datetime | None
    delivery_error: dict[str, Any] | None  # with failed: {"code", "title", "details"}

    def __post_init__(self) -> None:
        self.status = MessageStatus(self.status)  # the column is text


@dataclass(slots=True)
class MessageRow(ListedRow):
    """A message as the view outbox.message_view shows it: listed, with its attempts."""

    history: list[HistoryEntry]


@dataclass(slots=True)
class _Stored:
    """A row insert_messages inserted, or found there already for the same request."""

    id: str
    user_id: str
    client_message_id: str | None


_LISTED_ROW = dataclass_row(ListedRow)
_MESSAGE_ROW = dataclass_row(MessageRow)
_STORED_ROW = dataclass_row(_Stored)


def _raise_unless_replay(exc: psycopg.errors.UniqueViolation) -> None:
    """A client_message_id taken is what insert_new_messages may meet (a replay, a
    conflict, or a request racing ours): anything else is a real error."""
    if exc.diag.constraint_name != CLIENT_MESSAGE_ID_INDEX:
        raise exc


def _document(rows: Sequence[tuple[str, NewMessage]], max_attempts: int) -> str:
    """The rows as the one JSON parameter of insert_new_messages and insert_messages."""
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
                "sender": message.sender,
                "priority": message.priority,
                "ordered": message.ordered,
            }
            for user_id, message in rows
        ]
    ).decode()


def _chunks(
    rows: Iterator[tuple[str, NewMessage]], taken: list[tuple[str, NewMessage]]
) -> Iterator[list[tuple[str, NewMessage]]]:
    """`rows` in lists of BATCH_STATEMENT_ROWS (the last one shorter), each also added to
    `taken` as it is taken."""
    while chunk := list(itertools.islice(rows, BATCH_STATEMENT_ROWS)):
        taken.extend(chunk)
        yield chunk


def _results(
    rows: Sequence[tuple[str, NewMessage]], stored: list[_Stored]
) -> list[Inserted | None]:
    """Per row of insert_messages: inserted, replayed (another id came back for its
    client_message_id), or None, a conflict (nothing came back for it)."""
    ids = {row.id for row in stored}
    existing: dict[tuple[str, str | None], str] = {
        (row.user_id, row.client_message_id): row.id
        for row in stored
        if row.client_message_id is not None
    }
    results: list[Inserted | None] = []
    for user_id, message in rows:
        if message.id in ids:
            results.append(Inserted(message.id, replayed=False))
        elif (user_id, message.client_message_id) in existing:
            results.append(Inserted(existing[(user_id, message.client_message_id)], True))
        else:
            results.append(None)
    return results


class Messages:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert(
        self, rows: list[tuple[str, NewMessage]], max_attempts: int
    ) -> list[Inserted | None]:
        """Insert (user_id, message) rows in one statement, each standing alone (coalesced
        requests); None marks a conflict. A (user_id, client_message_id) pair must not
        repeat within one call."""
        params = {"messages": _document(rows, max_attempts)}
        async with self._db.connection() as conn:
            try:
                await self._db.execute(conn, QUERIES["insert_new_messages"], params, row=scalar_row)
                return [Inserted(message.id, replayed=False) for _, message in rows]
            except psycopg.errors.UniqueViolation as exc:
                _raise_unless_replay(exc)
            cursor = await self._db.execute(
                conn, QUERIES["insert_messages"], params, row=_STORED_ROW
            )
            return _results(rows, await cursor.fetchall())

    async def insert_batch(
        self, rows: Iterable[tuple[str, NewMessage]], max_attempts: int
    ) -> list[Inserted]:
        """Every row in one transaction, or none (the batch endpoint): a conflict raises
        Conflict with the index of its row. A (user_id, client_message_id) pair must not
        repeat within one call.

        One statement per BATCH_STATEMENT_ROWS rows, all sent in a pipeline: `rows` is
        taken a chunk at a time, each once the statement before is sent, so rows built
        as they are taken (a generator) are built while PostgreSQL inserts the chunk
        before. The statements assume no row is a replay; when one is, the transaction
        rolls back and runs again with replays looked for."""
        remaining = iter(rows)
        taken: list[tuple[str, NewMessage]] = []
        try:
            await self._insert_chunks(_chunks(remaining, taken), max_attempts)
            return [Inserted(message.id, replayed=False) for _, message in taken]
        except psycopg.errors.UniqueViolation as exc:
            _raise_unless_replay(exc)
        taken.extend(remaining)  # the rows not taken when the violation stopped the run
        chunks = [
            taken[start : start + BATCH_STATEMENT_ROWS]
            for start in range(0, len(taken), BATCH_STATEMENT_ROWS)
        ]
        return await self._insert_chunks_with_replays(chunks, max_attempts)

    async def _insert_chunks(
        self, chunks: Iterator[list[tuple[str, NewMessage]]], max_attempts: int
    ) -> None:
        """insert_new_messages for each chunk, in one transaction, sent in a pipeline:
        PostgreSQL runs each statement as it arrives, without a round trip between them."""
        async with self._db.connection() as conn, conn.pipeline(), conn.transaction():
            if self._db.set_timeout is not None:  # for the whole transaction
                await conn.execute(self._db.set_timeout)
            for chunk in chunks:
                params = {"messages": _document(chunk, max_attempts)}
                await conn.execute(QUERIES["insert_new_messages"], params)

    async def _insert_chunks_with_replays(
        self, chunks: list[list[tuple[str, NewMessage]]], max_attempts: int
    ) -> list[Inserted]:
        """_insert_chunks with insert_messages: a conflict raises Conflict before the
        commit, and leaving the transaction rolls it back."""
        async with self._db.connection() as conn, conn.pipeline(), conn.transaction():
            if self._db.set_timeout is not None:
                await conn.execute(self._db.set_timeout)
            cursors = []
            for chunk in chunks:
                cursor = conn.cursor(row_factory=_STORED_ROW)
                params = {"messages": _document(chunk, max_attempts)}
                cursors.append(await cursor.execute(QUERIES["insert_messages"], params))
            results: list[Inserted] = []
            for chunk, cursor in zip(chunks, cursors, strict=True):
                for result in _results(chunk, await cursor.fetchall()):
                    if result is None:
                        raise Conflict(len(results))
                    results.append(result)
            return results

    async def get(self, message_id: uuid.UUID, user_id: str | None) -> MessageRow | None:
        """One message with its attempts; None when there is none (of this user's)."""
        params = {"id": message_id, "user_id": user_id}
        return await self._db.fetchone(QUERIES["get_message"], params, row=_MESSAGE_ROW)

    async def listing(
        self,
        user_id: str | None,
        *,
        status: MessageStatus | None,
        client_message_id: str | None,
        sender: str | None,
        after: uuid.UUID | None,
        limit: int,
        priority: str | None = None,
        delivery: str | None = None,
    ) -> list[ListedRow]:
        """A page of messages, newest first; `delivery` one of DELIVERIES (None: any)."""
        params = {
            "user_id": user_id,
            "status": status,
            "client_message_id": client_message_id,
            "sender": sender,
            "priority": priority,  # high | normal | low
            # The column's value (its index serves the filter), or sent without a receipt.
            "delivery_state": DELIVERY_STATES.get(delivery) if delivery else None,
            "accepted": delivery == ACCEPTED,
            "after": after,
            "limit": limit,
        }
        return await self._db.fetchall(
            QUERIES["list_messages"], params, row=_LISTED_ROW, prepare=False
        )

    async def cancel(self, message_id: uuid.UUID, user_id: str | None) -> bool:
        """True when this call moved the message from pending to cancelled."""
        params = {"id": message_id, "user_id": user_id}
        return (
            await self._db.fetchone(QUERIES["cancel_message"], params, row=scalar_row) is not None
        )

    async def retry(self, message_id: uuid.UUID, budget: int) -> MessageRow | None:
        """Requeue an errored or cancelled message with `budget` more attempts; its view
        as the retry left it, or None when it was not in a state to retry or its sender
        no longer exists."""
        params = {"id": message_id, "budget": budget}
        return await self._db.fetchone(QUERIES["retry_message"], params, row=_MESSAGE_ROW)

    async def sender_exists(self, sender: str) -> bool:
        """Whether a message may name `sender` now: `default`, or a stored sender (read
        from the database, not from a process's cached senders)."""
        exists = await self._db.fetchone(QUERIES["sender_exists"], {"id": sender}, row=scalar_row)
        return bool(exists)
