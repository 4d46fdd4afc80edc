"""Delivery through real `outbox dispatch` processes and a scripted local provider."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
from cryptography.fernet import Fernet

from tests.dispatch.conftest import (
    PROVIDER_SECRET,
    DispatcherProcess,
    Reply,
    ScriptedProvider,
    insert_messages,
    statuses,
    wait_all,
)
from tests.support import wait_for

Provider = tuple[ScriptedProvider, str]
Start = Callable[..., DispatcherProcess]


def attempts_of(conn: psycopg.Connection, task_id: str) -> list[tuple]:
    return conn.execute(
        """SELECT attempt, outcome, started_at, finished_at, error, dispatcher
           FROM outbox.attempts WHERE message_id = %s ORDER BY id""",
        [task_id],
    ).fetchall()


def message(conn: psycopg.Connection, task_id: str) -> dict:
    row = conn.execute(
        """SELECT status, attempts, last_error, provider_message_id, locked_by, finished_at
           FROM outbox.messages WHERE id = %s""",
        [task_id],
    ).fetchone()
    assert row is not None
    keys = ("status", "attempts", "last_error", "provider_message_id", "locked_by", "finished_at")
    return dict(zip(keys, row, strict=True))


def test_success_records_the_provider_id_and_signs_the_call(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    start_dispatcher()
    [task_id] = insert_messages(sql_conn, 1)
    wait_all(sql_conn, "sent", 1)
    row = message(sql_conn, task_id)
    assert row["provider_message_id"] == f"prov-{task_id}"
    assert row["attempts"] == 1 and row["locked_by"] is None and row["finished_at"] is not None
    [call] = scripted.calls_for(task_id)
    assert call.idempotency_key == task_id
    expected = hmac.new(PROVIDER_SECRET.encode(), call.body, hashlib.sha256).hexdigest()
    assert call.signature == f"sha256={expected}"
    # The timestamped scheme: t and the body signed together, t the time of the call.
    stamp, _, v1 = call.signature_256.partition(",")
    assert stamp.startswith("t=") and v1.startswith("v1="), call.signature_256
    signed = stamp[2:].encode() + b"." + call.body
    assert v1[3:] == hmac.new(PROVIDER_SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert abs(int(stamp[2:]) - call.at) < 30
    [(attempt, outcome, *_rest, dispatcher)] = attempts_of(sql_conn, task_id)
    assert (attempt, outcome, dispatcher) == (1, "sent", "d1")


def test_fails_twice_then_succeeds(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(status=503) if n < 2 else Reply(body={"id": "ok"})
    process = start_dispatcher()
    [task_id] = insert_messages(sql_conn, 1)
    wait_all(sql_conn, "sent", 1)
    assert [a[1] for a in attempts_of(sql_conn, task_id)] == ["transient", "transient", "sent"]
    assert message(sql_conn, task_id)["attempts"] == 3
    assert [c.attempt for c in scripted.calls_for(task_id)] == [1, 2, 3]
    # Each attempt's lines, in order (the start line is written on the loop's next turn,
    # after the call has begun, yet always before the attempt's outcome).
    wait_for(lambda: '"event":"sent"' in process.log(), what="the sent line")
    lines = [orjson.loads(line) for line in process.log().splitlines() if task_id in line]
    assert [(line["event"], line["attempt"]) for line in lines] == [
        ("attempt started", "1/4"),
        ("attempt failed, will retry", "1/4"),
        ("attempt started", "2/4"),
        ("attempt failed, will retry", "2/4"),
        ("attempt started", "3/4"),
        ("sent", "3/4"),
    ]


def test_always_transient_ends_in_error_after_four_attempts_with_backoff(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(status=500)
    process = start_dispatcher(retry_base_delay="200ms", retry_max_delay="500ms")
    [task_id] = insert_messages(sql_conn, 1)
    wait_all(sql_conn, "error", 1)
    history = attempts_of(sql_conn, task_id)
    assert [a[0] for a in history] == [1, 2, 3, 4]
    assert all(a[1] == "transient" for a in history)
    # Gaps follow min(cap, base·2^(n−1)) with no jitter: 0.2 s, 0.4 s, then capped at 0.5 s.
    gaps = [(b[2] - a[3]).total_seconds() for a, b in itertools.pairwise(history)]
    for gap, expected in zip(gaps, [0.2, 0.4, 0.5], strict=True):
        assert expected - 0.01 <= gap < expected + 0.6, gaps
    row = message(sql_conn, task_id)
    assert row["attempts"] == 4 and "500" in row["last_error"]
    assert len(scripted.calls_for(task_id)) == 4
    wait_for(lambda: "failed after 4 attempts" in process.log(), what="final failure log line")


def test_permanent_error_is_final_at_once(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    # The provider's reason spells the number its own way: logged, it is masked all the
    # same (start_dispatcher scans every line for phones, tokens and secrets).
    reason = "Message undeliverable to +55 11 99999-9999"
    scripted.script = lambda call, n: Reply(
        status=400, body={"error": {"code": 131026, "message": reason}}
    )
    process = start_dispatcher()
    [task_id] = insert_messages(sql_conn, 1)
    wait_all(sql_conn, "error", 1)
    assert [a[1] for a in attempts_of(sql_conn, task_id)] == ["permanent"]
    assert len(scripted.calls_for(task_id)) == 1
    wait_for(lambda: "+5511*****9999" in process.log(), what="the reason logged, masked")


def test_retry_after_is_honoured(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: (
        Reply(status=429, headers={"Retry-After": "1"}) if n == 0 else Reply(body={"id": "x"})
    )
    start_dispatcher(retry_base_delay="10ms")
    [task_id] = insert_messages(sql_conn, 1)
    wait_all(sql_conn, "sent", 1)
    first, second = scripted.calls_for(task_id)
    assert second.at - first.at >= 1.0


def test_an_absurd_retry_after_schedules_the_retry_a_day_later(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    """Retry-After: 10^12 s once made the outcome unrecordable (a datetime overflow),
    and with it every outcome recorded in the same turn: all are recorded now."""
    scripted, _ = provider
    absurd = Reply(status=429, headers={"Retry-After": "1000000000000"}, delay=0.2)
    ids = insert_messages(sql_conn, 4)
    scripted.script = lambda call, n: (
        absurd if call.task_id == ids[0] else Reply(body={"id": "x"}, delay=0.2)
    )
    start_dispatcher()
    wait_all(sql_conn, "sent", 3)
    wait_for(
        lambda: message(sql_conn, ids[0])["status"] == "pending",
        what="the throttled message back to pending",
    )
    row = sql_conn.execute(
        "SELECT extract(epoch FROM next_attempt_at - now()) FROM outbox.messages WHERE id = %s",
        [ids[0]],
    ).fetchone()
    assert row is not None and 86_400 - 60 < row[0] <= 86_400


def test_send_at_is_respected(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    start_dispatcher()
    send_at = datetime.now(UTC) + timedelta(seconds=1.5)
    [task_id] = insert_messages(sql_conn, 1, send_at=send_at.isoformat())
    wait_all(sql_conn, "sent", 1)
    [call] = scripted.calls_for(task_id)
    assert call.at >= send_at.timestamp()


def test_a_message_due_later_is_sent_when_due_not_at_the_next_poll(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    # The claim that finds nothing due says when the next row becomes due: the
    # dispatcher sets its timer from it (a 30 s poll would come far later).
    scripted, _ = provider
    start_dispatcher(poll_interval="30s")
    send_at = datetime.now(UTC) + timedelta(seconds=1.5)
    [task_id] = insert_messages(sql_conn, 1, send_at=send_at.isoformat())
    wait_all(sql_conn, "sent", 1, timeout=10)
    [call] = scripted.calls_for(task_id)
    assert send_at.timestamp() <= call.at < send_at.timestamp() + 5


def test_a_due_message_another_session_held_is_sent_soon_after_it_lets_go(
    sql_conn: psycopg.Connection, database_url: str, provider: Provider, start_dispatcher: Start
) -> None:
    # When the row falls due the claim skips it (another session holds it); that
    # session rolls back (no NOTIFY) and the dispatcher, which saw a due row it could
    # not take, looks again shortly instead of at its next 30 s poll.
    scripted, _ = provider
    start_dispatcher(poll_interval="30s")
    due = datetime.now(UTC) + timedelta(seconds=1)
    with psycopg.connect(database_url) as holder:
        [task_id] = insert_messages(holder, 1, send_at=due.isoformat())
        holder.commit()
        holder.execute("SELECT 1 FROM outbox.messages WHERE id = %s FOR UPDATE", [task_id])
        wait_for(
            lambda: datetime.now(UTC) > due + timedelta(seconds=1),
            what="the held row due for a second",
        )
        assert scripted.calls_for(task_id) == []
        holder.rollback()
        released = datetime.now(UTC).timestamp()
    wait_all(sql_conn, "sent", 1, timeout=10)
    [call] = scripted.calls_for(task_id)
    assert call.at - released < 5


def test_expired_message_is_not_attempted(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    [task_id] = insert_messages(sql_conn, 1, expires_at=past)
    start_dispatcher()
    wait_all(sql_conn, "error", 1)
    assert message(sql_conn, task_id)["last_error"] == "expired"
    assert scripted.calls_for(task_id) == []


def test_cancelled_message_is_never_sent(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    [cancelled] = insert_messages(sql_conn, 1)
    sql_conn.execute("UPDATE outbox.messages SET status = 'cancelled' WHERE id = %s", [cancelled])
    start_dispatcher()
    [marker] = insert_messages(sql_conn, 1)
    wait_for(lambda: message(sql_conn, marker)["status"] == "sent", what="marker sent")
    assert scripted.calls_for(cancelled) == []
    assert message(sql_conn, cancelled)["status"] == "cancelled"


# Stored senders need the key at start, though a fake one has no credentials.
SECRET_KEY = Fernet.generate_key().decode()


def add_fake_sender(conn: psycopg.Connection, sender_id: str) -> None:
    """A stored sender of the fake provider: it sends without calling the scripted one."""
    conn.execute(
        """INSERT INTO outbox.senders (id, provider, settings, users)
           VALUES (%s, 'fake', '{}', '{*}')""",
        [sender_id],
    )


def log_entries(process: DispatcherProcess, event: str) -> list[dict[str, Any]]:
    lines = [line for line in process.log().splitlines() if line.startswith("{")]
    return [entry for line in lines if (entry := orjson.loads(line))["event"] == event]


def default_paused(conn: psycopg.Connection) -> dict[str, Any] | None:
    row = conn.execute("SELECT paused FROM outbox.sender_state WHERE id = 'default'").fetchone()
    return None if row is None else row[0]


TOKEN_EXPIRED = Reply(status=401, body={"error": {"code": 190, "message": "token expired"}})


def test_sender_error_pauses_that_sender_only_and_spends_no_attempt(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: TOKEN_EXPIRED
    add_fake_sender(sql_conn, "other")
    process = start_dispatcher(sender_pause="30s", secret_key=SECRET_KEY)
    ids = insert_messages(sql_conn, 3)
    wait_for(lambda: default_paused(sql_conn) is not None, what="default paused in its state")
    wait_for(
        lambda: all(message(sql_conn, task_id)["status"] == "pending" for task_id in ids),
        what="every row pending again",
    )
    # Refunded: pending with no attempt spent; each call made is recorded `sender`.
    assert [message(sql_conn, task_id)["attempts"] for task_id in ids] == [0, 0, 0]
    outcomes = sql_conn.execute("SELECT DISTINCT outcome FROM outbox.attempts").fetchall()
    assert outcomes == [("sender",)]
    paused = default_paused(sql_conn)
    assert paused is not None
    assert (paused["code"], paused["manual"]) == ("190", False)
    assert "token expired" in paused["reason"]
    [event] = sql_conn.execute(
        "SELECT data FROM outbox.events WHERE event = 'sender_paused' AND sender = 'default'"
    ).fetchall()
    assert (event[0]["code"], event[0]["manual"]) == ("190", False)
    # One error line for the pause; calls that were out meanwhile say it quietly (a line
    # each, written to the log a moment later: the log is flushed in batches).
    called = len(scripted.calls)
    lines = wait_for(
        lambda: (
            len(found := log_entries(process, "sender cannot send: pausing it")) == called and found
        ),
        what="a log line per sender-level call",
    )
    assert [line["level"] for line in lines].count("error") == 1, lines
    assert 1 <= called <= 3

    # Paused: its new messages wait uncalled, while another sender's go on.
    [late] = insert_messages(sql_conn, 1)
    others = insert_messages(sql_conn, 2, sender="other")
    wait_for(
        lambda: all(message(sql_conn, task_id)["status"] == "sent" for task_id in others),
        what="the other sender's messages sent",
    )
    assert message(sql_conn, late)["status"] == "pending"
    assert scripted.calls_for(late) == []
    assert len(scripted.calls) == called


def test_sender_error_starts_no_buffered_message_of_its_sender(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    """A slot frees as its call ends: the sender must already be held by then, or its
    prefetched rows would each be called in turn and hit the same error; another
    sender's rows in the buffer still go."""
    scripted, _ = provider
    scripted.script = lambda call, n: TOKEN_EXPIRED
    add_fake_sender(sql_conn, "other")
    ids = insert_messages(sql_conn, 4)
    others = insert_messages(sql_conn, 2, sender="other")
    process = start_dispatcher(
        sender_pause="30s", dispatch_concurrency="1", dispatch_prefetch="5", secret_key=SECRET_KEY
    )
    wait_for(lambda: log_entries(process, "sender cannot send: pausing it"), what="pause log line")
    wait_for(
        lambda: all(message(sql_conn, task_id)["status"] == "pending" for task_id in ids),
        what="every row handed back",
    )
    wait_for(
        lambda: all(message(sql_conn, task_id)["status"] == "sent" for task_id in others),
        what="the other sender's messages sent",
    )
    assert len(scripted.calls) == 1
    assert [message(sql_conn, task_id)["attempts"] for task_id in ids] == [0, 0, 0, 0]


