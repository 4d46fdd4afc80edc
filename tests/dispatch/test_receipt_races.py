"""Receipts that race the dispatcher, in SQL: `outbox.record_receipts` (a webhook POST) and
`outbox.complete_attempts` (a completer's batch) run directly on the test's database, as
serve and a dispatcher run them. A receipt recorded while the call is in flight proves the
provider accepted the message: its completion makes it `sent` whatever the call's outcome
(unknown, or a failure), with `message_sent` queued then `message_status`; a receipt for
a cancelled message makes it sent; a duplicate announces nothing; and a completion and a
POST of the same messages, locking them in opposite orders as given, never deadlock."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from psycopg.rows import dict_row

from outbox.states import AttemptOutcome, MessageStatus
from outbox.store import QUERIES
from outbox.store.queue import Completion
from tests.dispatch.conftest import CLAIM_PARAMS, insert_messages

DISPATCHER = "d1"


def claim_all(conn: psycopg.Connection, ids: list[str]) -> list[dict[str, Any]]:
    """d1 claims the messages (the claim statement, as the dispatcher runs it): each is
    in flight, attempt 1."""
    params = {**CLAIM_PARAMS, "dispatcher": DISPATCHER, "limit": len(ids)}
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(QUERIES["claim_messages"], params).fetchall()
    claimed = [row for row in rows if row["id"] is not None]
    assert sorted(str(row["id"]) for row in claimed) == sorted(ids)
    assert all(row["attempt"] == 1 for row in claimed)
    return claimed


def in_flight(conn: psycopg.Connection, count: int) -> list[str]:
    """`count` new messages, claimed by d1."""
    ids = insert_messages(conn, count)
    claim_all(conn, ids)
    return ids


def completion(
    message_id: str,
    status: MessageStatus,
    outcome: AttemptOutcome,
    *,
    error: str | None = None,
    provider_message_id: str | None = None,
    retry_in: float | None = None,
) -> Completion:
    now = datetime.now(UTC)
    return Completion(
        id=uuid.UUID(message_id),
        attempt=1,
        status=status,
        outcome=outcome,
        started_at=now - timedelta(seconds=1.5),
        finished_at=now,
        latency_ms=1500.0,
        error=error,
        provider_message_id=provider_message_id,
        next_attempt_at=None if retry_in is None else now + timedelta(seconds=retry_in),
    )


def unknown(message_id: str) -> Completion:
    """No answer after the request was written, retried (OUTBOX_UNKNOWN_OUTCOME=retry)."""
    return completion(
        message_id,
        MessageStatus.PENDING,
        AttemptOutcome.UNKNOWN,
        error="cloud: no answer within 1.5s",
        retry_in=60,
    )


def transient_final(message_id: str) -> Completion:
    """A failure on the last attempt, as the completer writes it: error."""
    return completion(message_id, MessageStatus.ERROR, AttemptOutcome.TRANSIENT, error="http 503")


def complete(conn: psycopg.Connection, completions: list[Completion]) -> set[str]:
    """The completer's statement: the ids it applied."""
    params = {"dispatcher": DISPATCHER, "outcomes": orjson.dumps(completions).decode()}
    return {str(row[0]) for row in conn.execute(QUERIES["complete_attempts"], params)}


def receipts(*items: tuple[str, str]) -> str:
    """A webhook POST's receipts, as serve passes them: (task id, status) each, matched by
    the task id (Meta's biz_opaque_callback_data), with the wamid Meta gives it."""
    return orjson.dumps(
        [
            {
                "n": n,
                "task_id": task_id,
                "id": f"wamid.{task_id}",
                "status": state,
                "at": time.time(),
                "error": None,
            }
            for n, (task_id, state) in enumerate(items)
        ]
    ).decode()


def record(conn: psycopg.Connection, *items: tuple[str, str]) -> list[tuple[int, str | None]]:
    params = {"receipts": receipts(*items), "senders": None}
    rows = conn.execute(QUERIES["record_receipts"], params).fetchall()
    return [(n, None if message_id is None else str(message_id)) for n, message_id in rows]


def events(conn: psycopg.Connection, message_id: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT event, data ->> 'status' FROM outbox.events WHERE message_id = %s ORDER BY id",
        [message_id],
    ).fetchall()
    return [(event, state) for event, state in rows]


