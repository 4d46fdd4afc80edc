"""The dispatcher's own /metrics, scraped over HTTP after a real run."""

from __future__ import annotations

import signal
from collections.abc import Callable

import psycopg

from tests.dispatch.conftest import (
    DispatcherProcess,
    Reply,
    ScriptedProvider,
    insert_messages,
    statuses,
    wait_all,
)
from tests.e2e.conftest import free_port
from tests.scrape import Samples, listening_ports, scrape, total, value
from tests.support import wait_for

Provider = tuple[ScriptedProvider, str]
Start = Callable[..., DispatcherProcess]


def _attempts_by_outcome(conn: psycopg.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT outcome, count(*) FROM outbox.attempts GROUP BY 1").fetchall()
    return {outcome: count for outcome, count in rows}


def test_the_figures_match_what_happened(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    insert_messages(sql_conn, 3)  # sent at once
    flaky = insert_messages(sql_conn, 1)  # 503 twice, then sent
    refused = insert_messages(sql_conn, 1)  # 400: permanent at once
    hopeless = insert_messages(sql_conn, 1, max_attempts=2)  # 503 until its attempts run out
    # A row whose dispatcher vanished mid-call: the reaper returns it, then it is sent.
    [orphan] = insert_messages(sql_conn, 1)
    sql_conn.execute(
        """UPDATE outbox.messages SET status = 'in_flight', attempts = 1, locked_by = 'gone',
                  locked_until = now() - interval '1 second' WHERE id = %s""",
        [orphan],
    )

    def script(call: object, n: int) -> Reply:
        task_id = call.task_id  # type: ignore[attr-defined]
        if task_id in refused:
            return Reply(status=400, body={"error": "bad number"})
        if task_id in hopeless or (task_id in flaky and n < 2):
            return Reply(status=503)
        return Reply(body={"id": f"prov-{task_id}"})

    scripted.script = script
    port = free_port()
    dispatcher = start_dispatcher(metrics_port=str(port), metrics_cache="1s")
    assert port in listening_ports(dispatcher.proc.pid)
    wait_all(sql_conn, "sent", 5)
    wait_all(sql_conn, "error", 2)
    url = f"http://127.0.0.1:{port}/metrics"

    # Attempts by outcome and error class, as the attempts table has them.
    db_outcomes = _attempts_by_outcome(sql_conn)
    assert db_outcomes == {"sent": 5, "transient": 4, "permanent": 1, "lease_expired": 1}

    def attempts_written() -> bool:
        return total(scrape(url), "outbox_attempts_total") == 10

    wait_for(attempts_written, what="every outcome written and counted")
    samples = scrape(url)
    attempts = {
        (dict(labels)["outcome"], dict(labels)["error_class"]): count
        for (name, labels), count in samples.items()
        if name == "outbox_attempts_total" and count
    }
    assert attempts == {
        ("sent", "none"): 5,
        ("retry", "transient"): 3,  # flaky twice, hopeless once
        ("failed", "transient"): 1,  # hopeless, attempts spent
        ("failed", "permanent"): 1,
    }
    calls = len(scripted.calls)
    assert calls == 10
    assert value(samples, "outbox_provider_request_duration_seconds_count") == calls
    assert value(samples, "outbox_provider_request_duration_seconds_bucket", le="+Inf") == calls
    assert value(samples, "outbox_provider_calls_in_flight") == 0
    # Every claimed row was attempted: the claims add up to the calls.
    assert value(samples, "outbox_claim_batch_messages_sum") == calls
    assert value(samples, "outbox_claim_batch_messages_count") >= 1
    assert value(samples, "outbox_lease_expiries_recovered_total") == 1
    assert value(samples, "outbox_outcomes_lost_total") == 0

    # Queue gauges equal the database's counts (estimates once the table is analysed).
    sql_conn.execute("ANALYZE outbox.messages")
    insert_messages(sql_conn, 2, send_at="2999-01-01T00:00:00Z")  # pending, not due

    def gauges_refreshed() -> Samples | None:
        got = scrape(url)
        return got if value(got, "outbox_queue_messages", status="pending") == 2 else None

    samples = wait_for(gauges_refreshed, what="queue gauges read again after the cache")
    counts = statuses(sql_conn)
    assert counts == {"sent": 5, "error": 2, "pending": 2}
    for status in ("pending", "in_flight", "sent", "error", "cancelled"):
        assert value(samples, "outbox_queue_messages", status=status) == counts.get(status, 0)
    assert value(samples, "outbox_queue_due_messages") == 0
    assert value(samples, "outbox_queue_oldest_due_age_seconds") == 0
    assert value(samples, "outbox_queue_lease_expired_messages") == 0

    dispatcher.signal(signal.SIGTERM)
    assert dispatcher.wait() == 0
    assert '"metrics port unavailable' not in dispatcher.log()


def test_queue_and_sender_gauges_are_cached_between_scrapes(
    sql_conn: psycopg.Connection, start_dispatcher: Start
) -> None:
    port = free_port()
    start_dispatcher(metrics_port=str(port), metrics_cache="1h")
    url = f"http://127.0.0.1:{port}/metrics"
    first = scrape(url)
    assert value(first, "outbox_queue_messages", status="pending") == 0
    assert value(first, "outbox_sender_paused", sender="default") == 0
    insert_messages(sql_conn, 3, send_at="2999-01-01T00:00:00Z")
    assert statuses(sql_conn) == {"pending": 3}
    sql_conn.execute("SELECT outbox.pause_sender('default', 'maintenance', NULL, NULL, true)")
    # Within the cache period a scrape costs no query: the figures are those read before.
    again = scrape(url)
    assert value(again, "outbox_queue_messages", status="pending") == 0
    assert value(again, "outbox_sender_paused", sender="default") == 0


def test_due_messages_and_their_age(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    # The provider answers slowly: with one slot, the second message waits, due.
    scripted.script = lambda call, n: Reply(body={"id": "x"}, delay=3.0)
    port = free_port()
    start_dispatcher(
        metrics_port=str(port), metrics_cache="0", dispatch_concurrency="1", dispatch_prefetch="0"
    )
    insert_messages(sql_conn, 2)
    url = f"http://127.0.0.1:{port}/metrics"

    def one_waiting() -> Samples | None:
        got = scrape(url)
        waiting = value(got, "outbox_queue_due_messages") == 1
        return got if waiting and value(got, "outbox_provider_calls_in_flight") == 1 else None

    samples = wait_for(one_waiting, what="one call in flight, one message due")
    assert value(samples, "outbox_queue_messages", status="in_flight") == 1
    assert value(samples, "outbox_queue_messages", status="pending") == 1
    assert 0 < value(samples, "outbox_queue_oldest_due_age_seconds") < 30


def test_port_0_opens_no_port(sql_conn: psycopg.Connection, start_dispatcher: Start) -> None:
    dispatcher = start_dispatcher(metrics_port="0")
    insert_messages(sql_conn, 1)
    wait_all(sql_conn, "sent", 1)
    assert listening_ports(dispatcher.proc.pid) == set()
    assert '"metrics listening"' not in dispatcher.log()


def test_a_second_dispatcher_on_the_same_port_warns_and_still_delivers(
    sql_conn: psycopg.Connection, start_dispatcher: Start
) -> None:
    port = free_port()
    first = start_dispatcher(metrics_port=str(port))
    second = start_dispatcher(metrics_port=str(port))
    assert listening_ports(first.proc.pid) == {port}
    assert listening_ports(second.proc.pid) == set()
    warnings = [line for line in second.log().splitlines() if "metrics port unavailable" in line]
    assert len(warnings) == 1 and '"warning"' in warnings[0], second.log()
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    insert_messages(sql_conn, 3)
    wait_all(sql_conn, "sent", 3)
    dispatchers = sql_conn.execute("SELECT DISTINCT dispatcher FROM outbox.attempts").fetchall()
    assert dispatchers == [("d2",)]


def test_scheduled_purge_runs_and_rows_are_counted(
    sql_conn: psycopg.Connection, start_dispatcher: Start
) -> None:
    # Two errored messages long past the retention, and a purge tick that is due now: the
    # last recorded run is older than the latest tick of the default schedule (daily 03:00).
    old = insert_messages(sql_conn, 2)
    sql_conn.execute(
        """UPDATE outbox.messages SET status = 'error', finished_at = now() - interval '30 days'
           WHERE id = ANY(%s::uuid[])""",
        [old],
    )
    sql_conn.execute(
        """INSERT INTO outbox.job_runs (job, tick, finished_at, rows)
           VALUES ('purge', now() - interval '2 days', now() - interval '2 days', 0)"""
    )
    port = free_port()
    start_dispatcher(metrics_port=str(port))
    url = f"http://127.0.0.1:{port}/metrics"

    def purged() -> Samples | None:
        got = scrape(url)
        return got if value(got, "outbox_purge_runs_total") >= 1 else None

    samples = wait_for(purged, what="the scheduled purge to run")
    assert statuses(sql_conn) == {}
    assert value(samples, "outbox_purge_runs_total") == 1
    assert value(samples, "outbox_purge_rows_total", kind="errored") == 2
    assert value(samples, "outbox_purge_rows_total", kind="sent") == 0


def test_throttles_are_counted_by_kind_and_the_sender_gauges_follow(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    [rate] = insert_messages(sql_conn, 1)  # 429 once (the sender's rate), then sent
    [pair] = insert_messages(sql_conn, 1)  # 131056 once (that recipient), then sent
    [hopeless] = insert_messages(sql_conn, 1)  # 429 always: ends `error` "throttled"

    def script(call: object, n: int) -> Reply:
        task_id = call.task_id  # type: ignore[attr-defined]
        if task_id == hopeless or (task_id == rate and n == 0):
            return Reply(status=429, headers={"Retry-After": "0"})
        if task_id == pair and n == 0:
            return Reply(status=429, body={"error": {"code": 131056, "message": "pair"}})
        return Reply(body={"id": f"prov-{task_id}"})

    scripted.script = script
    port = free_port()
    start_dispatcher(metrics_port=str(port), metrics_cache="0", max_throttles="1", pair_delay="0")
    url = f"http://127.0.0.1:{port}/metrics"
    wait_all(sql_conn, "sent", 2)
    wait_all(sql_conn, "error", 1)
    assert _attempts_by_outcome(sql_conn) == {"sent": 2, "throttled": 4}

    def counted() -> Samples | None:
        got = scrape(url)
        return got if total(got, "outbox_attempts_total") == 6 else None

    samples = wait_for(counted, what="every outcome counted")
    attempts = {
        (dict(labels)["outcome"], dict(labels)["error_class"]): count
        for (name, labels), count in samples.items()
        if name == "outbox_attempts_total" and count
    }
    assert attempts == {
        ("sent", "none"): 2,
        ("throttled", "rate"): 2,  # rate's first call, hopeless's first
        ("throttled", "pair"): 1,
        ("failed", "throttled"): 1,  # hopeless, throttled once too often
    }
    # Every series exists from the start (0 until it happens), the new ones included.
    for labels in (("throttled", "rate"), ("throttled", "pair"), ("failed", "throttled")):
        outcome, error_class = labels
        assert (
            "outbox_attempts_total",
            frozenset({("outcome", outcome), ("error_class", error_class), ("sender", "default")}),
        ) in samples

    # The unlimited default was throttled: it learned a limit, which its gauge shows.
    assert value(samples, "outbox_sender_effective_rate", sender="default") >= 1
    assert value(samples, "outbox_sender_paused", sender="default") == 0
    [(learned,)] = sql_conn.execute(
        "SELECT learned_limit FROM outbox.sender_state WHERE id = 'default'"
    ).fetchall()
    assert learned is not None and learned >= 1
