"""A success is never thrown away: a success for attempt N that arrives after the reaper
took the row back is recorded while no attempt after N has started (N+1 having started:
tests/dispatch/test_stale_outcome.py). A late failure changes nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
from structlog.testing import capture_logs

from outbox import db
from outbox.completer import Completer
from outbox.metrics import DispatchMetrics
from outbox.settings import Settings
from outbox.store import Claimed, Completion, Store
from tests.dispatch.conftest import insert_messages
from tests.gateway.conftest import next_event, open_feed
from tests.support import ServerThread

T = TypeVar("T")


def with_store(settings: Settings, scenario: Callable[[Store], Awaitable[T]]) -> T:
    async def run() -> T:
        pool = db.create_pool(settings)
        await pool.open(wait=True)
        try:
            return await scenario(Store(pool))
        finally:
            await pool.close()

    return asyncio.run(run())


async def claim_and_reap(store: Store, conn: psycopg.Connection) -> Claimed:
    """d1 claims the one message; its lease runs out and the reaper takes the row back."""
    (claimed,) = (await store.queue.claim("d1", 10, 30)).claimed
    conn.execute("UPDATE outbox.messages SET locked_until = now() - interval '1s'")
    assert await store.queue.reap_expired_leases() == 1
    return claimed


def success(message: Claimed) -> Completion:
    now = datetime.now(UTC)
    return Completion(
        id=message.id,
        attempt=message.attempt,
        status="sent",
        outcome="sent",
        started_at=now - timedelta(seconds=1),
        finished_at=now,
        latency_ms=1000.0,
        provider_message_id="wamid.late",
    )


async def write(store: Store, metrics: DispatchMetrics, *completions: Completion) -> list[Any]:
    """d1's completer writes these outcomes; returns the log lines."""
    completer = Completer(store, "d1", metrics, lambda: False)
    writing = asyncio.create_task(completer.run())
    try:
        with capture_logs() as lines:
            for completion in completions:
                completer.put(completion)
            await asyncio.wait_for(completer.wait_idle(), 10)
    finally:
        writing.cancel()
    return lines


def state(conn: psycopg.Connection) -> tuple[Any, ...]:
    row = conn.execute(
        """SELECT status, attempts, provider_message_id, locked_by, finished_at IS NOT NULL
           FROM outbox.messages"""
    ).fetchone()
    assert row is not None
    return tuple(row)


def attempts(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT attempt, dispatcher, outcome, error, latency_ms FROM outbox.attempts ORDER BY id"
    ).fetchall()


def events(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT event, data->>'status', (data->>'attempt')::int FROM outbox.events ORDER BY id"
    ).fetchall()


def test_a_success_after_the_row_was_reaped_back_to_pending_is_recorded(
    sql_conn: psycopg.Connection, settings: Settings
) -> None:
    (message_id,) = insert_messages(sql_conn, 1)
    metrics = DispatchMetrics()

    async def scenario(store: Store) -> tuple[list[Any], int]:
        first = await claim_and_reap(store, sql_conn)
        lines = await write(store, metrics, success(first))
        claimed = (await store.queue.claim("d2", 10, 30)).claimed
        return lines, len(claimed)

    lines, claimed_again = with_store(settings, scenario)
    assert claimed_again == 0  # sent: no attempt 2
    assert state(sql_conn) == ("sent", 1, "wamid.late", None, True)
    # Attempt 1's row says what happened: sent, not "lease expired".
    assert attempts(sql_conn) == [(1, "d1", "sent", None, 1000.0)]
    assert events(sql_conn) == [("message_retrying", "retrying", 1), ("message_sent", "queued", 1)]
    assert metrics.registry.get_sample_value("outbox_late_successes_recorded_total") == 1
    assert metrics.registry.get_sample_value("outbox_outcomes_lost_total") == 0
    sent = {"outcome": "sent", "error_class": "none", "sender": "default"}
    assert metrics.registry.get_sample_value("outbox_attempts_total", sent) == 1
    recorded = [line for line in lines if line["event"].startswith("late success recorded")]
    assert [(line["message_id"], line["attempt"]) for line in recorded] == [(message_id, 1)]


