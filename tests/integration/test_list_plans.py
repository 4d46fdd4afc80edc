"""GET /messages reads an index range in id order for every filter combination a user or
an admin can send (migration 008): what one listing reads does not grow with the rows the
table holds of other users and other statuses, such as a long history of sent messages.
`?delivery=` too (migration 018): delivered, read and failed read the partial indexes of
the messages with a receipt, accepted the sent range."""

from __future__ import annotations

import itertools
from typing import Any

import psycopg

from outbox.store import QUERIES
from outbox.store.messages import DELIVERIES, DELIVERY_STATES

LIMIT = 20
LIVE = 10_000  # the recent rows, every status
HISTORY = 60_000  # older rows, all sent: a queue's past
SOME_HISTORY = 15_000  # of which the newest are there at the first look


def fill(conn: psycopg.Connection, first: int, last: int, *, history: bool) -> None:
    """Rows first..last, ids in that order. A user `big` has most of them, 100 others the
    rest; half have a client_message_id, and 40 users sent one each under `shared`.
    Recent rows are mostly sent, some pending, in flight, errored, a few cancelled. Of the
    sent ones, a third were delivered, a seventh read, a few failed, the rest have no
    receipt (accepted); a few in flight already have one (it came before the completion)."""
    conn.execute(
        """INSERT INTO outbox.messages
               (id, user_id, client_message_id, "to", type, payload, request_hash,
                max_attempts, status, locked_until, finished_at, delivery_state)
           SELECT (lpad(to_hex(1700000000000 + n), 12, '0') || '7000' || '8'
                   || lpad(to_hex(n), 15, '0'))::uuid,
                  CASE WHEN n %% 5 = 0 THEN 'user-' || (n / 5) %% 100 ELSE 'big' END,
                  CASE WHEN n %% 5 = 0 AND n < %(first)s + 200 AND NOT %(history)s
                       THEN 'shared'
                       WHEN n %% 2 = 0 THEN 'c-' || n END,
                  '5511999999999', 'text', '{}'::jsonb, '\\x00'::bytea, 4, s,
                  CASE WHEN s = 'in_flight' THEN now() + interval '1 minute' END,
                  CASE WHEN s IN ('sent', 'error', 'cancelled') THEN now() END,
                  CASE WHEN s = 'sent' AND n %% 3 = 0 THEN 2
                       WHEN s = 'sent' AND n %% 7 = 1 THEN 3
                       WHEN s = 'sent' AND n %% 13 = 2 THEN 1
                       WHEN s = 'in_flight' AND n %% 2 = 0 THEN 2 END::smallint
           FROM (SELECT n, CASE WHEN %(history)s THEN 'sent'
                                WHEN n %% 997 = 1 THEN 'cancelled'
                                WHEN n %% 101 = 2 THEN 'error'
                                WHEN n %% 53 = 3 THEN 'pending'
                                WHEN n %% 499 = 4 THEN 'in_flight'
                                ELSE 'sent' END AS s
                 FROM generate_series(%(first)s, %(last)s) AS n) g""",
        {"first": first, "last": last, "history": history},
    )
    conn.execute("VACUUM ANALYZE outbox.messages")


def pages_read(conn: psycopg.Connection, params: dict[str, Any]) -> tuple[int, str]:
    """Shared pages the list query touches with these parameters, as the API runs it
    (unprepared: planned for these values), and the plan."""
    rows = conn.execute(
        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) " + QUERIES["list_messages"],
        params,
        prepare=False,
    ).fetchall()
    plan = "\n".join(row[0] for row in rows)
    top = next(line for line in plan.splitlines() if "Buffers: shared" in line)
    pages = sum(
        int(part.split("=")[1]) for part in top.split() if part.startswith(("hit=", "read="))
    )
    return pages, plan


def every_combination(after: Any) -> list[dict[str, Any]]:
    owners = ["big", "user-7", None]  # None: an admin's listing, everyone's rows
    statuses = [None, "pending", "in_flight", "sent", "error", "cancelled"]
    client_message_ids = [None, "shared", f"c-{HISTORY + 4}"]
    # Every row's sender is `default`: its filter, on top of the plan, drops none of them.
    senders = [None, "default"]
    return [
        {
            "user_id": o,
            "status": s,
            "client_message_id": c,
            "sender": d,
            "priority": None,
            "delivery_state": None,
            "accepted": False,
            "after": a,
            "limit": LIMIT,
        }
        for o, s, c, d, a in itertools.product(
            owners, statuses, client_message_ids, senders, [None, after]
        )
    ]


def delivery_combinations(after: Any) -> list[dict[str, Any]]:
    """?delivery= alone and beside a status, for a user and an admin, as the store's
    listing passes it (the column's value, or `accepted`)."""
    owners = ["big", "user-7", None]
    statuses = [None, "pending", "in_flight", "sent", "error"]
    return [
        {
            "user_id": o,
            "status": s,
            "client_message_id": None,
            "sender": None,
            "priority": None,
            "delivery_state": DELIVERY_STATES.get(v),
            "accepted": v == "accepted",
            "after": a,
            "limit": LIMIT,
        }
        for o, v, s, a in itertools.product(owners, DELIVERIES, statuses, [None, after])
    ]


def test_no_listing_reads_more_when_the_history_grows(sql_conn: psycopg.Connection) -> None:
    fill(sql_conn, HISTORY + 1, HISTORY + LIVE, history=False)
    middle = sql_conn.execute(
        "SELECT id FROM outbox.messages ORDER BY id OFFSET %s LIMIT 1", [LIVE // 2]
    ).fetchone()
    assert middle is not None
    combinations = every_combination(middle[0]) + delivery_combinations(middle[0])
    fill(sql_conn, HISTORY - SOME_HISTORY + 1, HISTORY, history=True)
    before = [pages_read(sql_conn, params)[0] for params in combinations]

    fill(sql_conn, 1, HISTORY - SOME_HISTORY, history=True)  # 2.8 times as many rows

    # The history is all sent: a plan that walks every row of another status (the queue's
    # backlog through messages_due, which migration 008 accepts for an admin's pending
    # listing) reads as much as before, whichever plan the statistics pick.
    backlog = dict(
        sql_conn.execute(
            "SELECT status, count(*) FROM outbox.messages WHERE status <> 'sent' GROUP BY 1"
        ).fetchall()
    )
    failures = []
    for params, pages_then in zip(combinations, before, strict=True):
        pages, plan = pages_read(sql_conn, params)
        # An index one level deeper costs a page or two per descent; reading the user's
        # whole range, or the table, grows with it.
        bound = 1.5 * max(pages_then, backlog.get(params["status"], 0)) + 10
        if pages > bound:
            failures.append(f"{pages_then} → {pages} pages for {params}:\n{plan}")
    assert not failures, f"{len(failures)} combinations read more:\n" + "\n\n".join(failures[:4])

    # Delivered, read and failed are read from the partial indexes of the messages with a
    # receipt (the filter is on the column, not on its name), newest first.
    for state in DELIVERY_STATES.values():
        for owner, index in (("big", "messages_user_delivery"), (None, "messages_delivery")):
            params = {**delivery_combinations(None)[0], "user_id": owner}
            params.update(delivery_state=state, accepted=False)
            plan = pages_read(sql_conn, params)[1]
            assert f"Index Scan Backward using {index} " in plan, plan