def message(conn: psycopg.Connection, message_id: str) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            """SELECT status, attempts, last_error, locked_by, finished_at IS NOT NULL AS finished,
                      delivery_state, provider_message_id
               FROM outbox.messages WHERE id = %s""",
            [message_id],
        ).fetchone()
    assert row is not None
    return row


def attempts(conn: psycopg.Connection, message_id: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT attempt, outcome, error FROM outbox.attempts WHERE message_id = %s ORDER BY id",
        [message_id],
    ).fetchall()


# (a) A completion and a POST of the same messages, together ---------------------------


def race(database_url: str, ids: list[str]) -> list[str]:
    """complete_attempts with the outcomes in descending id order (the order calls end in
    is any) and record_receipts with `delivered` for the same ids in ascending order, from
    two connections started together; the errors they raised."""
    outcomes = [
        completion(i, MessageStatus.SENT, AttemptOutcome.SENT, provider_message_id=f"wamid.{i}")
        for i in sorted(ids, reverse=True)
    ]
    statements = [
        (
            QUERIES["complete_attempts"],
            {"dispatcher": DISPATCHER, "outcomes": orjson.dumps(outcomes).decode()},
        ),
        (
            QUERIES["record_receipts"],
            {"receipts": receipts(*((i, "delivered") for i in sorted(ids))), "senders": None},
        ),
    ]
    barrier = threading.Barrier(len(statements), timeout=30)
    errors: list[str] = []

    def run(query: str, params: dict[str, Any]) -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                barrier.wait()
                conn.execute(query, params).fetchall()
        except Exception as exc:  # DeadlockDetected above all: reported by the test
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    threads = [threading.Thread(target=run, args=statement) for statement in statements]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a statement still waits"
    return errors


def test_a_completion_and_a_webhook_of_the_same_messages_in_opposite_orders_never_deadlock(
    database_url: str, sql_conn: psycopg.Connection
) -> None:
    for run in range(5):
        ids = in_flight(sql_conn, 300)
        errors = race(database_url, ids)
        assert errors == [], f"run {run + 1} of 5: {errors}"
        rows = sql_conn.execute(
            """SELECT status, delivery_state, count(*) FROM outbox.messages
               WHERE id = ANY(%s::uuid[]) GROUP BY 1, 2""",
            [ids],
        ).fetchall()
        assert rows == [("sent", 2, 300)], f"run {run + 1}: {rows}"
        # Whichever came first, each message's news once each, queued first.
        told = sql_conn.execute(
            """SELECT message_id::text, array_agg(event || ' ' || (data ->> 'status') ORDER BY id)
               FROM outbox.events WHERE message_id = ANY(%s::uuid[]) GROUP BY 1""",
            [ids],
        ).fetchall()
        assert len(told) == 300, f"run {run + 1}: {len(told)} messages with events"
        wrong = {
            message_id: sequence
            for message_id, sequence in told
            if sequence != ["message_sent queued", "message_status delivered"]
        }
        assert wrong == {}, f"run {run + 1}: {list(wrong.items())[:3]}"


# (b) A receipt for a cancelled message -------------------------------------------------


def test_a_receipt_for_a_cancelled_message_makes_it_sent(sql_conn: psycopg.Connection) -> None:
    # Its call's outcome was unknown: retried later; the client cancels it meanwhile.
    [task] = in_flight(sql_conn, 1)
    assert complete(sql_conn, [unknown(task)]) == {task}
    assert message(sql_conn, task)["status"] == "pending"
    cancelled = sql_conn.execute(
        QUERIES["cancel_message"], {"id": task, "user_id": "user-1"}
    ).fetchall()
    assert [str(row[0]) for row in cancelled] == [task]

    # The provider had it all along: Meta reports it delivered.
    assert record(sql_conn, (task, "delivered")) == [(0, task)]
    assert message(sql_conn, task) == {
        "status": "sent",
        "attempts": 1,
        "last_error": None,
        "locked_by": None,
        "finished": True,
        "delivery_state": 2,
        "provider_message_id": f"wamid.{task}",
    }
    assert events(sql_conn, task) == [
        ("message_retrying", "retrying"),
        ("message_cancelled", "cancelled"),
        ("message_sent", "queued"),
        ("message_status", "delivered"),
    ]
    # Not claimed again.
    params = {**CLAIM_PARAMS, "dispatcher": "d2", "limit": 10}
    assert [r for r in sql_conn.execute(QUERIES["claim_messages"], params) if r[0]] == []


