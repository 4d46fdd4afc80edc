"""Admin routes: GET /api/v1/admin/summary and POST /api/v1/whatsapp/messages/{id}/retry."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from outbox.models import AdminSummary
from outbox.store import QUERIES

SEND = "/api/v1/whatsapp/send/"
MESSAGES = "/api/v1/whatsapp/messages"
SUMMARY = "/api/v1/admin/summary"
Auth = Callable[..., dict[str, str]]
UNKNOWN_ID = "0190a000-0000-7000-8000-000000000000"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def send(client: httpx.Client, headers: dict[str, str], **extra: Any) -> str:
    body = {"to": "5511999999999", "type": "text", "text": "hi", **extra}
    response = client.post(SEND, json=body, headers=headers)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def put_message(
    conn: psycopg.Connection,
    status: str,
    *,
    attempts: int = 0,
    max_attempts: int = 4,
    user_id: str = "user-1",
    last_error: str | None = None,
    finished: str | None = "now()",
    locked_until: str | None = None,
    expires_at: str | None = None,
    latencies: tuple[float, ...] = (),
    outcome: str = "transient",
) -> str:
    """A message in `status` with `attempts` recorded attempts (the last one `outcome`)."""
    task_id = str(uuid.uuid4())
    conn.execute(
        f"""INSERT INTO outbox.messages
               (id, user_id, "to", type, payload, request_hash, status, attempts, max_attempts,
                last_error, finished_at, locked_by, locked_until, expires_at)
           VALUES (%s, %s, '5511988887777', 'text', '{{"body": "hi"}}', '\\x00', %s, %s, %s,
                   %s, {finished or "NULL"}, %s, {locked_until or "NULL"}, %s)""",
        [
            task_id,
            user_id,
            status,
            attempts,
            max_attempts,
            last_error,
            "d1" if locked_until else None,
            expires_at,
        ],
    )
    for n in range(1, attempts + 1):
        conn.execute(
            """INSERT INTO outbox.attempts
                   (message_id, attempt, dispatcher, started_at, finished_at, outcome, error,
                    latency_ms)
               VALUES (%s, %s, 'd1', now(), now(), %s, %s, %s)""",
            [
                task_id,
                n,
                outcome if n == attempts else "transient",
                last_error,
                latencies[n - 1] if n <= len(latencies) else None,
            ],
        )
    return task_id


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    error: dict[str, Any] = body["error"]
    return error


# Summary -----------------------------------------------------------------------------


def test_summary_needs_a_token_and_an_admin_one(client: httpx.Client, auth: Auth) -> None:
    missing = client.get(SUMMARY)
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert_error(client.get(SUMMARY, headers={"Authorization": "Bearer nope"}), 401, "unauthorized")
    forbidden = assert_error(client.get(SUMMARY, headers=auth("user-1")), 403, "forbidden")
    assert "admin" in forbidden["message"]
    assert client.get(SUMMARY, headers=auth("root", admin=True)).status_code == 200


def test_summary_figures_are_what_the_database_holds(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    pending = [send(client, auth("user-1")) for _ in range(3)]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    later = send(client, auth("user-2"), send_at=tomorrow)
    for _ in range(2):
        put_message(sql_conn, "sent", attempts=1, latencies=(100.0,), outcome="sent")
    failed = put_message(
        sql_conn,
        "error",
        attempts=2,
        max_attempts=2,
        user_id="user-9",
        last_error="http 400: invalid recipient",
        latencies=(200.0, 300.0),
        outcome="permanent",
    )
    put_message(sql_conn, "cancelled")
    put_message(
        sql_conn, "in_flight", attempts=1, finished=None, locked_until="now() - interval '1 min'"
    )

    response = client.get(SUMMARY, headers=auth("root", admin=True))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store"
    summary = AdminSummary.model_validate(response.json())  # the documented shape, no extras
    assert ISO_Z.match(summary.generated_at)
    counts = {status: row.count for status, row in summary.counts.items()}
    assert counts == {"pending": 4, "in_flight": 1, "sent": 2, "error": 1, "cancelled": 1}
    assert not any(row.capped for row in summary.counts.values())
    assert summary.counts["pending"].due_now == 3  # the one for tomorrow is not due
    assert summary.counts["in_flight"].due_now == 1  # its lease expired
    assert summary.counts["error"].oldest is not None

    assert len(summary.throughput) == 60
    minutes = [row.minute for row in summary.throughput]
    assert minutes == sorted(minutes)
    assert sum(row.sent for row in summary.throughput) == 2
    assert sum(row.failed for row in summary.throughput) == 1

    assert sum(row.calls for row in summary.provider_latency) == 4  # 100, 100, 200, 300 ms
    if len(summary.provider_latency) == 1:  # all four in one minute (nearly always)
        [latency] = summary.provider_latency
        assert (latency.p50_ms, latency.max_ms) == (150.0, 300.0)

    [failure] = summary.recent_failures
    assert failure.task_id == failed and failure.user_id == "user-9"
    assert failure.last_error == "http 400: invalid recipient"
    assert (failure.last_outcome, failure.attempts, failure.max_attempts) == ("permanent", 2, 2)

    waiting = [row.task_id for row in summary.waiting]
    assert waiting[:3] == pending and waiting[3] == later  # next due first


def test_summary_counts_stop_at_their_caps(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    for _ in range(5):
        send(client, auth())
    for _ in range(3):
        put_message(sql_conn, "sent", finished="now() - interval '1 hour'")
    put_message(sql_conn, "cancelled")  # finished after the sent ones: past the window
    params = {"cap": 3, "done_cap": 2, "rows": 2}
    row = sql_conn.execute(QUERIES["admin_summary"], params).fetchone()
    assert row is not None
    summary = AdminSummary.model_validate(orjson.loads(row[0]))
    pending = summary.counts["pending"]
    assert (pending.count, pending.capped, pending.cap, pending.due_now) == (3, True, 3, 3)
    sent, cancelled = summary.counts["sent"], summary.counts["cancelled"]
    assert (sent.count, sent.capped, sent.cap) == (2, True, 2)
    assert (cancelled.count, cancelled.capped) == (0, True)  # a lower bound, marked so
    assert summary.counts["error"].capped is False
    assert len(summary.waiting) == 2
    # Below the caps, every count is exact.
    params = {"cap": 10, "done_cap": 10, "rows": 20}
    row = sql_conn.execute(QUERIES["admin_summary"], params).fetchone()
    assert row is not None
    counts = AdminSummary.model_validate(orjson.loads(row[0])).counts
    assert {status: (c.count, c.capped) for status, c in counts.items()} == {
        "pending": (5, False),
        "in_flight": (0, False),
        "sent": (3, False),
        "error": (0, False),
        "cancelled": (1, False),
    }


def test_summary_of_an_empty_queue(client: httpx.Client, auth: Auth) -> None:
    summary = AdminSummary.model_validate(client.get(SUMMARY, headers=auth(admin=True)).json())
    assert {row.count for row in summary.counts.values()} == {0}
    assert summary.recent_failures == [] and summary.waiting == []
    assert summary.provider_latency == [] and len(summary.throughput) == 60


# Retry -------------------------------------------------------------------------------


def retry(client: httpx.Client, task_id: str, headers: dict[str, str]) -> httpx.Response:
    return client.post(f"{MESSAGES}/{task_id}/retry", headers=headers)


def test_retry_puts_an_errored_message_back_with_a_fresh_budget(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection, database_url: str
) -> None:
    task_id = put_message(
        sql_conn, "error", attempts=4, max_attempts=4, last_error="http 503", user_id="user-7"
    )
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN outbox_new")
        response = retry(client, task_id, auth("root", admin=True))
        assert response.status_code == 200, response.text
        woken = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in woken] == ["outbox_new"]  # the dispatchers are woken
    view = response.json()
    assert view["task_id"] == task_id and view["status"] == "pending"
    assert (view["attempts"], view["max_attempts"]) == (4, 8)  # 4 spent + OUTBOX_MAX_ATTEMPTS
    assert view["last_error"] is None and view["finished_at"] is None
    assert view["next_attempt_at"] is not None
    assert [a["attempt"] for a in view["history"]] == [1, 2, 3, 4]  # history kept
    # The owner sees the same through the ordinary route.
    again = client.get(f"{MESSAGES}/{task_id}", headers=auth("user-7")).json()
    assert (again["status"], again["max_attempts"], len(again["history"])) == ("pending", 8, 4)
    # One status event, to the owner, in the wire format's retrying shape.
    [(event, user_id, data)] = sql_conn.execute(
        "SELECT event, user_id, data FROM outbox.events WHERE message_id = %s", [task_id]
    ).fetchall()
    assert (event, user_id) == ("message_retrying", "user-7")
    assert data["status"] == "retrying" and data["error"] is None and data["attempt"] == 4


def test_retry_of_a_message_throttled_too_often_gives_a_fresh_throttle_budget(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    task_id = put_message(sql_conn, "error", attempts=0, last_error="throttled")
    sql_conn.execute("UPDATE outbox.messages SET throttles = 100 WHERE id = %s", [task_id])
    before = client.get(f"{MESSAGES}/{task_id}", headers=auth()).json()
    assert (before["status"], before["throttles"]) == ("error", 100)
    response = retry(client, task_id, auth("root", admin=True))
    assert response.status_code == 200, response.text
    view = response.json()
    assert (view["status"], view["attempts"], view["throttles"]) == ("pending", 0, 0)


def test_retry_puts_a_cancelled_message_back(client: httpx.Client, auth: Auth) -> None:
    task_id = send(client, auth())
    assert client.delete(f"{MESSAGES}/{task_id}", headers=auth()).status_code == 200
    response = retry(client, task_id, auth("root", admin=True))
    assert response.status_code == 200, response.text
    view = response.json()
    assert (view["status"], view["attempts"], view["max_attempts"]) == ("pending", 0, 4)
    assert view["finished_at"] is None


def test_retry_keeps_a_send_at_still_ahead(client: httpx.Client, auth: Auth) -> None:
    """A scheduled message cancelled and then retried is not sent before its time."""
    send_at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    task_id = send(client, auth(), send_at=send_at.isoformat())
    assert client.delete(f"{MESSAGES}/{task_id}", headers=auth()).status_code == 200
    response = retry(client, task_id, auth("root", admin=True))
    assert response.status_code == 200, response.text
    assert datetime.fromisoformat(response.json()["next_attempt_at"]) == send_at


@pytest.mark.parametrize("status", ["pending", "in_flight", "sent"])
def test_retry_refuses_other_states(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection, status: str
) -> None:
    task_id = put_message(
        sql_conn,
        status,
        attempts=1,
        finished="now()" if status == "sent" else None,
        locked_until="now() + interval '1 min'" if status == "in_flight" else None,
    )
    error = assert_error(retry(client, task_id, auth(admin=True)), 409, "conflict")
    assert f"message is {status}" in error["message"]
    (now,) = sql_conn.execute(
        "SELECT status FROM outbox.messages WHERE id = %s", [task_id]
    ).fetchone()
    assert now == status
    assert sql_conn.execute("SELECT count(*) FROM outbox.events").fetchone() == (0,)


def test_retry_refuses_an_expired_message(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    task_id = put_message(
        sql_conn, "error", attempts=1, last_error="expired", expires_at="2020-01-01T00:00:00Z"
    )
    error = assert_error(retry(client, task_id, auth(admin=True)), 409, "conflict")
    assert "expired at 2020-01-01T00:00:00.000Z" in error["message"]


def test_retry_is_for_admins_and_known_ids(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    task_id = put_message(sql_conn, "error", attempts=1, user_id="user-1")
    assert_error(client.post(f"{MESSAGES}/{task_id}/retry"), 401, "unauthorized")
    # Not even the owner: retrying is an operator's decision.
    assert_error(retry(client, task_id, auth("user-1")), 403, "forbidden")
    assert_error(retry(client, UNKNOWN_ID, auth(admin=True)), 404, "not_found")
    assert_error(retry(client, "not-a-uuid", auth(admin=True)), 404, "not_found")
    assert_error(client.get(f"{MESSAGES}/{task_id}/retry", headers=auth(admin=True)), 405,
                 "method_not_allowed")  # fmt: skip
    (status,) = sql_conn.execute(
        "SELECT status FROM outbox.messages WHERE id = %s", [task_id]
    ).fetchone()
    assert status == "error"


def test_concurrent_retries_of_one_message_one_wins(
    api: Any, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    for _ in range(5):
        task_id = put_message(sql_conn, "error", attempts=4, max_attempts=4)
        barrier = threading.Barrier(2)
        statuses: list[int] = []

        def go(
            task_id: str = task_id,
            barrier: threading.Barrier = barrier,
            statuses: list[int] = statuses,
        ) -> None:
            with httpx.Client(base_url=api.url, timeout=10) as http:
                barrier.wait()
                statuses.append(retry(http, task_id, auth(admin=True)).status_code)

        threads = [threading.Thread(target=go) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [200, 409]
        row = sql_conn.execute(
            "SELECT max_attempts, (SELECT count(*) FROM outbox.events e WHERE e.message_id = m.id)"
            " FROM outbox.messages m WHERE id = %s",
            [task_id],
        ).fetchone()
        assert row == (8, 1)  # one budget added, one event


def test_a_retried_message_is_not_purged_as_errored(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    task_id = put_message(sql_conn, "error", attempts=4, finished="now() - interval '8 days'")
    assert retry(client, task_id, auth(admin=True)).status_code == 200
    (deleted,) = sql_conn.execute("SELECT outbox.purge_errored_batch(now(), 100)").fetchone()
    (done,) = sql_conn.execute("SELECT outbox.purge_done_batch(now(), 100)").fetchone()
    assert (deleted, done) == (0, 0)
    (status,) = sql_conn.execute(
        "SELECT status FROM outbox.messages WHERE id = %s", [task_id]
    ).fetchone()
    assert status == "pending"
