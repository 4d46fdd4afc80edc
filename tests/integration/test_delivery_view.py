"""A message's `delivery` in GET …/messages/{task_id} and the list, `?delivery=`, and the
admin summary's delivery funnel, on a real server and database: null before the provider
accepted the message, `accepted` once sent, then as the receipts that
outbox.record_receipts records tell (delivered, read, failed with Meta's error), their
times in the view's one format; the filter for each state, 422 for anything else; the
views and the summary valid by /openapi.json; the funnel what outbox.delivery_funnel says."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, get_args

import httpx
import orjson
import psycopg
import pytest
from jsonschema import Draft202012Validator

from outbox import models
from outbox.models import AdminSummary
from outbox.store import QUERIES
from outbox.store.messages import DELIVERIES, DELIVERY_STATES
from tests.dispatch.conftest import DispatcherProcess, ScriptedProvider
from tests.support import wait_for

SEND = "/api/v1/whatsapp/send"
MESSAGES = "/api/v1/whatsapp/messages"
SUMMARY = "/api/v1/admin/summary"
Auth = Callable[..., dict[str, str]]
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# The provider's times of the receipts below (unix seconds), and as the view shows them.
SENT_AT, DELIVERED_AT, READ_AT, FAILED_AT = 1760205600.123, 1760205601.5, 1760205660.0, 1760205605
SHOWN = {
    SENT_AT: "2025-10-11T18:00:00.123Z",
    DELIVERED_AT: "2025-10-11T18:00:01.500Z",
    READ_AT: "2025-10-11T18:01:00.000Z",
    FAILED_AT: "2025-10-11T18:00:05.000Z",
}
# Meta's error object of a failed status, as the webhook records it.
META_ERROR = {
    "code": 131026,
    "title": "Message undeliverable",
    "details": "Message failed to send because the recipient's phone number is not on WhatsApp",
}
NO_RECEIPT = {
    "state": "accepted",
    "provider_sent_at": None,
    "delivered_at": None,
    "read_at": None,
    "failed_at": None,
    "error": None,
}


def send(client: httpx.Client, headers: dict[str, str], to: str = "5511999999999") -> str:
    body = {"type": "text", "to": to, "text": "hi", "ordered": False}
    response = client.post(SEND, json=body, headers=headers)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def view(client: httpx.Client, headers: dict[str, str], task_id: str) -> dict[str, Any]:
    response = client.get(f"{MESSAGES}/{task_id}", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def delivery(client: httpx.Client, headers: dict[str, str], task_id: str) -> Any:
    return view(client, headers, task_id)["delivery"]


def listed(client: httpx.Client, headers: dict[str, str], query: str = "") -> list[dict[str, Any]]:
    response = client.get(f"{MESSAGES}?{query}", headers=headers)
    assert response.status_code == 200, response.text
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


def record(conn: psycopg.Connection, *receipts: dict[str, Any]) -> list[tuple[int, Any]]:
    """Receipts recorded as the webhooks record them: one call, one transaction."""
    items = [{"n": n, **receipt} for n, receipt in enumerate(receipts)]
    params = {"receipts": orjson.dumps(items).decode(), "senders": None}
    rows = conn.execute(QUERIES["record_receipts"], params).fetchall()
    return [(n, None if message_id is None else str(message_id)) for n, message_id in rows]


def mark_sent(conn: psycopg.Connection, *task_ids: str, finished: str = "now()") -> None:
    """As a dispatcher's completion leaves a message the provider accepted."""
    conn.execute(
        f"""UPDATE outbox.messages
            SET status = 'sent', attempts = 1, finished_at = {finished}, updated_at = now(),
                provider_message_id = 'wamid.' || id
            WHERE id = ANY(%s::uuid[])""",
        [list(task_ids)],
    )


# The view -----------------------------------------------------------------------------


def test_delivery_is_null_until_sent_then_accepted(
    client: httpx.Client,
    auth: Auth,
    sql_conn: psycopg.Connection,
    provider: tuple[ScriptedProvider, str],
    start_dispatcher: Callable[..., DispatcherProcess],
) -> None:
    task_id = send(client, auth())
    assert delivery(client, auth(), task_id) is None  # pending, no dispatcher yet
    [item] = listed(client, auth())
    assert item["delivery"] is None

    # A real dispatcher sends it through a provider that accepts it.
    start_dispatcher()
    wait_for(lambda: view(client, auth(), task_id)["status"] == "sent", timeout=20)
    shown = view(client, auth(), task_id)
    assert shown["delivery"] == NO_RECEIPT
    assert shown["provider_message_id"] == f"prov-{task_id}"
    [item] = listed(client, auth())
    assert item["delivery"] == NO_RECEIPT

    # Meta's `sent` status: the provider's time of sending, still no receipt.
    assert record(sql_conn, {"task_id": task_id, "status": "sent", "at": SENT_AT}) == [(0, task_id)]
    assert delivery(client, auth(), task_id) == {**NO_RECEIPT, "provider_sent_at": SHOWN[SENT_AT]}


