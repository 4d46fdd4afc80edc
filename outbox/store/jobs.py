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
from psycopg.rows import scalar_row
from psycopg.types.json import Jsonb

from outbox.store.database import QUERIES, Database, dataclass_row

# Advisory-lock namespace (first key of the two-int form) of the scheduled jobs; the
# second key is hashtext(job). Distinct from the migration lock.
JOB_LOCK_NAMESPACE = 0x6F627831  # "obx1"


@dataclass(frozen=True, slots=True)
class PurgeCutoffs:
    """The cutoffs of one purge run (the columns of purge_cutoffs)."""

    errored: datetime | None  # None keeps them
    done: datetime | None  # sent and cancelled; None keeps them
    events: datetime | None


@dataclass(frozen=True, slots=True)
class PurgeCounts:
    """Rows deleted, or that a purge would delete (the columns of purge_counts)."""

    errored: int = 0
    sent: int = 0  # sent and cancelled messages
    events: int = 0

    @property
    def total(self) -> int:
        return self.errored + self.sent + self.events


@dataclass(frozen=True, slots=True)
class PgCronJob:
    """A job registered in pg_cron (the columns of pg_cron_job)."""

    jobid: int
    schedule: str
    command: str
    active: bool


_CUTOFFS_ROW = dataclass_row(PurgeCutoffs)
_COUNTS_ROW = dataclass_row(PurgeCounts)
_PG_CRON_JOB_ROW = dataclass_row(PgCronJob)


class JobSession:
    """A connection holding a job's advisory lock: read and write its job_runs rows."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], job: str) -> None:
        self.conn = conn
        self.job = job

    async def last_tick(self) -> datetime | None:
        cursor = await self.conn.cursor(row_factory=scalar_row).execute(
            QUERIES["last_job_tick"], {"job": self.job}
        )
        return await cursor.fetchone()  # None: the job never ran here

    async def begin(self, tick: datetime, runner: str, *, baseline: bool = False) -> bool:
        """Insert the tick's row; False when it exists (someone ran it already).
        A baseline row is finished at once: it marks a tick that is not run."""
        cursor = await self.conn.cursor(row_factory=scalar_row).execute(
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
        self,
        error_seconds: float,
        sent_seconds: float,
        event_seconds: float,
        *,
        now: datetime | None = None,
    ) -> PurgeCutoffs:
        """The cutoffs of one run as of `now` (the database's clock when None); a retention
        of 0 keeps (None)."""
        params = {
            "error_seconds": error_seconds,
            "sent_seconds": sent_seconds,
            "event_seconds": event_seconds,
            "now": now,
        }
        cutoffs = await self._db.fetchone(QUERIES["purge_cutoffs"], params, row=_CUTOFFS_ROW)
        assert cutoffs is not None
        return cutoffs

    async def purge_counts(self, cutoffs: PurgeCutoffs) -> PurgeCounts:
        """What a purge with these cutoffs would delete (a dry run)."""
        params = {"errored": cutoffs.errored, "done": cutoffs.done, "events": cutoffs.events}
        counts = await self._db.fetchone(QUERIES["purge_counts"], params, row=_COUNTS_ROW)
        assert counts is not None
        return counts

    async def purge_batch(self, kind: str, cutoff: datetime, batch_size: int) -> int:
        """Delete one batch (its own transaction) of `errored`, `done` or `events` rows."""
        query = {
            "errored": QUERIES["purge_errored_batch"],
            "done": QUERIES["purge_done_batch"],
            "events": QUERIES["purge_events_batch"],
        }[kind]
        params = {"cutoff": cutoff, "batch_size": batch_size}
        deleted = await self._db.fetchone(query, params, row=scalar_row)
        return int(deleted) if deleted is not None else 0

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
            cursor = await conn.cursor(row_factory=scalar_row).execute(
                QUERIES["try_job_lock"], params
            )
            if not await cursor.fetchone():
                yield None
                return
            yield JobSession(conn, job)
            await conn.execute(QUERIES["job_unlock"], params)
        finally:
            await conn.close()

    async def pg_cron_job(self, name: str) -> PgCronJob | None:
        """The pg_cron job of that name in this database, if pg_cron is installed here."""
        async with self._db.connection() as conn:
            cursor = await self._db.execute(conn, QUERIES["pg_cron_installed"], row=scalar_row)
            if not await cursor.fetchone():
                return None
            params = {"name": name}
            jobs = await self._db.execute(
                conn, QUERIES["pg_cron_job"], params, row=_PG_CRON_JOB_ROW
            )
            return await jobs.fetchone()