# (c) A receipt while the call is in flight, then the call's outcome ---------------------


@pytest.mark.parametrize(
    "ending",
    [unknown, transient_final],
    ids=["pending-unknown", "error-transient"],
)
def test_a_receipt_during_the_call_makes_its_completion_sent_whatever_the_outcome(
    sql_conn: psycopg.Connection, ending: Any
) -> None:
    [task, other] = in_flight(sql_conn, 2)
    # Meta's `sent`, then `delivered`, reach serve before the call's outcome.
    assert record(sql_conn, (task, "sent")) == [(0, task)]
    assert record(sql_conn, (task, "delivered")) == [(0, task)]
    shown = message(sql_conn, task)
    assert (shown["status"], shown["delivery_state"]) == ("in_flight", 2)
    assert events(sql_conn, task) == []  # nothing before its message_sent

    done: Completion = ending(task)
    assert complete(sql_conn, [done, ending(other)]) == {task, other}
    assert message(sql_conn, task) == {
        "status": "sent",
        "attempts": 1,
        "last_error": None,
        "locked_by": None,
        "finished": True,
        "delivery_state": 2,
        "provider_message_id": f"wamid.{task}",
    }
    # The attempt's row keeps what the dispatcher knew of the call.
    assert attempts(sql_conn, task) == [(1, done.outcome.value, done.error)]
    assert events(sql_conn, task) == [("message_sent", "queued"), ("message_status", "delivered")]
    [sent, delivered] = sql_conn.execute(
        "SELECT data FROM outbox.events WHERE message_id = %s ORDER BY id", [task]
    ).fetchall()
    assert sent[0]["error"] is None and sent[0]["provider_message_id"] == f"wamid.{task}"
    assert delivered[0]["error"] is None and delivered[0]["sender"] == "default"

    # The same batch's other message, without a receipt, takes its outcome as it was.
    expected = "pending" if done.status is MessageStatus.PENDING else "error"
    assert message(sql_conn, other)["status"] == expected
    assert message(sql_conn, other)["last_error"] == done.error
    assert events(sql_conn, other) == [
        ("message_retrying", "retrying") if expected == "pending" else ("message_sent", "failed")
    ]


@pytest.mark.parametrize(
    "ending",
    [unknown, transient_final],
    ids=["pending-unknown", "error-transient"],
)
def test_meta_sent_status_alone_during_the_call_also_makes_it_sent(
    sql_conn: psycopg.Connection, ending: Any
) -> None:
    [task] = in_flight(sql_conn, 1)
    assert record(sql_conn, (task, "sent")) == [(0, task)]  # provider_sent_at only
    assert complete(sql_conn, [ending(task)]) == {task}
    shown = message(sql_conn, task)
    assert (shown["status"], shown["last_error"], shown["delivery_state"]) == ("sent", None, None)
    assert events(sql_conn, task) == [("message_sent", "queued")]  # no delivery to tell yet
    assert record(sql_conn, (task, "delivered")) == [(0, task)]
    assert events(sql_conn, task) == [("message_sent", "queued"), ("message_status", "delivered")]


# (d) A duplicate receipt afterwards ----------------------------------------------------


@pytest.mark.parametrize(
    "ending",
    [unknown, transient_final],
    ids=["pending-unknown", "error-transient"],
)
def test_a_duplicate_receipt_after_such_a_completion_announces_nothing(
    sql_conn: psycopg.Connection, ending: Any
) -> None:
    [task] = in_flight(sql_conn, 1)
    record(sql_conn, (task, "sent"), (task, "delivered"))
    complete(sql_conn, [ending(task)])
    before = message(sql_conn, task)
    told = events(sql_conn, task)
    assert told == [("message_sent", "queued"), ("message_status", "delivered")]

    # Meta sends the same `delivered` again (a retried webhook), and its `sent` too.
    assert record(sql_conn, (task, "delivered")) == [(0, task)]
    assert record(sql_conn, (task, "sent"), (task, "delivered")) == [(0, task), (1, task)]
    assert events(sql_conn, task) == told
    assert message(sql_conn, task) == before
    # A newer state is still news.
    assert record(sql_conn, (task, "read")) == [(0, task)]
    assert events(sql_conn, task) == [*told, ("message_status", "read")]