@pytest.mark.parametrize("status", ["pending", "in_flight", "error", "cancelled"])
def test_a_message_not_sent_has_no_delivery(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection, status: str
) -> None:
    task_id = send(client, auth())
    sql_conn.execute(
        """UPDATE outbox.messages
           SET status = %(status)s,
               locked_until = CASE WHEN %(status)s = 'in_flight'
                                   THEN now() + interval '1 minute' END,
               finished_at = CASE WHEN %(status)s IN ('error', 'cancelled') THEN now() END
           WHERE id = %(id)s""",
        {"status": status, "id": task_id},
    )
    assert delivery(client, auth(), task_id) is None


def test_a_message_in_flight_with_the_providers_sent_status_is_accepted(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    # Meta's `sent` came while the call's answer was still on its way: accepted, though
    # the outbox status is still in_flight.
    task_id = send(client, auth())
    sql_conn.execute(
        """UPDATE outbox.messages SET status = 'in_flight',
               locked_until = now() + interval '1 minute' WHERE id = %s""",
        [task_id],
    )
    record(sql_conn, {"task_id": task_id, "status": "sent", "at": SENT_AT})
    shown = view(client, auth(), task_id)
    assert shown["status"] == "in_flight"
    assert shown["delivery"] == {**NO_RECEIPT, "provider_sent_at": SHOWN[SENT_AT]}


def test_receipts_show_delivered_read_and_failed_with_their_times_and_error(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    read, failed, late = (send(client, auth(), to=f"55119000000{n:02d}") for n in range(3))
    mark_sent(sql_conn, read, failed, late)

    # Delivered, matched by the provider's id (no task id): its time, in the view's format.
    record(sql_conn, {"id": f"wamid.{read}", "status": "delivered", "at": DELIVERED_AT})
    shown = view(client, auth(), read)
    assert shown["delivery"] == {
        **NO_RECEIPT,
        "state": "delivered",
        "delivered_at": SHOWN[DELIVERED_AT],
    }
    # Then read; a late duplicate delivered changes nothing.
    record(
        sql_conn,
        {"task_id": read, "status": "read", "at": READ_AT},
        {"task_id": read, "status": "delivered", "at": DELIVERED_AT + 30},
    )
    assert delivery(client, auth(), read) == {
        **NO_RECEIPT,
        "state": "read",
        "delivered_at": SHOWN[DELIVERED_AT],
        "read_at": SHOWN[READ_AT],
    }

    # Failed after the provider accepted it: the message stays sent, the reason shows.
    record(sql_conn, {"task_id": failed, "status": "failed", "at": FAILED_AT, "error": META_ERROR})
    shown = view(client, auth(), failed)
    assert shown["status"] == "sent"
    assert shown["delivery"] == {
        **NO_RECEIPT,
        "state": "failed",
        "failed_at": SHOWN[FAILED_AT],
        "error": META_ERROR,
    }

    # Failed, then delivered (another device): delivered wins, the failure stays told.
    record(sql_conn, {"task_id": late, "status": "failed", "at": FAILED_AT, "error": META_ERROR})
    record(sql_conn, {"task_id": late, "status": "delivered", "at": DELIVERED_AT + 10})
    shown = view(client, auth(), late)
    assert shown["delivery"]["state"] == "delivered"
    assert shown["delivery"]["failed_at"] == SHOWN[FAILED_AT]
    assert shown["delivery"]["error"] == META_ERROR

    # Every time is in the one wire format; the list shows what the view shows.
    for task_id in (read, failed, late):
        times = [v for k, v in delivery(client, auth(), task_id).items() if k.endswith("_at")]
        assert all(ISO_Z.match(t) for t in times if t is not None), times
    by_id = {m["task_id"]: m["delivery"] for m in listed(client, auth())}
    for task_id in (read, failed, late):
        assert by_id[task_id] == delivery(client, auth(), task_id)
    # Only the owner (or an admin) sees it.
    assert client.get(f"{MESSAGES}/{read}", headers=auth("bob")).status_code == 404
    assert delivery(client, auth("root", admin=True), read)["state"] == "read"


# The list filter ----------------------------------------------------------------------


def test_the_list_filters_by_delivery(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    pending = send(client, auth(), to="5511900000001")
    accepted = send(client, auth(), to="5511900000002")
    delivered = send(client, auth(), to="5511900000003")
    read = send(client, auth(), to="5511900000004")
    failed = send(client, auth(), to="5511900000005")
    accepted_2 = send(client, auth(), to="5511900000006")
    bobs = send(client, auth("bob"), to="5511900000007")
    mark_sent(sql_conn, accepted, delivered, read, failed, accepted_2, bobs)
    record(
        sql_conn,
        {"task_id": delivered, "status": "delivered", "at": DELIVERED_AT},
        {"task_id": read, "status": "read", "at": READ_AT},
        {"task_id": failed, "status": "failed", "at": FAILED_AT, "error": META_ERROR},
        {"task_id": bobs, "status": "read", "at": READ_AT},
    )

    def ids(query: str, headers: dict[str, str] | None = None) -> list[str]:
        return [m["task_id"] for m in listed(client, headers or auth(), query)]

    assert ids("delivery=accepted") == [accepted_2, accepted]  # newest first
    assert ids("delivery=delivered") == [delivered]  # read ones are `read`
    assert ids("delivery=read") == [read]
    assert ids("delivery=failed") == [failed]
    for state in DELIVERIES:
        assert all(
            m["delivery"]["state"] == state for m in listed(client, auth(), f"delivery={state}")
        )
    assert pending not in {t for s in DELIVERIES for t in ids(f"delivery={s}")}
    # Beside the other filters; an admin's listing is everyone's.
    assert ids("delivery=accepted&status=pending") == []
    assert ids("delivery=accepted&status=sent&limit=1") == [accepted_2]
    assert ids(f"delivery=accepted&limit=1&after={accepted_2}") == [accepted]
    assert ids("delivery=read&sender=default") == [read]
    admin = auth("root", admin=True)
    assert ids("delivery=read", admin) == [bobs, read]
    assert ids("delivery=read", auth("bob")) == [bobs]


def test_a_bad_delivery_filter_is_a_422_on_the_parameter(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    task_id = send(client, auth())
    mark_sent(sql_conn, task_id)
    before = listed(client, auth())
    rows_before = sql_conn.execute("SELECT * FROM outbox.messages ORDER BY id").fetchall()
    for bad in ("sent", "Delivered", "READ", " read", "2", "queued", "accepted,read", ""):
        response = client.get(MESSAGES, params={"delivery": bad}, headers=auth())
        assert response.status_code == 422, (bad, response.text)
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert [f["path"] for f in error["fields"]] == ["delivery"], bad
        # Only the parameter at fault is named, even beside good ones.
        response = client.get(
            MESSAGES, params={"delivery": bad, "status": "sent", "limit": 5}, headers=auth()
        )
        assert [f["path"] for f in response.json()["error"]["fields"]] == ["delivery"], bad
    # Nothing else changed.
    assert listed(client, auth()) == before
    assert sql_conn.execute("SELECT * FROM outbox.messages ORDER BY id").fetchall() == rows_before


# The document -------------------------------------------------------------------------


def test_the_vocabulary_is_the_columns(sql_conn: psycopg.Connection) -> None:
    assert list(get_args(models.DeliveryName)) == list(DELIVERIES)
    names = dict(
        sql_conn.execute(
            "SELECT outbox.delivery_name(n::smallint), n FROM generate_series(1, 3) AS n"
        ).fetchall()
    )
    assert names == DELIVERY_STATES
    assert set(DELIVERIES) == {"accepted", *DELIVERY_STATES}


def test_the_views_and_the_summary_agree_with_the_published_document(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for name in ("MessageView", "ListedMessage"):
        assert schemas[name]["properties"]["delivery"].get("description"), name
        assert "delivery" in schemas[name]["required"], name
    states = schemas["Delivery"]["properties"]["state"]
    assert states["enum"] == list(DELIVERIES) and states.get("description")
    assert set(schemas["Delivery"]["required"]) == set(NO_RECEIPT)
    parameters = document["paths"][MESSAGES]["get"]["parameters"]
    [parameter] = [p for p in parameters if p["name"] == "delivery"]
    assert parameter["in"] == "query" and parameter["schema"]["enum"] == list(DELIVERIES)

    def validator(schema: str) -> Draft202012Validator:
        return Draft202012Validator(
            {"$ref": f"#/components/schemas/{schema}", "components": document["components"]}
        )

    # One view of each delivery, and of none.
    pending, accepted, delivered, read, failed = (
        send(client, auth(), to=f"55119000000{n:02d}") for n in range(5)
    )
    mark_sent(sql_conn, accepted, delivered, read, failed)
    record(
        sql_conn,
        {"task_id": accepted, "status": "sent", "at": SENT_AT},
        {"task_id": delivered, "status": "delivered", "at": DELIVERED_AT},
        {"task_id": read, "status": "read", "at": READ_AT},
        {"task_id": failed, "status": "failed", "at": FAILED_AT, "error": META_ERROR},
    )
    views = [view(client, auth(), t) for t in (pending, accepted, delivered, read, failed)]
    assert [v["delivery"] and v["delivery"]["state"] for v in views] == [
        None,
        "accepted",
        "delivered",
        "read",
        "failed",
    ]
    single = validator("MessageView")
    for shown in views:
        errors = [error.message for error in single.iter_errors(shown)]
        assert not errors, (shown, errors)
    for state in (None, *DELIVERIES):
        listing = client.get(
            MESSAGES, params={"delivery": state} if state else {}, headers=auth()
        ).json()
        errors = [error.message for error in validator("MessageList").iter_errors(listing)]
        assert not errors, (state, errors)
    summary = client.get(SUMMARY, headers=auth("root", admin=True)).json()
    errors = [error.message for error in validator("AdminSummary").iter_errors(summary)]
    assert not errors, errors
    assert [row["sender"] for row in summary["delivery_funnel"]["senders"]] == ["default"]


# The funnel ---------------------------------------------------------------------------


def funnel_of_the_view(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    """outbox.delivery_funnel's rows of the last 24 hours, per sender (counts added up)."""
    rows = conn.execute(
        """SELECT sender, sum(accepted)::int, sum(delivered)::int, sum(read)::int,
                  sum(failed)::int, count(*)::int, max(median_seconds_to_delivered),
                  max(median_seconds_to_read)
           FROM outbox.delivery_funnel
           WHERE hour >= date_trunc('hour', now()) - interval '23 hours'
           GROUP BY sender"""
    ).fetchall()
    return {
        sender: {
            "accepted": accepted,
            "delivered": delivered,
            "read": read,
            "failed": failed,
            "hours": hours,
            "median_seconds_to_delivered": to_delivered,
            "median_seconds_to_read": to_read,
        }
        for sender, accepted, delivered, read, failed, hours, to_delivered, to_read in rows
    }


def test_the_summarys_funnel_is_the_delivery_funnel_of_the_last_24_hours(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    # Two senders' messages, all accepted in one hour (two hours ago, so that the test
    # never straddles an hour); one accepted two days ago, out of the window.
    hour = "date_trunc('hour', now()) - interval '2 hours' + interval '10 minutes'"
    default = [send(client, auth(), to=f"55119000000{n:02d}") for n in range(5)]
    bulk = [send(client, auth(), to=f"55119000001{n:02d}") for n in range(3)]
    sql_conn.execute("UPDATE outbox.messages SET sender = 'bulk' WHERE id = ANY(%s)", [bulk])
    old = send(client, auth(), to="5511900000200")
    mark_sent(sql_conn, *default, *bulk, finished=hour)
    mark_sent(sql_conn, old, finished="now() - interval '2 days'")
    # default: 2 read (3 s and 5 s to delivered, 60 s and 100 s to read), 1 delivered
    # (11 s), 1 failed, 1 without a receipt; bulk: 1 delivered after a failure (7 s), 2
    # without; the old one read.
    sql_conn.execute(
        f"""UPDATE outbox.messages m
            SET delivery_state = r.state, delivered_at = {hour} + r.delivered * interval '1 s',
                read_at = {hour} + r.read * interval '1 s',
                failed_at = {hour} + r.failed * interval '1 s',
                delivery_error = CASE WHEN r.failed IS NOT NULL THEN %(error)s::jsonb END
            FROM (VALUES (%(d0)s::uuid, 3::smallint, 3, 60, NULL::int),
                         (%(d1)s::uuid, 3::smallint, 5, 100, NULL),
                         (%(d2)s::uuid, 2::smallint, 11, NULL, NULL),
                         (%(d3)s::uuid, 1::smallint, NULL, NULL, 2),
                         (%(b0)s::uuid, 2::smallint, 7, NULL, 1)) AS r(id, state, delivered,
                                                                      read, failed)
            WHERE m.id = r.id""",
        {
            "error": orjson.dumps(META_ERROR).decode(),
            **{f"d{n}": default[n] for n in range(4)},
            "b0": bulk[0],
        },
    )
    sql_conn.execute(
        """UPDATE outbox.messages SET delivery_state = 3, delivered_at = finished_at,
               read_at = finished_at WHERE id = %s""",
        [old],
    )

    summary = AdminSummary.model_validate(
        client.get(SUMMARY, headers=auth("root", admin=True)).json()
    )
    funnel = summary.delivery_funnel
    assert (funnel.capped, funnel.cap) == (False, 20_000)
    since = datetime.fromisoformat(funnel.since)
    assert since.minute == since.second == 0
    assert 23 * 3600 <= (datetime.now(UTC) - since).total_seconds() <= 24 * 3600
    shown = {row.sender: row.model_dump(exclude={"sender"}) for row in funnel.senders}
    assert shown == {
        "bulk": {
            "accepted": 3,
            "delivered": 1,
            "read": 0,
            "failed": 0,
            "median_seconds_to_delivered": 7.0,
            "median_seconds_to_read": None,
        },
        "default": {
            "accepted": 5,
            "delivered": 3,
            "read": 2,
            "failed": 1,
            "median_seconds_to_delivered": 5.0,
            "median_seconds_to_read": 80.0,
        },
    }
    # What the view says of the same hours (one hour each here: its medians are the
    # window's).
    view_rows = funnel_of_the_view(sql_conn)
    assert {sender: row.pop("hours") for sender, row in view_rows.items()} == {
        "bulk": 1,
        "default": 1,
    }
    assert view_rows == shown


def test_the_funnel_reads_at_most_its_cap_newest_first(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    tasks = [send(client, auth(), to=f"55119000000{n:02d}") for n in range(4)]
    for minutes, task_id in enumerate(tasks):
        mark_sent(sql_conn, task_id, finished=f"now() - interval '{10 - minutes} minutes'")
    record(sql_conn, {"task_id": tasks[0], "status": "delivered", "at": DELIVERED_AT})
    params = {"cap": 10, "done_cap": 3, "rows": 20}
    row = sql_conn.execute(QUERIES["admin_summary"], params).fetchone()
    assert row is not None
    funnel = AdminSummary.model_validate(orjson.loads(row[0])).delivery_funnel
    assert (funnel.capped, funnel.cap) == (True, 3)
    [default] = funnel.senders
    assert (default.accepted, default.delivered) == (3, 0)  # the oldest, delivered, left out
    finished = sql_conn.execute(
        "SELECT finished_at FROM outbox.messages WHERE id = %s", [tasks[1]]
    ).fetchone()
    assert finished is not None and funnel.since == models.iso_utc(finished[0])
    # Below the cap: every one, since the window's start.
    params["done_cap"] = 4
    row = sql_conn.execute(QUERIES["admin_summary"], params).fetchone()
    assert row is not None
    funnel = AdminSummary.model_validate(orjson.loads(row[0])).delivery_funnel
    assert funnel.capped is False
    assert (funnel.senders[0].accepted, funnel.senders[0].delivered) == (4, 1)


def test_the_funnel_reads_the_window_from_the_index_of_finished_messages(
    sql_conn: psycopg.Connection,
) -> None:
    # A long history of sent messages before the window: the summary reads none of it.
    sql_conn.execute(
        """INSERT INTO outbox.messages
               (id, user_id, "to", type, payload, request_hash, max_attempts, status,
                finished_at)
           SELECT gen_random_uuid(), 'u', '5511999999999', 'text', '{}', '\\x00', 4, 'sent',
                  now() - interval '3 days' + n * interval '1 s'
           FROM generate_series(1, 50000) AS n"""
    )
    sql_conn.execute("VACUUM ANALYZE outbox.messages")
    plan = "\n".join(
        row[0]
        for row in sql_conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + QUERIES["admin_summary"],
            {"cap": 100_000, "done_cap": 20_000, "rows": 20},
        ).fetchall()
    )
    accepted = plan[plan.index("CTE accepted") : plan.index("CTE funnel")]
    assert "Index Scan Backward using messages_done_finished" in accepted, plan
    assert "Seq Scan" not in accepted, plan
    assert re.search(r"messages_done_finished on messages m \(actual rows=0 ", accepted), plan
