"""The dispatchers' side of the queue: claims under a lease, outcomes written in batches,
late successes, and expired leases handed back."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from psycopg.rows import RowMaker, no_result, scalar_row

from outbox.states import AttemptOutcome, MessageStatus
from outbox.store.database import QUERIES, Database, check_columns


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
    sender: str  # whose provider and credentials the call uses


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 5× more, per message
class Completion:
    """The outcome of one attempt, as the completer writes it."""

    id: uuid.UUID
    attempt: int
    status: MessageStatus  # the message's new status: sent | pending | error
    outcome: AttemptOutcome  # any but lease_expired, which the reaper writes
    started_at: datetime
    finished_at: datetime
    latency_ms: float | None = None
    error: str | None = None
    provider_message_id: str | None = None
    next_attempt_at: datetime | None = None
    refund: int = 0  # 1 when the attempt was not spent (sender-level error, expiry)
    sender: str = "default"  # the message's sender, for the metrics (not written)


CLAIM_COLUMNS = [*(field.name for field in dataclasses.fields(Claimed)), "next_due_at"]


def _claim_row(cursor: Any) -> RowMaker[Claimed | datetime | None]:
    """claim_messages' rows: a Claimed for each claimed row (its columns are Claimed's
    fields, checked once per result), and the next_due_at of the one row whose id is
    NULL. Built from the values in order, as dataclass_row does (database.py)."""
    if cursor.description is None:
        return no_result
    check_columns(cursor, CLAIM_COLUMNS, "claim_messages")

    def make(values: Sequence[Any]) -> Claimed | datetime | None:
        return Claimed(*values[:-1]) if values[0] is not None else values[-1]

    return make


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
                params = {
                    "dispatcher": dispatcher,
                    "limit": 0,
                    "lease_seconds": lease_seconds,
                    "now": None,
                }
                await self._db.execute(conn, QUERIES["claim_messages"], params, row=_claim_row)

    async def claim(
        self, dispatcher: str, limit: int, lease_seconds: float, *, now: datetime | None = None
    ) -> tuple[list[Claimed], datetime | None]:
        """Up to `limit` due messages, and, when fewer came, when the earliest pending one
        not yet due becomes due (None: none is pending, or `limit` came). A paused
        sender's messages are left pending (unless expired). `now`: claim as of that
        time (the database's clock when None)."""
        params = {
            "dispatcher": dispatcher,
            "limit": limit,
            "lease_seconds": lease_seconds,
            "now": now,
        }
        rows = await self._db.fetchall(QUERIES["claim_messages"], params, row=_claim_row)
        claimed = [row for row in rows if isinstance(row, Claimed)]
        next_due_at = next((row for row in rows if not isinstance(row, Claimed)), None)
        return claimed, next_due_at

    async def complete(self, dispatcher: str, completions: list[Completion]) -> set[uuid.UUID]:
        """Write many outcomes in one statement; return the ids it applied to."""
        params = {"dispatcher": dispatcher, "outcomes": orjson.dumps(completions).decode()}
        return set(await self._db.fetchall(QUERIES["complete_attempts"], params, row=scalar_row))

    async def record_late_successes(
        self, dispatcher: str, completions: list[Completion]
    ) -> set[uuid.UUID]:
        """Successes `complete` did not apply, recorded where their attempt was reaped and no
        later one has started; return the ids recorded."""
        params = {"dispatcher": dispatcher, "outcomes": orjson.dumps(completions).decode()}
        return set(
            await self._db.fetchall(QUERIES["record_late_successes"], params, row=scalar_row)
        )

    async def reap_expired_leases(self, limit: int = 1000, keep: Iterable[uuid.UUID] = ()) -> int:
        """Return rows whose lease expired, except those in `keep`; how many were returned."""
        params = {"limit": limit, "keep": list(keep)}
        return len(await self._db.fetchall(QUERIES["reap_expired_leases"], params, row=scalar_row))