def test_two_dispatchers_deliver_each_message_exactly_once(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    # The provider here is a Python server sharing 2 cores with everything else: a
    # generous timeout keeps slow answers from turning into retries (and duplicates).
    patient = {"provider_timeout": "20s", "lease_seconds": "60s", "dispatch_concurrency": "16"}
    start_dispatcher(**patient)
    start_dispatcher(**patient)
    ids = insert_messages(sql_conn, 5000)  # both are listening: both get to claim
    wait_all(sql_conn, "sent", 5000, timeout=90)
    keys = scripted.keys()
    assert len(keys) == 5000 and set(keys) == set(ids)
    by_dispatcher = dict(
        sql_conn.execute("SELECT dispatcher, count(*) FROM outbox.attempts GROUP BY 1").fetchall()
    )
    assert sum(by_dispatcher.values()) == 5000 and set(by_dispatcher) == {"d1", "d2"}


def test_kill_9_mid_batch_loses_nothing(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(body={"id": "x"}, delay=0.05)
    ids = insert_messages(sql_conn, 400)
    # Few slots and a generous timeout: no attempt may time out on this busy
    # 2-core machine, so that every duplicate comes from the kill.
    slow = {"lease_seconds": "3s", "provider_timeout": "2s", "dispatch_concurrency": "8"}
    first = start_dispatcher(**slow)
    wait_for(lambda: len(scripted.calls) >= 50, what="some calls")
    first.signal(signal.SIGKILL)
    first.wait()
    in_flight = {
        str(row[0])
        for row in sql_conn.execute(
            "SELECT id FROM outbox.messages WHERE status = 'in_flight'"
        ).fetchall()
    }
    assert in_flight, "the kill should leave rows in flight"
    start_dispatcher(**slow)
    wait_all(sql_conn, "sent", 400, timeout=60)
    keys = scripted.keys()
    assert set(keys) == set(ids)
    # Rows the killed dispatcher held: those seen in flight just after the kill, plus
    # any claim that was still committing then. Only they may have gone out twice.
    held_at_kill = {
        str(row[0])
        for row in sql_conn.execute(
            "SELECT message_id FROM outbox.attempts WHERE outcome = 'lease_expired'"
        ).fetchall()
    }
    assert in_flight <= held_at_kill
    duplicates = {key for key in keys if keys.count(key) > 1}
    assert duplicates <= held_at_kill


def test_database_connections_killed_mid_run_lose_nothing(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start, database_url: str
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(body={"id": "x"}, delay=0.01)
    ids = insert_messages(sql_conn, 2000)
    start_dispatcher()
    wait_for(lambda: len(scripted.calls) >= 200, what="some calls")
    dbname = sql_conn.info.dbname
    for _ in range(3):
        sql_conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [dbname],
        )
    wait_all(sql_conn, "sent", 2000, timeout=90)
    assert set(scripted.keys()) == set(ids)


def test_sigterm_drains_and_exits_zero(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(body={"id": "x"}, delay=0.3)
    insert_messages(sql_conn, 100)
    process = start_dispatcher()
    wait_for(lambda: len(scripted.calls) >= 10, what="calls in flight")
    process.signal(signal.SIGTERM)
    assert process.wait() == 0, process.log()
    counts = statuses(sql_conn)
    assert counts.get("in_flight", 0) == 0, counts
    sent = counts.get("sent", 0)
    assert sent == len(scripted.calls) and sent + counts.get("pending", 0) == 100


def test_calls_in_flight_never_exceed_the_concurrency(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(body={"id": "x"}, delay=0.05)
    insert_messages(sql_conn, 120)
    start_dispatcher(dispatch_concurrency="5", dispatch_prefetch="5")
    wait_all(sql_conn, "sent", 120)
    assert scripted.max_in_flight == 5
    # Prefetched rows were claimed ahead (leased) but called only as slots freed.
    assert len(scripted.calls) == 120


def test_a_provider_error_postgres_cannot_store_loses_nothing(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    [poison] = insert_messages(sql_conn, 1)

    def script(call: object, n: int) -> Reply:
        if getattr(call, "task_id", None) == poison:
            return Reply(status=400, body={"error": {"code": "bad", "message": "bad\u0000number"}})
        return Reply(body={"id": "ok"})

    scripted.script = script  # type: ignore[assignment]
    process = start_dispatcher()
    others = insert_messages(sql_conn, 5)
    wait_all(sql_conn, "sent", 5)
    wait_all(sql_conn, "error", 1)
    assert "bad" in message(sql_conn, poison)["last_error"]
    assert len(scripted.calls_for(poison)) == 1
    assert all(len(scripted.calls_for(task_id)) == 1 for task_id in others)
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
