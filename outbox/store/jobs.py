"""The scheduled jobs' statements: the purge's cutoffs, counts and batches, a job's advisory
lock and run records, and pg_cron's job when pg_cron is installed."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from outbox.store.database import QUERIES, Database

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


class Jobs:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def purge_cutoffs(
        self, error_seconds: float, sent_seconds: float, event_seconds: float
    ) -> PurgeCutoffs:
        """The cutoffs of one run from the database clock; a retention of 0 keeps (None)."""
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
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
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
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
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
                conn, query, {"cutoff": cutoff, "batch_size": batch_size}
            )
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    @contextlib.asynccontextmanager
    async def session(self, job: str) -> AsyncIterator[JobSession | None]:
        """Hold the job's advisory lock on a connection of its own for the block, or
        yield None at once when another process holds it. Closing the connection
        releases the lock even if the block is cancelled half-way."""
        conninfo: Any = self._db.session_conninfo or self._db.pool.conninfo
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
        async with self._db.connection() as conn:
            cursor = await self._db.execute(conn, QUERIES["pg_cron_installed"])
            row = await cursor.fetchone()
            if not (row and row[0]):
                return None
            cursor = await self._db.execute(
                conn, QUERIES["pg_cron_job"], {"name": name}, dicts=True
            )
            return await cursor.fetchone()
