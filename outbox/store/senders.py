"""The stored senders (outbox.senders): read, created or replaced, deleted, paused and
resumed; and how many live messages each one has."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from psycopg import AsyncConnection
from psycopg.rows import scalar_row

from outbox.store.database import QUERIES, Database, dataclass_row


@dataclass(frozen=True, slots=True)
class SenderRow:
    """A stored sender (the columns of list_senders). `secrets` is the Fernet token of the
    secret settings, `secret_fields` the names of those set."""

    id: str
    provider: str
    settings: dict[str, Any]
    secrets: bytes | None
    secret_fields: list[str]
    rate_limit: float | None
    users: list[str]
    paused: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class SenderCounts:
    """A sender's live messages (the columns of sender_counts)."""

    sender: str
    pending: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class SenderState:
    """A sender's state now (the columns of sender_states): its pause, and the rate the
    claim keeps it to (None: unlimited; with no rate_limit configured, a limit it learned
    from a throttle)."""

    id: str
    paused: dict[str, Any] | None
    effective_rate: float | None


@dataclass(frozen=True, slots=True)
class SenderStatus:
    """A sender as `outbox status` shows it (the columns of sender_status): `default`, the
    environment's, has no provider or rate_limit here."""

    id: str
    provider: str | None
    rate_limit: float | None
    paused: dict[str, Any] | None
    effective_rate: float | None
    pending: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class NewSender:
    """A sender's configuration as PUT stores it (its secrets already encrypted)."""

    id: str
    provider: str
    settings: dict[str, Any]
    secrets: bytes | None
    secret_fields: list[str]
    rate_limit: float | None
    users: list[str]


_SENDER_ROW = dataclass_row(SenderRow)
_COUNTS_ROW = dataclass_row(SenderCounts)
_STATUS_ROW = dataclass_row(SenderStatus)
_STATE_ROW = dataclass_row(SenderState)


class Senders:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def all(self) -> list[SenderRow]:
        return await self._db.fetchall(QUERIES["list_senders"], {"id": None}, row=_SENDER_ROW)

    async def get(self, sender_id: str) -> SenderRow | None:
        return await self._db.fetchone(QUERIES["list_senders"], {"id": sender_id}, row=_SENDER_ROW)

    async def states(self, sender_id: str | None = None) -> dict[str, SenderState]:
        """Each sender's state by id (one sender's when `sender_id` is given); a sender
        without one is unlimited and active."""
        rows = await self._db.fetchall(QUERIES["sender_states"], {"id": sender_id}, row=_STATE_ROW)
        return {row.id: row for row in rows}

    async def set_limit(self, sender_id: str, rate_limit: float | None) -> None:
        """A sender's configured limit in its state (`default`'s, which the environment
        sets): a change starts its rate again at the limit."""
        params = {"id": sender_id, "rate_limit": rate_limit}
        await self._db.fetchall(QUERIES["set_sender_limit"], params, row=scalar_row)

    async def counts(self, sender_ids: Sequence[str]) -> dict[str, SenderCounts]:
        """Pending and in-flight messages by sender id (zero for a sender left out)."""
        rows = await self._db.fetchall(
            QUERIES["sender_counts"], {"ids": list(sender_ids)}, row=_COUNTS_ROW
        )
        return {row.sender: row for row in rows}

    async def status(self) -> list[SenderStatus]:
        """Every sender, `default` first, with its live messages (one statement)."""
        return await self._db.fetchall(QUERIES["sender_status"], row=_STATUS_ROW)

    async def put(self, sender: NewSender) -> bool:
        """Create or replace `sender`'s configuration; True when it was created."""
        params = {
            "id": sender.id,
            "provider": sender.provider,
            "settings": orjson.dumps(sender.settings).decode(),
            "secrets": sender.secrets,
            "secret_fields": sender.secret_fields,
            "rate_limit": sender.rate_limit,
            "users": sender.users,
        }
        created = await self._db.fetchone(QUERIES["put_sender"], params, row=scalar_row)
        return bool(created)

    async def delete(self, sender_id: str) -> bool:
        """Deleted: True; False when unknown or while it has live messages."""
        params = {"id": sender_id}
        return await self._db.fetchone(QUERIES["delete_sender"], params, row=scalar_row) is not None

    async def pause(self, sender_id: str, reason: str) -> bool:
        """Paused by hand (False: no such sender)."""
        params = {"id": sender_id, "reason": reason}
        return await self._db.fetchone(QUERIES["pause_sender"], params, row=scalar_row) is not None

    async def resume(self, sender_id: str) -> bool:
        """Resumed (False: no such sender)."""
        params = {"id": sender_id}
        return await self._db.fetchone(QUERIES["resume_sender"], params, row=scalar_row) is not None


async def stored_senders(conninfo: str, *, connect_timeout: int) -> list[SenderRow]:
    """The stored senders, read on a connection of its own before any pool exists (the
    start-time check of OUTBOX_SECRET_KEY). Unprepared: it may go through a pooler."""
    async with await AsyncConnection.connect(
        conninfo, autocommit=True, prepare_threshold=None, connect_timeout=connect_timeout
    ) as conn:
        cursor = conn.cursor(row_factory=_SENDER_ROW)
        await cursor.execute(QUERIES["list_senders"], {"id": None})
        return await cursor.fetchall()
