"""The dispatchers' side of the queue: claims under a lease, outcomes written in batches,
late successes, and expired leases handed back."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from outbox.store.database import QUERIES, Database


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 5× more, per message
class Claimed:
    """A message claimed for one attempt (`attempt` counts this one)."""

    id: uuid.UUID
    user_id: str
    to: str
    type: str
    payload: dict[str, Any]
    client_message_id: str | None
    attempt: int
    max_attempts: int
    expires_at: datetime | None


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 5× more, per message
class Completion:
    """The outcome of one attempt, as the completer writes it."""

    id: uuid.UUID
    attempt: int
    status: str  # the message's new status: sent | pending | error
    outcome: str  # sent | transient | permanent | sender | expired | interrupted
    started_at: datetime
    finished_at: datetime
    latency_ms: float | None = None
    error: str | None = None
    provider_message_id: str | None = None
    next_attempt_at: datetime | None = None
    refund: int = 0  # 1 when the attempt was not spent (sender-level error, expiry)


class Queue:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def open_claiming_connections(
        self, count: int, dispatcher: str, lease_seconds: float
    ) -> None:
        """Have `count` pool connections open (at most the pool's size), each having run a
        claim of no rows: connecting, and the first claim of a new server process
        loading the table's and its indexes' metadata (2–4 ms here), are start-up work,
        not delivery. Raises PoolTimeout (an OperationalError) when the database does
        not answer within the pool timeout."""
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(min(count, self._db.pool.max_size)):
                conn = await stack.enter_async_context(self._db.connection())
                await self._db.execute(
                    conn,
                    QUERIES["claim_messages"],
                    {"dispatcher": dispatcher, "limit": 0, "lease_seconds": lease_seconds},
                )

    async def claim(
        self, dispatcher: str, limit: int, lease_seconds: float
    ) -> tuple[list[Claimed], datetime | None]:
        """Up to `limit` due messages, and when the earliest pending one not yet due
        becomes due (None: none is pending)."""
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
                conn,
                QUERIES["claim_messages"],
                {"dispatcher": dispatcher, "limit": limit, "lease_seconds": lease_seconds},
            )
            rows = await cursor.fetchall()
        claimed = [Claimed(*row[:-1]) for row in rows if row[0] is not None]
        next_due_at = next((row[-1] for row in rows if row[0] is None), None)
        return claimed, next_due_at

    async def complete(self, dispatcher: str, completions: list[Completion]) -> set[uuid.UUID]:
        """Write many outcomes in one statement; return the ids it applied to."""
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
                conn,
                QUERIES["complete_attempts"],
                {"dispatcher": dispatcher, "outcomes": orjson.dumps(completions).decode()},
            )
            rows = await cursor.fetchall()
        return {row[0] for row in rows}

    async def record_late_successes(
        self, dispatcher: str, completions: list[Completion]
    ) -> set[uuid.UUID]:
        """Successes `complete` did not apply, recorded where their attempt was reaped and no
        later one has started; return the ids recorded."""
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
                conn,
                QUERIES["record_late_successes"],
                {"dispatcher": dispatcher, "outcomes": orjson.dumps(completions).decode()},
            )
            rows = await cursor.fetchall()
        return {row[0] for row in rows}

    async def reap_expired_leases(self, limit: int = 1000, keep: Iterable[uuid.UUID] = ()) -> int:
        """Return rows whose lease expired, except those in `keep`; how many were returned."""
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
                conn, QUERIES["reap_expired_leases"], {"limit": limit, "keep": list(keep)}
            )
            return len(await cursor.fetchall())
