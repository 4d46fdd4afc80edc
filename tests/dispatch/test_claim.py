"""The claim statement itself, against a real PostgreSQL: what it takes and what it reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg

from outbox.store import QUERIES
from tests.dispatch.conftest import insert_messages


def claim_plan(conn: psycopg.Connection, limit: int) -> dict[str, Any]:
    """EXPLAIN ANALYZE of one claim, rolled back: the plan's top node."""
    with conn.transaction(force_rollback=True):
        row = conn.execute(
            b"EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["claim_messages"].encode(),
            {
                "dispatcher": "d-1",
                "limit": limit,
                "lease_seconds": 30,
                "now": None,
                "burst": 0.2,
                "paced": limit,
                "cursors": "{}",
                "user_max": None,
            },
        ).fetchone()
    assert row is not None
    plan: dict[str, Any] = row[0][0]["Plan"]
    return plan


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def test_a_claim_reads_the_rows_it_claims_not_the_table(sql_conn: psycopg.Connection) -> None:
    # A bulk load of pending rows, analysed: the statistics say every row is pending, and
    # a claim that joined back to the table by id was planned as a hash join over a
    # sequential scan of all of them, for every claim.
    insert_messages(sql_conn, 5_000)
    sql_conn.execute("ANALYZE outbox.messages")
    plan = claim_plan(sql_conn, 512)
    update = next(node for node in nodes(plan) if node.get("Subplan Name") == "CTE claimed")
    assert update["Actual Rows"] == 512
    scanned = [
        (node["Node Type"], node.get("Index Name"))
        for node in nodes(plan)
        if node.get("Relation Name") == "messages"
    ]
    assert ("Seq Scan", None) not in scanned, scanned
    assert ("Tid Scan", None) in scanned, scanned  # the rows locked, found by their ctid