def test_a_success_after_the_last_attempt_was_reaped_to_failed_reaches_the_feed_after_it(
    sql_conn: psycopg.Connection,
    settings: Settings,
    api: ServerThread,
    token: Callable[..., str],
) -> None:
    (message_id,) = insert_messages(sql_conn, 1, max_attempts=1)
    metrics = DispatchMetrics()
    with open_feed(api, token("user-1")) as feed:

        async def scenario(store: Store) -> dict[str, Any]:
            first = await claim_and_reap(store, sql_conn)
            assert state(sql_conn)[0] == "error"  # the reaper's verdict: attempts spent
            failed = next_event(feed)
            await write(store, metrics, success(first))
            return failed

        failed = with_store(settings, scenario)
        correction = next_event(feed)
    assert (failed["event"], failed["data"]["status"]) == ("message_sent", "failed")
    assert failed["data"]["error"].startswith("lease expired")
    # The truth, after the wrong final state: the provider did take the message.
    assert (correction["event"], correction["data"]["status"]) == ("message_sent", "queued")
    assert correction["data"]["message_id"] == message_id
    assert correction["data"]["provider_message_id"] == "wamid.late"
    assert correction["data"]["error"] is None
    assert correction["data"]["event_id"] > failed["data"]["event_id"]
    assert state(sql_conn) == ("sent", 1, "wamid.late", None, True)
    assert [row[:3] for row in attempts(sql_conn)] == [(1, "d1", "sent")]
    assert metrics.registry.get_sample_value("outbox_late_successes_recorded_total") == 1


def test_a_success_after_the_reaped_message_was_cancelled_is_recorded(
    sql_conn: psycopg.Connection, settings: Settings
) -> None:
    (message_id,) = insert_messages(sql_conn, 1)

    async def scenario(store: Store) -> None:
        first = await claim_and_reap(store, sql_conn)
        assert await store.messages.cancel(uuid.UUID(message_id), "user-1")
        await write(store, DispatchMetrics(), success(first))

    with_store(settings, scenario)
    assert state(sql_conn) == ("sent", 1, "wamid.late", None, True)
    assert events(sql_conn) == [
        ("message_retrying", "retrying", 1),
        ("message_cancelled", "cancelled", 1),
        ("message_sent", "queued", 1),
    ]


def test_a_late_failure_after_the_reap_changes_nothing(
    sql_conn: psycopg.Connection, settings: Settings
) -> None:
    insert_messages(sql_conn, 1)
    metrics = DispatchMetrics()

    async def scenario(store: Store) -> list[Any]:
        first = await claim_and_reap(store, sql_conn)
        now = datetime.now(UTC)
        transient = Completion(
            id=first.id,
            attempt=first.attempt,
            status="pending",
            outcome="transient",
            started_at=now,
            finished_at=now,
            error="http: 503",
            next_attempt_at=now + timedelta(minutes=5),
        )
        return await write(store, metrics, transient)

    lines = with_store(settings, scenario)
    assert state(sql_conn)[:4] == ("pending", 1, None, None)
    assert [row[:3] for row in attempts(sql_conn)] == [(1, "d1", "lease_expired")]
    assert events(sql_conn) == [("message_retrying", "retrying", 1)]
    assert metrics.registry.get_sample_value("outbox_outcomes_lost_total") == 1
    assert metrics.registry.get_sample_value("outbox_late_successes_recorded_total") == 0
    assert any(line["event"] == "outcome dropped: lease lost" for line in lines)


def test_a_late_success_waits_for_a_reap_still_committing(
    sql_conn: psycopg.Connection, settings: Settings, database_url: str
) -> None:
    """The reap holds the row when the late success arrives: the success waits for it and
    then sees the reaped row (a snapshot taken before the wait would miss the reap)."""
    insert_messages(sql_conn, 1)

    async def scenario(store: Store) -> set[uuid.UUID]:
        (first,) = (await store.queue.claim("d1", 10, 30)).claimed
        sql_conn.execute("UPDATE outbox.messages SET locked_until = now() - interval '1s'")
        async with await psycopg.AsyncConnection.connect(database_url) as reaper:
            await reaper.execute("SELECT outbox.reap_expired_leases(10, '{}')")
            late = asyncio.create_task(store.queue.record_late_successes("d1", [success(first)]))
            for _ in range(500):  # until it waits on the reaper's row lock, or returns
                waiting = sql_conn.execute(
                    """SELECT count(*) FROM pg_stat_activity
                       WHERE datname = current_database() AND wait_event_type = 'Lock'"""
                ).fetchone()
                if late.done() or (waiting and waiting[0]):
                    break
                await asyncio.sleep(0.01)
            await reaper.commit()
        return await late

    recorded = with_store(settings, scenario)
    assert len(recorded) == 1
    assert state(sql_conn)[0] == "sent"


def test_the_reaper_leaves_alone_the_rows_its_dispatcher_still_holds(
    sql_conn: psycopg.Connection, settings: Settings
) -> None:
    kept, other = (uuid.UUID(i) for i in insert_messages(sql_conn, 2))

    async def scenario(store: Store) -> int:
        await store.queue.claim("d1", 10, 30)
        sql_conn.execute("UPDATE outbox.messages SET locked_until = now() - interval '1s'")
        return await store.queue.reap_expired_leases(keep=[kept])

    assert with_store(settings, scenario) == 1
    rows = dict(sql_conn.execute("SELECT id, status FROM outbox.messages").fetchall())
    assert rows == {kept: "in_flight", other: "pending"}
