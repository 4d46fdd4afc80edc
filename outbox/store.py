"""The only module that runs SQL: named queries from sql/queries.sql → typed functions."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, LiteralString, cast

import orjson
import psycopg
from psycopg import AsyncClientCursor, AsyncConnection, AsyncCursor
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import Jsonb
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


class _Pooled:
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


class Store:
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
        self._set_timeout: str | None = (
            f"SET LOCAL statement_timeout = {max(1, round(statement_timeout * 1000))}"
            if statement_timeout
            else None
        )

    def _connection(self) -> _Pooled:
        return _Pooled(self.pool)

    async def _execute(
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
        if self._set_timeout is None:
            cursor: AsyncCursor[Any] = conn.cursor(row_factory=dict_row) if dicts else conn.cursor()
            await cursor.execute(query, params, prepare=prepare)
            return cursor
        timed = AsyncClientCursor(conn, row_factory=dict_row if dicts else tuple_row)
        await timed.execute(f"{self._set_timeout};\n{query}", params)
        timed.nextset()  # from the SET's result to the statement's
        return timed

    async def insert_messages(
        self, rows: list[tuple[str, NewMessage]], max_attempts: int
    ) -> list[Inserted | None]:
        """Insert (user_id, message) rows in one statement, each standing alone (coalesced
        requests); None marks a conflict. A (user_id, client_message_id) pair must not
        repeat within one call."""
        document = self._document(rows, max_attempts)
        async with self._connection() as conn:
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
        async with self._connection() as conn, conn.transaction():
            if self._set_timeout is not None:  # for the whole transaction
                await conn.execute(self._set_timeout)
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
            cursor = await self._execute(conn, query, {"messages": document})
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

    async def get_message(
        self, message_id: uuid.UUID, user_id: str | None
    ) -> dict[str, Any] | None:
        async with self._connection() as conn:
            cursor = await self._execute(
                conn, QUERIES["get_message"], {"id": message_id, "user_id": user_id}, dicts=True
            )
            return await cursor.fetchone()

    async def list_messages(
        self,
        user_id: str | None,
        *,
        status: str | None,
        client_message_id: str | None,
        after: uuid.UUID | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        async with self._connection() as conn:
            cursor = await self._execute(
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

    async def cancel_message(self, message_id: uuid.UUID, user_id: str | None) -> bool:
        """True when this call moved the message from pending to cancelled."""
        async with self._connection() as conn:
            cursor = await self._execute(
                conn, QUERIES["cancel_message"], {"id": message_id, "user_id": user_id}
            )
            return await cursor.fetchone() is not None

    async def schema_version(self) -> int:
        async with self._connection() as conn:
            cursor = await self._execute(conn, QUERIES["schema_version"])
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    # Dispatcher ---------------------------------------------------------------------

    async def open_claiming_connections(
        self, count: int, dispatcher: str, lease_seconds: float
    ) -> None:
        """Have `count` pool connections open (at most the pool's size), each having run a
        claim of no rows: connecting, and the first claim of a new server process
        loading the table's and its indexes' metadata (2–4 ms here), are start-up work,
        not delivery. Raises PoolTimeout (an OperationalError) when the database does
        not answer within the pool timeout."""
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(min(count, self.pool.max_size)):
                conn = await stack.enter_async_context(self._connection())
                await self._execute(
                    conn,
                    QUERIES["claim_messages"],
                    {"dispatcher": dispatcher, "limit": 0, "lease_seconds": lease_seconds},
                )

    async def claim(
        self, dispatcher: str, limit: int, lease_seconds: float
    ) -> tuple[list[Claimed], datetime | None]:
        """Up to `limit` due messages, and when the earliest pending one not yet due
        becomes due (None: none is pending)."""
        async with self._connection() as conn:
            cursor = await self._execute(
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
        async with self._connection() as conn:
            cursor = await self._execute(
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
        async with self._connection() as conn:
            cursor = await self._execute(
                conn,
                QUERIES["record_late_successes"],
                {"dispatcher": dispatcher, "outcomes": orjson.dumps(completions).decode()},
            )
            rows = await cursor.fetchall()
        return {row[0] for row in rows}

    async def reap_expired_leases(self, limit: int = 1000, keep: Iterable[uuid.UUID] = ()) -> int:
        """Return rows whose lease expired, except those in `keep`; how many were returned."""
        async with self._connection() as conn:
            cursor = await self._execute(
                conn, QUERIES["reap_expired_leases"], {"limit": limit, "keep": list(keep)}
            )
            return len(await cursor.fetchall())

    # Purge, schedule and inspection (issue 7) -------------------------------------------

    async def purge_cutoffs(
        self, error_seconds: float, sent_seconds: float, event_seconds: float
    ) -> PurgeCutoffs:
        """The cutoffs of one run from the database clock; a retention of 0 keeps (None)."""
        async with self._connection() as conn:
            cursor = await self._execute(
                conn,
                QUERIES["purge_cutoffs"],
                {
                    "error_seconds": error_seconds,
                    "sent_seconds": sent_seconds,
                    "event_seconds": event_seconds,
                },
            )
            row = await cursor.fetchone()
        assert row is not None
        return PurgeCutoffs(errored=row[0], done=row[1], events=row[2])

    async def purge_counts(self, cutoffs: PurgeCutoffs) -> PurgeCounts:
        """What a purge with these cutoffs would delete (a dry run)."""
        async with self._connection() as conn:
            cursor = await self._execute(
                conn,
                QUERIES["purge_counts"],
                {"errored": cutoffs.errored, "done": cutoffs.done, "events": cutoffs.events},
            )
            row = await cursor.fetchone()
        assert row is not None
        return PurgeCounts(errored=row[0], sent=row[1], events=row[2])

    async def purge_batch(self, kind: str, cutoff: datetime, batch_size: int) -> int:
        """Delete one batch (its own transaction) of `errored`, `done` or `events` rows."""
        query = {
            "errored": QUERIES["purge_errored_batch"],
            "done": QUERIES["purge_done_batch"],
            "events": QUERIES["purge_events_batch"],
        }[kind]
        async with self._connection() as conn:
            cursor = await self._execute(conn, query, {"cutoff": cutoff, "batch_size": batch_size})
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    @contextlib.asynccontextmanager
    async def job_session(self, job: str) -> AsyncIterator[JobSession | None]:
        """Hold the job's advisory lock on a connection of its own for the block, or
        yield None at once when another process holds it. Closing the connection
        releases the lock even if the block is cancelled half-way."""
        conninfo: Any = self.session_conninfo or self.pool.conninfo
        if callable(conninfo):
            conninfo = conninfo()
        if inspect.isawaitable(conninfo):
            conninfo = await conninfo
        conn = await psycopg.AsyncConnection.connect(
            str(conninfo), autocommit=True, prepare_threshold=None
        )
        try:
            params = {"namespace": JOB_LOCK_NAMESPACE, "job": job}
            cursor = await conn.execute(QUERIES["try_job_lock"], params)
            row = await cursor.fetchone()
            if not (row and row[0]):
                yield None
                return
            yield JobSession(conn, job)
            await conn.execute(QUERIES["job_unlock"], params)
        finally:
            await conn.close()

    async def pg_cron_job(self, name: str) -> dict[str, Any] | None:
        """The pg_cron job of that name in this database, if pg_cron is installed here."""
        async with self._connection() as conn:
            cursor = await self._execute(conn, QUERIES["pg_cron_installed"])
            row = await cursor.fetchone()
            if not (row and row[0]):
                return None
            cursor = await self._execute(conn, QUERIES["pg_cron_job"], {"name": name}, dicts=True)
            return await cursor.fetchone()

    async def queue_summary(self) -> list[dict[str, Any]]:
        async with self._connection() as conn:
            cursor = await self._execute(conn, QUERIES["queue_summary"], dicts=True)
            return await cursor.fetchall()

    # Admin: dashboard and retry (issue 8) -------------------------------------------------

    async def admin_summary(self, count_cap: int, done_cap: int, rows: int) -> str:
        """The dashboard's figures, as the JSON text PostgreSQL built (one round trip)."""
        params = {"cap": count_cap, "done_cap": done_cap, "rows": rows}
        async with self._connection() as conn:
            cursor = await self._execute(conn, QUERIES["admin_summary"], params)
            row = await cursor.fetchone()
        assert row is not None
        return str(row[0])

    async def retry_message(self, message_id: uuid.UUID, budget: int) -> dict[str, Any] | None:
        """Requeue an errored or cancelled message with `budget` more attempts; its view
        (as get_message gives it), or None when it was not in a state to retry."""
        async with self._connection() as conn:
            cursor = await self._execute(
                conn, QUERIES["retry_message"], {"id": message_id, "budget": budget}, dicts=True
            )
            return await cursor.fetchone()

    async def queue_gauges(self) -> QueueFigures:
        """The queue gauges of /metrics in one statement (see `queue_gauges`)."""
        async with self._connection() as conn:
            cursor = await self._execute(conn, QUERIES["queue_gauges"])
            row = await cursor.fetchone()
        assert row is not None
        pending, due, oldest_due_age, in_flight, expired, *statistics = row
        return QueueFigures(
            counts={
                "pending": pending,
                "in_flight": in_flight,
                **{s: estimate_count(s, *statistics) for s in ("sent", "error", "cancelled")},
            },
            due=due,
            oldest_due_age=oldest_due_age,
            lease_expired=expired,
        )

    # Live status feed (issue 6) ---------------------------------------------------------

    async def max_event_id(self) -> int | None:
        async with self._connection() as conn:
            cursor = await self._execute(conn, QUERIES["max_event_id"])
            row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else None

    async def oldest_event_id(self) -> int | None:
        async with self._connection() as conn:
            cursor = await self._execute(conn, QUERIES["oldest_event_id"])
            row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else None

    async def events_after(
        self, after: int, limit: int, user_id: str | None = None
    ) -> list[EventRow]:
        """Events with id > after in id order; one user's, or everyone's when None."""
        query = QUERIES["events_after"] if user_id is None else QUERIES["user_events_after"]
        async with self._connection() as conn:
            cursor = await self._execute(
                conn, query, {"after": after, "limit": limit, "user_id": user_id}
            )
            rows = await cursor.fetchall()
        return [EventRow(*row) for row in rows]


# Advisory-lock namespace (first key of the two-int form) of the scheduled jobs; the
# second key is hashtext(job). Distinct from the migration lock.
JOB_LOCK_NAMESPACE = 0x6F627831  # "obx1"


@dataclass(frozen=True, slots=True)
class PurgeCutoffs:
    errored: datetime | None  # None keeps them
    done: datetime | None  # sent and cancelled; None keeps them
    events: datetime | None


@dataclass(frozen=True, slots=True)
class PurgeCounts:
    errored: int = 0
    sent: int = 0  # sent and cancelled messages
    events: int = 0

    @property
    def total(self) -> int:
        return self.errored + self.sent + self.events


class JobSession:
    """A connection holding a job's advisory lock: read and write its job_runs rows."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], job: str) -> None:
        self.conn = conn
        self.job = job

    async def last_tick(self) -> datetime | None:
        cursor = await self.conn.execute(QUERIES["last_job_tick"], {"job": self.job})
        row = await cursor.fetchone()
        return row[0] if row else None

    async def begin(self, tick: datetime, runner: str, *, baseline: bool = False) -> bool:
        """Insert the tick's row; False when it exists (someone ran it already).
        A baseline row is finished at once: it marks a tick that is not run."""
        cursor = await self.conn.execute(
            QUERIES["insert_job_run"],
            {
                "job": self.job,
                "tick": tick,
                "runner": runner,
                "finished_at": tick if baseline else None,
                "rows": 0 if baseline else None,
                "detail": Jsonb({"baseline": True}) if baseline else None,
            },
        )
        return await cursor.fetchone() is not None

    async def finish(self, tick: datetime, rows: int, detail: dict[str, Any]) -> None:
        await self.conn.execute(
            QUERIES["finish_job_run"],
            {"job": self.job, "tick": tick, "rows": rows, "detail": Jsonb(detail)},
        )


def estimate_count(
    value: str,
    reltuples: float,
    null_frac: float | None,
    n_distinct: float | None,
    common_values: list[str] | None,
    common_shares: list[float] | None,
) -> int | None:
    """Rows with `value`, as the planner estimates an equality (eqsel): its share in the
    most-common-values list, or else an even part of what the list leaves over. None
    when the table was never analysed: no figure rather than a wrong one."""
    if reltuples < 0 or (n_distinct is None and reltuples > 0):
        return None
    if reltuples == 0 or n_distinct is None:
        return 0
    common = dict(zip(common_values or (), common_shares or (), strict=True))
    if value in common:
        share = common[value]
    else:
        distinct = n_distinct if n_distinct > 0 else -n_distinct * reltuples
        others = distinct - len(common)
        rest = 1.0 - (null_frac or 0.0) - sum(common.values())
        share = rest / others if others >= 1 and rest > 0 else 0.0
    return round(reltuples * share)


@dataclass(frozen=True, slots=True)
class QueueFigures:
    """The queue gauges of /metrics (`queue_gauges`)."""

    counts: dict[str, int | None]  # by status; None: no estimate (never analysed)
    due: int
    oldest_due_age: float  # seconds
    lease_expired: int


@dataclass(frozen=True, slots=True)
class EventRow:
    """A status event as stored: `data` is the wire `data` without `event_id`."""

    id: int
    user_id: str
    event: str
    data: dict[str, Any]
