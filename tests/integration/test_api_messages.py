"""GET one message, list messages (keyset pagination, filters, index), DELETE (cancel)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from outbox.store import QUERIES

SEND = "/api/v1/whatsapp/send/"
MESSAGES = "/api/v1/whatsapp/messages"
Auth = Callable[..., dict[str, str]]
UNKNOWN_ID = "0190a000-0000-7000-8000-000000000000"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

VIEW_KEYS = {
    "task_id",
    "status",
    "to",
    "type",
    "client_message_id",
    "attempts",
    "max_attempts",
    "next_attempt_at",
    "last_error",
    "provider_message_id",
    "created_at",
    "updated_at",
    "finished_at",
    "throttles",
    "history",
}


def send(client: httpx.Client, headers: dict[str, str], **extra: Any) -> str:
    body = {"to": "5511999999999", "type": "text", "text": "hi", **extra}
    response = client.post(SEND, json=body, headers=headers)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


# GET one -----------------------------------------------------------------------------


def test_get_shape_is_the_design_one(client: httpx.Client, auth: Auth) -> None:
    task_id = send(client, auth(), client_message_id="c-1")
    response = client.get(f"{MESSAGES}/{task_id}", headers=auth())
    assert response.status_code == 200, response.text
    view = response.json()
    assert view.keys() >= VIEW_KEYS
    assert view["task_id"] == task_id
    assert view["status"] == "pending"
    assert view["to"] == "5511999999999"
    assert view["type"] == "text"
    assert view["client_message_id"] == "c-1"
    assert (view["attempts"], view["max_attempts"]) == (0, 4)
    assert view["last_error"] is None
    assert view["provider_message_id"] is None
    assert view["finished_at"] is None
    assert view["history"] == []
    assert view["throttles"] == 0
    for key in ("next_attempt_at", "created_at", "updated_at"):
        assert ISO_Z.match(view[key]), (key, view[key])


def test_get_shows_the_attempt_history(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    task_id = send(client, auth())
    sql_conn.execute(
        """UPDATE outbox.messages SET status = 'error', attempts = 2, last_error = 'boom',
               finished_at = '2030-01-01T00:00:05Z' WHERE id = %(id)s""",
        {"id": task_id},
    )
    sql_conn.execute(
        """INSERT INTO outbox.attempts
               (message_id, attempt, dispatcher, started_at, finished_at, outcome, error)
           VALUES (%(id)s, 1, 'd1', '2030-01-01T00:00:00Z', '2030-01-01T00:00:01.5Z',
                   'transient', 'timeout'),
                  (%(id)s, 2, 'd1', '2030-01-01T00:00:04Z', '2030-01-01T00:00:05Z',
                   'permanent', 'boom')""",
        {"id": task_id},
    )
    view = client.get(f"{MESSAGES}/{task_id}", headers=auth()).json()
    assert view["status"] == "error"
    assert view["attempts"] == 2
    assert view["last_error"] == "boom"
    assert view["finished_at"] == "2030-01-01T00:00:05.000Z"
    assert view["next_attempt_at"] is None  # not live any more
    assert view["history"] == [
        {
            "attempt": 1,
            "started_at": "2030-01-01T00:00:00.000Z",
            "finished_at": "2030-01-01T00:00:01.500Z",
            "outcome": "transient",
            "error": "timeout",
        },
        {
            "attempt": 2,
            "started_at": "2030-01-01T00:00:04.000Z",
            "finished_at": "2030-01-01T00:00:05.000Z",
            "outcome": "permanent",
            "error": "boom",
        },
    ]


def test_throttles_show_in_get_and_the_list_and_spend_no_attempt(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    task_id = send(client, auth())
    # Two throttles as the dispatcher records them: pending again, `attempts` refunded,
    # each counted in `throttles` and kept in the history as an attempt row.
    sql_conn.execute("UPDATE outbox.messages SET throttles = 2 WHERE id = %(id)s", {"id": task_id})
    sql_conn.execute(
        """INSERT INTO outbox.attempts
               (message_id, attempt, dispatcher, started_at, finished_at, outcome, error)
           VALUES (%(id)s, 1, 'd1', '2030-01-01T00:00:00Z', '2030-01-01T00:00:00.1Z',
                   'throttled', 'throttled'),
                  (%(id)s, 1, 'd1', '2030-01-01T00:00:01Z', '2030-01-01T00:00:01.1Z',
                   'throttled', 'throttled')""",
        {"id": task_id},
    )
    view = client.get(f"{MESSAGES}/{task_id}", headers=auth()).json()
    assert (view["status"], view["attempts"], view["throttles"]) == ("pending", 0, 2)
    assert [entry["outcome"] for entry in view["history"]] == ["throttled", "throttled"]
    listed = client.get(MESSAGES, headers=auth()).json()["messages"]
    assert [(m["task_id"], m["throttles"]) for m in listed] == [(task_id, 2)]


def test_get_is_for_the_owner_or_an_admin(client: httpx.Client, auth: Auth) -> None:
    task_id = send(client, auth("alice"))
    assert client.get(f"{MESSAGES}/{task_id}", headers=auth("alice")).status_code == 200
    admin = client.get(f"{MESSAGES}/{task_id}", headers=auth("root", admin=True))
    assert admin.status_code == 200
    assert admin.json()["task_id"] == task_id
    other = client.get(f"{MESSAGES}/{task_id}", headers=auth("bob"))
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("task_id", ["not-a-uuid", "123", UNKNOWN_ID, "%27%20OR%201=1"])
def test_get_unknown_or_malformed_id_is_404(client: httpx.Client, auth: Auth, task_id: str) -> None:
    response = client.get(f"{MESSAGES}/{task_id}", headers=auth())
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"


def test_get_requires_a_token(client: httpx.Client, auth: Auth) -> None:
    task_id = send(client, auth())
    response = client.get(f"{MESSAGES}/{task_id}")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


# List --------------------------------------------------------------------------------


def test_list_is_newest_first_with_keyset_pagination(client: httpx.Client, auth: Auth) -> None:
    ids = [send(client, auth(), client_message_id=f"c-{n}") for n in range(7)]
    send(client, auth("someone-else"))
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if after:
            params["after"] = after
        response = client.get(MESSAGES, params=params, headers=auth())
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["messages"]) <= 3
        seen += [m["task_id"] for m in page["messages"]]
        pages += 1
        after = page["next_after"]
        if after is None:
            break
        assert after == page["messages"][-1]["task_id"]
    assert seen == list(reversed(ids))
    assert pages == 3
    first = client.get(MESSAGES, headers=auth()).json()["messages"][0]
    # A list item is the view without its attempts (GET …/{task_id} has them).
    assert first.keys() >= VIEW_KEYS - {"history"}
    assert "history" not in first


def test_list_filters_by_status_and_client_message_id(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    a = send(client, auth(), client_message_id="a")
    b = send(client, auth(), client_message_id="b")
    c = send(client, auth())
    sql_conn.execute("UPDATE outbox.messages SET status = 'sent' WHERE id = %s", [b])

    def listed(**params: Any) -> list[str]:
        response = client.get(MESSAGES, params=params, headers=auth())
        assert response.status_code == 200, response.text
        return [m["task_id"] for m in response.json()["messages"]]

    assert listed() == [c, b, a]
    assert listed(status="pending") == [c, a]
    assert listed(status="sent") == [b]
    assert listed(status="cancelled") == []
    assert listed(client_message_id="a") == [a]
    assert listed(client_message_id="a", status="sent") == []
    assert listed(client_message_id="nope") == []


def test_an_admin_lists_everyones_messages(client: httpx.Client, auth: Auth) -> None:
    mine = send(client, auth("alice"))
    theirs = send(client, auth("bob"))

    def listed(headers: dict[str, str]) -> list[str]:
        return [m["task_id"] for m in client.get(MESSAGES, headers=headers).json()["messages"]]

    assert listed(auth("alice")) == [mine]
    assert listed(auth("bob")) == [theirs]
    assert listed(auth("root", admin=True)) == [theirs, mine]


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"limit": 501}, "limit"),
        ({"limit": 0}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": "\u00b2"}, "limit"),
        ({"limit": "1e2"}, "limit"),
        ({"status": "done"}, "status"),
        ({"after": "not-a-uuid"}, "after"),
    ],
)
def test_list_rejects_bad_parameters(
    client: httpx.Client, auth: Auth, params: dict[str, Any], path: str
) -> None:
    response = client.get(MESSAGES, params=params, headers=auth())
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert [f["path"] for f in error["fields"]] == [path]


def test_list_limit_500_is_accepted(client: httpx.Client, auth: Auth) -> None:
    response = client.get(MESSAGES, params={"limit": 500}, headers=auth())
    assert response.status_code == 200, response.text
    assert response.json() == {"messages": [], "next_after": None}


def _literal(value: Any) -> str:
    return "NULL" if value is None else "'" + str(value).replace("'", "''") + "'"


@pytest.mark.parametrize(
    "params",
    [
        {"user_id": "'user-7'", "status": "NULL", "client_message_id": "NULL",
         "sender": "NULL", "after": "NULL"},
        {"user_id": "'user-7'", "status": "'pending'", "client_message_id": "NULL",
         "sender": "NULL", "after": "'ffffffff-ffff-7fff-bfff-ffffffffffff'"},
        {"user_id": "NULL", "status": "NULL", "client_message_id": "NULL",
         "sender": "NULL", "after": "NULL"},
        {"user_id": "'user-7'", "status": "NULL", "client_message_id": "'c-7-7'",
         "sender": "NULL", "after": "NULL"},
        {"user_id": "'user-7'", "status": "NULL", "client_message_id": "NULL",
         "sender": "'acme'", "after": "NULL"},
        # No index has the sender: an admin's listing of one walks the id index while
        # the sender has many rows (a sender with few reads the table either way).
        {"user_id": "NULL", "status": "NULL", "client_message_id": "NULL",
         "sender": "'default'", "after": "NULL"},
        # Nor the priority: its filter too is applied on top.
        {"user_id": "'user-7'", "status": "NULL", "client_message_id": "NULL",
         "sender": "NULL", "priority": "'high'", "after": "NULL"},
        # ?delivery=: delivered, read and failed by the column's value (018).
        {"user_id": "'user-7'", "status": "NULL", "client_message_id": "NULL",
         "sender": "NULL", "delivery_state": "2", "after": "NULL"},
        {"user_id": "NULL", "status": "NULL", "client_message_id": "NULL",
         "sender": "NULL", "delivery_state": "3", "after": "NULL"},
    ],
    ids=["user", "user-status-after", "admin", "client-message-id", "user-sender", "admin-sender",
         "user-priority", "user-delivery", "admin-delivery"],
)  # fmt: skip
def test_the_list_query_is_served_by_an_index(
    sql_conn: psycopg.Connection, params: dict[str, str]
) -> None:
    sql_conn.execute(
        """INSERT INTO outbox.messages
               (id, user_id, client_message_id, "to", type, payload, request_hash, max_attempts)
           SELECT gen_random_uuid(), 'user-' || (n % 50), 'c-' || (n % 50) || '-' || n,
                  '5511999999999', 'text', '{}'::jsonb, '\\x00'::bytea, 4
           FROM generate_series(1, 20000) AS n"""
    )
    sql_conn.execute("ANALYZE outbox.messages")
    query = QUERIES["list_messages"]
    literal = {key: psycopg.sql.SQL(value) for key, value in params.items()}
    literal["limit"] = psycopg.sql.SQL("50")
    literal.setdefault("priority", psycopg.sql.SQL("NULL"))
    literal.setdefault("delivery_state", psycopg.sql.SQL("NULL"))
    literal.setdefault("accepted", psycopg.sql.SQL("false"))
    statement = psycopg.sql.SQL(query.replace("%(", "{").replace(")s", "}")).format(**literal)
    plan = "\n".join(
        row[0] for row in sql_conn.execute(psycopg.sql.SQL("EXPLAIN ") + statement).fetchall()
    )
    assert "Index" in plan, plan
    assert "Seq Scan" not in plan, plan


# DELETE ------------------------------------------------------------------------------


def test_cancel_a_pending_message(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    task_id = send(client, auth())
    response = client.delete(f"{MESSAGES}/{task_id}", headers=auth())
    assert response.status_code == 200, response.text
    view = response.json()
    assert view.keys() >= VIEW_KEYS
    assert view["task_id"] == task_id
    assert view["status"] == "cancelled"
    assert ISO_Z.match(view["finished_at"])
    row = sql_conn.execute(
        "SELECT status, finished_at IS NOT NULL FROM outbox.messages WHERE id = %s", [task_id]
    ).fetchone()
    assert row == ("cancelled", True)
    # Its one status event, written with the cancel.
    [(event, status, error)] = sql_conn.execute(
        "SELECT event, data->>'status', data->>'error' FROM outbox.events WHERE message_id = %s",
        [task_id],
    ).fetchall()
    assert (event, status, error) == ("message_cancelled", "cancelled", None)
    # Cancelled is no longer pending: a second DELETE is refused and changes nothing.
    again = client.delete(f"{MESSAGES}/{task_id}", headers=auth())
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "conflict"
    assert "cancelled" in again.json()["error"]["message"]
    after = client.get(f"{MESSAGES}/{task_id}", headers=auth()).json()
    assert after["finished_at"] == view["finished_at"]
    events = sql_conn.execute("SELECT count(*) FROM outbox.events WHERE message_id = %s", [task_id])
    assert events.fetchone() == (1,)  # the refused DELETE wrote none


@pytest.mark.parametrize("status", ["sent", "in_flight", "error"])
def test_cancel_a_message_past_pending_is_409(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection, status: str
) -> None:
    task_id = send(client, auth())
    sql_conn.execute("UPDATE outbox.messages SET status = %s WHERE id = %s", [status, task_id])
    response = client.delete(f"{MESSAGES}/{task_id}", headers=auth())
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "conflict"
    row = sql_conn.execute("SELECT status FROM outbox.messages WHERE id = %s", [task_id]).fetchone()
    assert row == (status,)


def test_cancel_by_another_user_is_404_and_changes_nothing(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    task_id = send(client, auth("alice"))
    response = client.delete(f"{MESSAGES}/{task_id}", headers=auth("bob"))
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"
    row = sql_conn.execute("SELECT status FROM outbox.messages WHERE id = %s", [task_id]).fetchone()
    assert row == ("pending",)
    assert sql_conn.execute("SELECT count(*) FROM outbox.events").fetchone() == (0,)


def test_an_admin_cancels_anyones_message(client: httpx.Client, auth: Auth) -> None:
    task_id = send(client, auth("alice"))
    response = client.delete(f"{MESSAGES}/{task_id}", headers=auth("root", admin=True))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"


@pytest.mark.parametrize("task_id", ["nope", UNKNOWN_ID])
def test_cancel_unknown_or_malformed_id_is_404(
    client: httpx.Client, auth: Auth, task_id: str
) -> None:
    response = client.delete(f"{MESSAGES}/{task_id}", headers=auth())
    assert response.status_code == 404, response.text
