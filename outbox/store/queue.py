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
from psycopg.rows import RowMaker, no_result, scalar_row, tuple_row

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
    throttles: int = 0  # times the provider throttled it so far (each spent no attempt)
    probe: bool = False  # its sender is paused: this call is its breaker's probe
    paced: bool = False  # it took its sender's token (or is a probe): start it first
    claimed_at: datetime | None = None  # the claim's time (the database's clock)
    priority: int = 1  # 0 high, 1 normal, 2 low: a high row starts ahead of those waiting


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
    sender: str = "default"  # the message's sender: its limits and breaker, the metrics
    # What the outcome tells of its sender (sql/migrations/016_sender_limits.sql):
    throttle: str | None = None  # "rate" (its rate halves) or "pair" (that recipient waits)
    code: str | None = None  # the provider's code of a sender-level error (the pause's)
    pause_base: float | None = None  # a sender-level error: OUTBOX_SENDER_PAUSE
    pause_max: float | None = None  # and OUTBOX_SENDER_PAUSE_MAX
    claimed_at: datetime | None = None  # its claim's time: a throttle after a decrease


CLAIM_COLUMNS = [
    *(field.name for field in dataclasses.fields(Claimed)),
    "next_due_at",
    "more",
    "cursors",
]


@dataclass(frozen=True, slots=True)
class ClaimEnd:
    """What a claim says after its rows: when a row may next be claimed (None: nothing
    pending that may go, or a full claim), and whether a sender took its whole share of
    the claim (more may be due: claim again at once); and, per sender, the last user
    the claim served (the round-robin's cursors, for the next claim)."""

    next_due_at: datetime | None
    more: bool
    cursors: dict[str, str]


@dataclass(frozen=True, slots=True)
class ClaimResult:
    claimed: list[Claimed]
    next_due_at: datetime | None
    more: bool
    cursors: dict[str, str] = dataclasses.field(default_factory=dict)


def _claim_row(cursor: Any) -> RowMaker[Claimed | ClaimEnd]:
    """claim_messages' rows: a Claimed for each claimed row (its columns are Claimed's
    fields, checked once per result), and the ClaimEnd of the one row whose id is NULL.
    Built from the values in order, as dataclass_row does (database.py)."""
    if cursor.description is None:
        return no_result
    check_columns(cursor, CLAIM_COLUMNS, "claim_messages")

    def make(values: Sequence[Any]) -> Claimed | ClaimEnd:
        if values[0] is not None:
            return Claimed(*values[:-3])
        return ClaimEnd(values[-3], bool(values[-2]), values[-1] or {})

    return make


class Queue:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def open_claiming_connections(
        self, count: int, dispatcher: str, lease_seconds: float, burst: float
    ) -> None:
        """Have `count` pool connections open (at most the pool's size), each having run a
        claim of no rows, prepared at once (unless the pool prepares nothing: PgBouncer):
        connecting, the first claim of a new server process loading the table's and its
        indexes' metadata (2–4 ms here), and planning the claim (7 ms, against 0.8 to run
        it) are start-up work, not delivery. A first claim planned as it runs also starts
        a limited sender's full bucket late, bunching its calls with the next second's.
        Raises PoolTimeout (an OperationalError) when the database does not answer within
        the pool timeout."""
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(min(count, self._db.pool.max_size)):
                conn = await stack.enter_async_context(self._db.connection())
                params = {
                    "dispatcher": dispatcher,
                    "limit": 0,
                    "lease_seconds": lease_seconds,
                    "now": None,
                    "burst": burst,
                    "paced": 0,
                    "cursors": "{}",
                    "user_max": None,
                }
                prepare = None if conn.prepare_threshold is None else True
                await self._db.execute(
                    conn, QUERIES["claim_messages"], params, row=_claim_row, prepare=prepare
                )

    async def claim(
        self,
        dispatcher: str,
        limit: int,
        lease_seconds: float,
        *,
        burst: float = 0.2,  # OUTBOX_SENDER_BURST's default
        paced: int | None = None,
        cursors: dict[str, str] | None = None,
        user_max_in_flight: int | None = None,
        now: datetime | None = None,
    ) -> ClaimResult:
        """Up to `limit` due messages, each sender within its limits (`burst`: seconds'
        worth of its rate its bucket holds; `paced`: the call slots free now, which a
        limited sender's rows may not outnumber, None: `limit`; `cursors`: per sender,
        the user the previous claim served last there, whose turn has passed;
        `user_max_in_flight`: no user gets more rows in flight), and, when fewer came,
        when a row may next be claimed (see ClaimEnd). A paused sender's messages are left
        pending, but for its breaker's probe. `now`: claim as of that time (the
        database's clock when None)."""
        params = {
            "dispatcher": dispatcher,
            "limit": limit,
            "lease_seconds": lease_seconds,
            "now": now,
            "burst": burst,
            "paced": limit if paced is None else paced,
            "cursors": orjson.dumps(cursors or {}).decode(),
            "user_max": user_max_in_flight,
        }
        rows = await self._db.fetchall(QUERIES["claim_messages"], params, row=_claim_row)
        claimed: list[Claimed] = []
        end = ClaimEnd(None, False, {})
        for row in rows:
            if isinstance(row, Claimed):
                claimed.append(row)
            else:
                end = row
        return ClaimResult(claimed, end.next_due_at, end.more, end.cursors)

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

    async def expire_pending(self, limit: int = 1000) -> int:
        """End pending messages whose expires_at has passed (`error` "expired"); how many."""
        rows = await self._db.fetchall(QUERIES["expire_pending"], {"limit": limit}, row=scalar_row)
        return len(rows)

    async def reap_expired_leases(self, limit: int = 1000, keep: Iterable[uuid.UUID] = ()) -> int:
        """Return rows whose lease expired, except those in `keep`; how many were returned."""
        params = {"limit": limit, "keep": list(keep)}
        return len(await self._db.fetchall(QUERIES["reap_expired_leases"], params, row=scalar_row))

    async def release_stranded(
        self, after: tuple[str, str] | None, limit: int = 1000
    ) -> tuple[int, tuple[str, str] | None]:
        """Release parked rows that no finalisation will release (two messages of one
        conversation finalised at the same moment), visiting up to `limit` conversations
        after `after`; how many were released, and where the next round starts (None:
        from the first)."""
        sender, to = after if after is not None else (None, None)
        row = await self._db.fetchone(
            QUERIES["release_stranded"],
            {"sender": sender, "to": to, "limit": limit},
            row=tuple_row,
        )
        if row is None:
            return 0, None
        last_sender, last_to, released = row
        return int(released), None if last_sender is None else (last_sender, last_to)
