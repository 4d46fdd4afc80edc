"""The scheduler: ticks in a time zone, exactly once across processes, missed and fresh."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from outbox.schedule import PURGE_JOB, Outcome, Scheduler
from outbox.settings import Settings
from outbox.store import PurgeCounts
from tests.e2e.conftest import Process, clean_env
from tests.purge.conftest import add_message, count, make_settings, open_store

TICK = datetime(2030, 1, 10, 3, 0, tzinfo=UTC)
PREVIOUS_TICK = datetime(2030, 1, 9, 3, 0, tzinfo=UTC)


def fixed(at: datetime) -> Any:
    return lambda: at


def job_runs(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT tick, rows, finished_at IS NOT NULL, detail FROM outbox.job_runs "
        "WHERE job = %s ORDER BY tick",
        [PURGE_JOB],
    ).fetchall()


def record(conn: psycopg.Connection[Any], tick: datetime) -> None:
    conn.execute(
        "INSERT INTO outbox.job_runs (job, tick, finished_at, rows) VALUES (%s, %s, %s, 0)",
        [PURGE_JOB, tick, tick],
    )


class Counter:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    async def __call__(self) -> PurgeCounts:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return PurgeCounts(errored=7)


# Ticks (no database) -------------------------------------------------------------------


def scheduler_for(**overrides: Any) -> Scheduler:
    settings = Settings(database_url="postgresql://unused", **overrides)
    return Scheduler(settings, store=None)  # type: ignore[arg-type]


def test_latest_tick_is_at_or_before_now() -> None:
    scheduler = scheduler_for()
    assert scheduler.latest_tick(TICK) == TICK
    assert scheduler.latest_tick(datetime(2030, 1, 10, 2, 59, 59, tzinfo=UTC)) == PREVIOUS_TICK
    assert scheduler.next_tick(TICK) == datetime(2030, 1, 11, 3, 0, tzinfo=UTC)


def test_ticks_follow_the_time_zone() -> None:
    scheduler = scheduler_for(timezone="America/Sao_Paulo")  # UTC-3
    # 05:30 UTC is 02:30 in São Paulo: today's 03:00 there has not come yet.
    latest = scheduler.latest_tick(datetime(2030, 1, 10, 5, 30, tzinfo=UTC))
    assert latest == datetime(2030, 1, 9, 3, 0, tzinfo=ZoneInfo("America/Sao_Paulo"))
    assert latest.astimezone(UTC) == datetime(2030, 1, 9, 6, 0, tzinfo=UTC)


# Against the database ----------------------------------------------------------------


def test_a_fresh_database_has_no_missed_tick(
    sql_conn: psycopg.Connection[Any], database_url: str
) -> None:
    settings = make_settings(database_url)
    work = Counter()

    async def go() -> list[Outcome]:
        async with open_store(settings) as store:
            first = Scheduler(settings, store, now=fixed(TICK.replace(hour=12)), work=work)
            later = Scheduler(settings, store, now=fixed(TICK.replace(day=11, second=1)), work=work)
            return [await first.run_due(), await first.run_due(), await later.run_due()]

    assert asyncio.run(go()) == [Outcome.BASELINE, Outcome.DONE, Outcome.RAN]
    assert work.calls == 1  # the baseline was recorded, not run; the next tick ran
    runs = job_runs(sql_conn)
    assert [(r[0], r[1], r[2]) for r in runs] == [
        (TICK, 0, True),
        (TICK.replace(day=11), 7, True),
    ]
    assert runs[0][3] == {"baseline": True}
    assert runs[1][3]["errored"] == 7


def test_a_missed_tick_runs_once_at_start(
    sql_conn: psycopg.Connection[Any], database_url: str
) -> None:
    record(sql_conn, datetime(2030, 1, 6, 3, 0, tzinfo=UTC))  # then every dispatcher was down
    settings = make_settings(database_url)
    work = Counter()

    async def go() -> list[Outcome]:
        async with open_store(settings) as store:
            now = fixed(TICK.replace(hour=12))
            one = Scheduler(settings, store, now=now, work=work)
            other = Scheduler(settings, store, now=now, work=work)  # a later start elsewhere
            return [await one.run_due(), await one.run_due(), await other.run_due()]

    assert asyncio.run(go()) == [Outcome.RAN, Outcome.DONE, Outcome.DONE]
    assert work.calls == 1
    assert [r[0] for r in job_runs(sql_conn)] == [datetime(2030, 1, 6, 3, 0, tzinfo=UTC), TICK]


def test_three_schedulers_racing_for_a_tick_run_it_once(
    sql_conn: psycopg.Connection[Any], database_url: str
) -> None:
    record(sql_conn, PREVIOUS_TICK)
    settings = make_settings(database_url)
    work = Counter(delay=0.3)  # the winner is still working while the others look
    now = fixed(TICK.replace(second=1))

    async def race() -> list[Outcome]:
        async with (
            open_store(settings) as a,
            open_store(settings) as b,
            open_store(settings) as c,
        ):  # three processes: three pools, three connections
            schedulers = [
                Scheduler(settings, store, now=now, work=work, runner=f"d-{i}")
                for i, store in enumerate((a, b, c))
            ]
            first = await asyncio.gather(*(s.run_due() for s in schedulers))
            # and again once the winner is done: the job_runs row says it ran
            fresh = [Scheduler(settings, s, now=now, work=work) for s in (a, b, c)]
            second = [await s.run_due() for s in fresh]
            return [*first, *second]

    outcomes = asyncio.run(race())

    assert work.calls == 1
    assert outcomes[:3].count(Outcome.RAN) == 1
    assert set(outcomes[:3]) <= {Outcome.RAN, Outcome.BUSY, Outcome.DONE}
    assert outcomes[3:] == [Outcome.DONE] * 3
    runs = job_runs(sql_conn)
    assert [(r[0], r[1], r[2]) for r in runs] == [(PREVIOUS_TICK, 0, True), (TICK, 7, True)]


def test_the_job_runs_row_alone_keeps_a_tick_from_running_twice(
    sql_conn: psycopg.Connection[Any], database_url: str
) -> None:
    """Without contention for the lock (one after the other), the row decides."""
    record(sql_conn, PREVIOUS_TICK)
    record(sql_conn, TICK)
    settings = make_settings(database_url)
    work = Counter()

    async def go() -> Outcome:
        async with open_store(settings) as store:
            return await Scheduler(settings, store, now=fixed(TICK), work=work).run_due()

    assert asyncio.run(go()) is Outcome.DONE
    assert work.calls == 0


def test_the_scheduled_run_purges(sql_conn: psycopg.Connection[Any], database_url: str) -> None:
    record(sql_conn, PREVIOUS_TICK)
    add_message(sql_conn, "error", finished_ago="8 days", attempts=2)
    add_message(sql_conn, "error", finished_ago="1 day", attempts=2)
    settings = make_settings(database_url)

    async def go() -> None:
        stop = asyncio.Event()
        async with open_store(settings) as store:
            scheduler = Scheduler(settings, store, now=fixed(TICK.replace(minute=5)))
            task = asyncio.create_task(scheduler.run(stop))
            for _ in range(500):
                if len(job_runs(sql_conn)) == 2 and job_runs(sql_conn)[1][2]:
                    break
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.wait_for(task, timeout=5)

    asyncio.run(go())
    runs = job_runs(sql_conn)
    assert runs[1][:3] == (TICK, 1, True)
    assert runs[1][3]["errored"] == 1
    assert count(sql_conn, "SELECT count(*) FROM outbox.messages") == 1


def test_the_dispatchers_leave_a_job_that_pg_cron_owns(
    sql_conn: psycopg.Connection[Any], database_url: str
) -> None:
    """cron.job as pg_cron defines it (the real extension is tested in test_pg_cron)."""
    sql_conn.execute(
        """CREATE SCHEMA cron;
           CREATE TABLE cron.job (jobid bigserial, schedule text, command text,
               nodename text, nodeport int, database text, username text,
               active boolean DEFAULT true, jobname text)"""
    )
    sql_conn.execute(
        "INSERT INTO cron.job (schedule, command, database, jobname) "
        "VALUES ('0 3 * * *', 'CALL outbox.purge()', current_database(), 'outbox-purge')"
    )
    record(sql_conn, PREVIOUS_TICK)
    settings = make_settings(database_url)
    work = Counter()

    async def go() -> Outcome:
        async with open_store(settings) as store:
            scheduler = Scheduler(settings, store, now=fixed(TICK), work=work)
            stop = asyncio.Event()
            await asyncio.wait_for(scheduler.run(stop), timeout=5)  # returns at once
            return await scheduler.run_due()

    assert asyncio.run(go()) is Outcome.PG_CRON
    assert work.calls == 0


def test_outbox_dispatch_runs_the_scheduler(database_url: str) -> None:
    """A real dispatcher on a fresh database records the baseline tick."""
    process = Process(
        ["dispatch"],
        clean_env(OUTBOX_DATABASE_URL=database_url, OUTBOX_LOG_FORMAT="json"),
    )
    try:
        process.wait_for_output("purge schedule baseline", stream="stderr", timeout=30)
        code = process.interrupt()
    finally:
        process.kill()
    assert code == 0
    with psycopg.connect(database_url) as conn:
        assert len(job_runs(conn)) == 1
    line = next(line for line in process.stderr if "purge scheduler started" in line)
    assert json.loads(line)["schedule"] == "0 3 * * *"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("OUTBOX_PURGE_SCHEDULE", "0 25 * * *"), ("OUTBOX_TIMEZONE", "Mars/Olympus")],
)
def test_a_bad_schedule_stops_the_dispatcher_with_one_line(variable: str, value: str) -> None:
    import subprocess

    from tests.e2e.conftest import OUTBOX

    result = subprocess.run(
        [*OUTBOX, "dispatch"],
        env=clean_env(OUTBOX_DATABASE_URL="postgresql://unused", **{variable: value}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and variable in result.stderr
