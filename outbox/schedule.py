"""The scheduled purge, run by every dispatcher process and executed once per tick.

Ticks come from `OUTBOX_PURGE_SCHEDULE` (cron, read by cronsim) in `OUTBOX_TIMEZONE`.
Whatever the number of dispatchers, a tick runs at most once across the cluster:

1. the process takes the job's advisory lock (`pg_try_advisory_lock`; a process that
   does not get it skips and looks again shortly), held for the whole run;
2. it inserts `(job, tick)` into `outbox.job_runs` with ON CONFLICT DO NOTHING before
   the work: only the process whose insert went in runs the tick.

The tick considered is always the latest one at or before now, so a tick missed while
every dispatcher was down runs once at the next start (only the latest of them). On a
database where the job never ran, the current tick is recorded as a baseline instead
of run: a fresh database has no missed tick. A run that dies half-way is not retried:
its row stays unfinished and the next tick does the work (the purge is idempotent).

Where pg_cron runs the job (`outbox migrate --pg-cron`), the dispatchers leave it alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from cronsim import CronSim
from psycopg import sql

from outbox.log import get_logger
from outbox.metrics import DispatchMetrics
from outbox.purge import run_purge
from outbox.settings import Settings
from outbox.store import PurgeCounts, Store
from outbox.waiting import wait_event

log = get_logger("outbox.schedule")

PURGE_JOB = "purge"
PG_CRON_JOB_NAME = "outbox-purge"

# The longest sleep between two looks at the clock: bounds the effect of a clock jump
# and how long a process that lost the lock waits before it looks again.
MAX_SLEEP = 60.0


def utc_now() -> datetime:
    return datetime.now(UTC)


class Outcome(StrEnum):
    RAN = "ran"  # this process ran the tick
    BASELINE = "baseline"  # first run on this database: the tick is recorded, not run
    DONE = "done"  # the tick (or a later one) was run already
    BUSY = "busy"  # another process holds the lock; look again later
    PG_CRON = "pg_cron"  # pg_cron owns the job


def pg_cron_command(settings: Settings) -> str:
    """The SQL pg_cron runs: the same purge with the same retention settings, its values
    as literals. A retention of 0 keeps: it is written NULL, which every purge procedure
    reads as keep (migration 009 gave purge_errored the guard the others had; NULL kept
    before it too)."""

    def interval(seconds: float) -> sql.Composable:
        text = f"{seconds:.3f}".rstrip("0").rstrip(".")
        if text == "0":
            return sql.NULL
        return sql.SQL("interval {}").format(sql.Literal(text + " seconds"))

    command = sql.SQL("CALL outbox.purge({}, {}, {}, {})").format(
        interval(settings.error_retention),
        interval(settings.sent_retention),
        interval(settings.event_retention),
        sql.Literal(settings.purge_batch_size),
    )
    return command.as_string()


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        now: Callable[[], datetime] = utc_now,
        work: Callable[[], Awaitable[PurgeCounts]] | None = None,
        runner: str | None = None,
        job: str = PURGE_JOB,
        metrics: DispatchMetrics | None = None,
    ) -> None:
        self.metrics = metrics or DispatchMetrics()
        self.settings = settings
        self.store = store
        self.now = now
        self.job = job
        self.runner = runner or settings.dispatcher_id
        self.expression = settings.purge_schedule
        self.zone = ZoneInfo(settings.timezone)
        self._stop = asyncio.Event()
        self._work = work or self._purge
        self._handled: datetime | None = None  # the latest tick known to be done

    # Ticks --------------------------------------------------------------------------

    def latest_tick(self, at: datetime) -> datetime:
        """The latest tick at or before `at` (cronsim's reverse walk is strict)."""
        local = at.astimezone(self.zone).replace(microsecond=0) + timedelta(seconds=1)
        return next(CronSim(self.expression, local, reverse=True))

    def next_tick(self, at: datetime) -> datetime:
        """The first tick strictly after `at`."""
        return next(CronSim(self.expression, at.astimezone(self.zone)))

    # One look ------------------------------------------------------------------------

    async def pg_cron_owns_job(self) -> bool:
        try:
            job = await self.store.jobs.pg_cron_job(PG_CRON_JOB_NAME)
        except Exception:  # no privilege on cron.job, say: we run it ourselves
            log.warning("could not read cron.job; the dispatchers schedule the purge")
            return False
        return job is not None and job.active

    async def run_due(self) -> Outcome:
        """Run the latest tick at or before now unless it (or a later one) ran already."""
        tick = self.latest_tick(self.now())
        if self._handled is not None and self._handled >= tick:
            return Outcome.DONE
        async with self.store.jobs.session(self.job) as session:
            if session is None:
                return Outcome.BUSY
            last = await session.last_tick()
            if last is None:
                await session.begin(tick, self.runner, baseline=True)
                self._handled = tick
                log.info("purge schedule baseline", job=self.job, tick=tick.isoformat())
                return Outcome.BASELINE
            if last >= tick:
                self._handled = last
                return Outcome.DONE
            if await self.pg_cron_owns_job():
                self._handled = tick
                return Outcome.PG_CRON
            if not await session.begin(tick, self.runner):
                self._handled = tick
                return Outcome.DONE
            self._handled = tick
            started = time.monotonic()
            log.info("scheduled purge started", job=self.job, tick=tick.isoformat())
            counts = await self._work()
            duration_ms = round((time.monotonic() - started) * 1000, 1)
            await session.finish(
                tick,
                counts.total,
                {
                    "errored": counts.errored,
                    "sent": counts.sent,
                    "events": counts.events,
                    "duration_ms": duration_ms,
                    "interrupted": self._stop.is_set(),
                },
            )
            self.metrics.purge_runs.inc()
            for kind, rows in (
                ("errored", counts.errored),
                ("sent", counts.sent),
                ("events", counts.events),
            ):
                self.metrics.purge_rows[kind].inc(rows)
            log.info(
                "scheduled purge finished",
                job=self.job,
                tick=tick.isoformat(),
                rows=counts.total,
                errored=counts.errored,
                sent=counts.sent,
                events=counts.events,
                duration_ms=duration_ms,
            )
            return Outcome.RAN

    async def _purge(self) -> PurgeCounts:
        return await run_purge(
            self.store, self.settings, should_stop=self._stop.is_set, trigger="schedule"
        )

    # The loop ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Look at the clock at each tick (and at least every MAX_SLEEP) until `stop`."""
        self._stop = stop
        try:
            if await self.pg_cron_owns_job():
                log.info("purge is scheduled by pg_cron; the dispatcher leaves it alone")
                return
        except Exception:
            log.exception("could not check pg_cron")
        log.info(
            "purge scheduler started",
            schedule=self.expression,
            timezone=self.settings.timezone,
            next_tick=self.next_tick(self.now()).isoformat(),
        )
        while not stop.is_set():
            try:
                outcome = await self.run_due()
            except Exception:
                log.exception("scheduled purge failed", job=self.job)
                outcome = Outcome.BUSY
            if outcome is Outcome.PG_CRON:
                log.info("purge is scheduled by pg_cron; the dispatcher leaves it alone")
                return
            now = self.now()
            delay = (self.next_tick(now) - now).total_seconds()
            if outcome is Outcome.BUSY:
                delay = min(delay, 5.0)
            delay = min(max(delay, 0.05), MAX_SLEEP)
            await wait_event(stop, delay)
