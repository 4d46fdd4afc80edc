"""An outcome that arrives after its dispatcher lost the lease and another attempt started
changes nothing, a success included: the row belongs to the attempt that reclaimed it, and
the late outcome is counted as lost (before attempt N+1: tests/dispatch/test_late_success.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import psycopg
from structlog.testing import capture_logs

from outbox import db
from outbox.completer import Completer
from outbox.metrics import DispatchMetrics
from outbox.settings import Settings
from outbox.store import Completion, Store
from tests.dispatch.conftest import insert_messages


def test_a_late_outcome_after_the_lease_was_reclaimed_is_dropped(
    sql_conn: psycopg.Connection, settings: Settings
) -> None:
    (message_id,) = insert_messages(sql_conn, 1)
    metrics = DispatchMetrics()

    async def scenario() -> list[dict[str, object]]:
        pool = db.create_pool(settings)
        await pool.open(wait=True)
        try:
            store = Store(pool)
            (first,) = (await store.queue.claim("d1", 10, 30)).claimed
            # d1 stops answering: its lease runs out, the reaper returns the row, and d2
            # claims it for the next attempt.
            sql_conn.execute("UPDATE outbox.messages SET locked_until = now() - interval '1s'")
            assert await store.queue.reap_expired_leases() == 1
            (second,) = (await store.queue.claim("d2", 10, 30)).claimed
            assert (second.id, second.attempt) == (first.id, 2)
            # Then d1's call comes back, sent, and its completer writes the outcome.
            completer = Completer(store, "d1", metrics, lambda: False)
            writing = asyncio.create_task(completer.run())
            now = datetime.now(UTC)
            with capture_logs() as lines:
                completer.put(
                    Completion(
                        id=first.id,
                        attempt=first.attempt,
                        status="sent",
                        outcome="sent",
                        started_at=now,
                        finished_at=now,
                        provider_message_id="wamid.late",
                    )
                )
                await asyncio.wait_for(completer.wait_idle(), 10)
            writing.cancel()
            return lines
        finally:
            await pool.close()

    lines = asyncio.run(scenario())
    row = sql_conn.execute(
        "SELECT status, locked_by, attempts, provider_message_id FROM outbox.messages"
    ).fetchone()
    assert row == ("in_flight", "d2", 2, None)  # d2's attempt still owns the row
    outcomes = sql_conn.execute(
        "SELECT attempt, dispatcher, outcome FROM outbox.attempts ORDER BY id"
    ).fetchall()
    assert outcomes == [(1, "d1", "lease_expired")]  # no `sent` for attempt 1
    events = sql_conn.execute("SELECT event, data->>'status' FROM outbox.events").fetchall()
    assert ("message_sent", "queued") not in events
    assert metrics.registry.get_sample_value("outbox_outcomes_lost_total") == 1
    dropped = [line for line in lines if line["event"] == "outcome dropped: lease lost"]
    assert [(line["message_id"], line["attempt"]) for line in dropped] == [(message_id, 1)]
