"""The inspection views on a prepared data set, and `outbox status`.

Rows are inserted and the views read in one transaction: now() is the same for both,
so every figure (and every minute bucket) is exact."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.e2e.conftest import OUTBOX, clean_env
from tests.purge.conftest import add_message


def prepare(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    add_message(conn, "pending", next_attempt_in="-10 minutes")
    add_message(conn, "pending", next_attempt_in="-1 minute")
    add_message(conn, "pending", next_attempt_in="1 hour")
    ids["stuck"] = add_message(conn, "in_flight", locked_until_in="-5 minutes", attempts=1)
    add_message(conn, "in_flight", locked_until_in="1 minute", attempts=1)
    for ago in ("1 minute", "1 minute", "3 minutes", "2 hours"):
        add_message(conn, "sent", finished_ago=ago, attempts=1)
    ids["new_error"] = add_message(
        conn, "error", finished_ago="2 minutes", attempts=4, last_error="HTTP 503"
    )
    ids["old_error"] = add_message(
        conn, "error", finished_ago="3 days", attempts=1, last_error="invalid recipient"
    )
    conn.execute(
        "UPDATE outbox.attempts SET outcome = 'permanent' WHERE message_id = %s",
        [ids["old_error"]],
    )
    add_message(conn, "cancelled", finished_ago="1 hour")
    # provider latency: ten calls a minute ago (10..100 ms), one without a latency,
    # one two hours ago
    conn.execute(
        """INSERT INTO outbox.attempts
               (message_id, attempt, dispatcher, started_at, finished_at, outcome, latency_ms)
           SELECT %(id)s, 10 + g, 'd-1', now(), now() - interval '1 minute', 'sent', g * 10
           FROM generate_series(1, 10) g
           UNION ALL SELECT %(id)s, 30, 'd-1', now(), now() - interval '1 minute', 'sent', NULL
           UNION ALL SELECT %(id)s, 31, 'd-1', now(), now() - interval '2 hours', 'sent', 5000""",
        {"id": ids["stuck"]},
    )
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    ids["now"] = row[0]
    return ids


def rows(conn: psycopg.Connection[Any], view: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(f"SELECT * FROM outbox.{view}")
        return cursor.fetchall()


@pytest.fixture
def prepared(sql_conn: psycopg.Connection[Any]) -> Any:
    with sql_conn.transaction():
        ids = prepare(sql_conn)
        yield sql_conn, ids


def test_queue_summary(prepared: Any) -> None:
    conn, ids = prepared
    now = ids["now"]
    summary = {row["status"]: row for row in rows(conn, "queue_summary")}
    assert list(summary) == ["pending", "in_flight", "sent", "error", "cancelled"]
    assert {s: (r["count"], r["due_now"]) for s, r in summary.items()} == {
        "pending": (3, 2),
        "in_flight": (2, 1),
        "sent": (4, 0),
        "error": (2, 0),
        "cancelled": (1, 0),
    }
    assert summary["pending"]["oldest"] == now - timedelta(minutes=10)
    assert summary["in_flight"]["oldest"] == now - timedelta(minutes=5)
    assert summary["sent"]["oldest"] == now - timedelta(hours=2)
    assert summary["error"]["oldest"] == now - timedelta(days=3)


def test_stuck_messages(prepared: Any) -> None:
    conn, ids = prepared
    stuck = rows(conn, "stuck_messages")
    assert [row["id"] for row in stuck] == [ids["stuck"]]
    assert stuck[0]["overdue"] == timedelta(minutes=5)
    assert stuck[0]["locked_by"] == "d-1"
    assert stuck[0]["sender"] == "default"


def test_recent_failures(prepared: Any) -> None:
    conn, ids = prepared
    failures = rows(conn, "recent_failures")
    assert [(r["id"], r["attempts"], r["last_error"], r["last_outcome"]) for r in failures] == [
        (ids["new_error"], 4, "HTTP 503", "transient"),
        (ids["old_error"], 1, "invalid recipient", "permanent"),
    ]
    assert {r["sender"] for r in failures} == {"default"}


def test_throughput(prepared: Any) -> None:
    conn, ids = prepared
    minute = ids["now"].replace(second=0, microsecond=0)
    table = rows(conn, "throughput")
    assert len(table) == 60
    assert table[0]["minute"] == minute and table[-1]["minute"] == minute - timedelta(minutes=59)
    busy = {r["minute"]: (r["sent"], r["failed"]) for r in table if r["sent"] or r["failed"]}
    assert busy == {
        minute - timedelta(minutes=1): (2, 0),
        minute - timedelta(minutes=2): (0, 1),
        minute - timedelta(minutes=3): (1, 0),
    }


def test_provider_latency(prepared: Any) -> None:
    conn, ids = prepared
    table = rows(conn, "provider_latency")
    minute = ids["now"].replace(second=0, microsecond=0) - timedelta(minutes=1)
    by_minute = {r["minute"]: r for r in table}
    row = by_minute[minute]
    assert row["calls"] == 10
    assert (float(row["p50_ms"]), float(row["p95_ms"]), float(row["p99_ms"])) == (55.0, 95.5, 99.1)
    assert float(row["max_ms"]) == 100.0
    assert all(r["minute"] >= ids["now"] - timedelta(hours=1) for r in table)


def test_outbox_status_json_and_table(sql_conn: psycopg.Connection[Any], database_url: str) -> None:
    prepare(sql_conn)
    env = clean_env(OUTBOX_DATABASE_URL=database_url, OUTBOX_LOG_FORMAT="json")

    result = subprocess.run(
        [*OUTBOX, "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert {s: v["count"] for s, v in document["statuses"].items()} == {
        "pending": 3,
        "in_flight": 2,
        "sent": 4,
        "error": 2,
        "cancelled": 1,
    }
    assert document["statuses"]["pending"]["due_now"] == 2

    result = subprocess.run(
        [*OUTBOX, "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["STATUS", "COUNT", "DUE", "NOW", "OLDEST"]
    assert lines[2].split()[:3] == ["pending", "3", "2"]
