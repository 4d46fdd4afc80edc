"""A message's `priority` and `ordered` through the HTTP API, on a real server and database:
accepted on the single and batch routes, stored, shown by GET and the list, filtered by
`?priority=`; refused (422 on the field, nothing stored) when not one of their values;
part of a replay's identity only when not the default. `waiting_for` says why a pending
message waits (send_at, retry, earlier_message, sender_paused, rate_limit) and is null
otherwise; the views agree with /openapi.json; events carry the priority."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from cryptography.fernet import Fernet
from jsonschema import Draft202012Validator

from tests.integration.conftest import ClientFactory

SEND = "/api/v1/whatsapp/send"
BATCH = "/api/v1/whatsapp/send/batch"
MESSAGES = "/api/v1/whatsapp/messages"
SENDERS = "/api/v1/whatsapp/senders"
Auth = Callable[..., dict[str, str]]


def text(**fields: Any) -> dict[str, Any]:
    return {"type": "text", "to": "5511999999999", "text": "hi", **fields}


def send(client: httpx.Client, headers: dict[str, str], **fields: Any) -> str:
    response = client.post(SEND, json=text(**fields), headers=headers)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def view(client: httpx.Client, headers: dict[str, str], task_id: str) -> dict[str, Any]:
    response = client.get(f"{MESSAGES}/{task_id}", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def waiting_for(client: httpx.Client, headers: dict[str, str], task_id: str) -> Any:
    return view(client, headers, task_id)["waiting_for"]


def stored(conn: psycopg.Connection) -> list[tuple[str, int, bool]]:
    """(id, priority, ordered) of every message, in acceptance order."""
    return [
        (str(row[0]), row[1], row[2])
        for row in conn.execute(
            "SELECT id, priority, ordered FROM outbox.messages ORDER BY seq"
        ).fetchall()
    ]


def iso_in(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat().replace("+00:00", "Z")


# Accepted, stored and shown ---------------------------------------------------------


def test_priority_and_ordered_are_stored_and_shown_from_both_routes(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    otp = send(client, auth(), priority="high", ordered=False, to="5511900000001")
    plain = send(client, auth(), to="5511900000002")
    items = [
        text(priority="low", to="5511900000003"),
        text(ordered=False, to="5511900000004"),
        text(priority="normal", ordered=True, to="5511900000005"),
    ]
    batch = client.post(BATCH, json={"messages": items}, headers=auth())
    assert batch.status_code == 202, batch.text
    campaign, loose, explicit = (item["task_id"] for item in batch.json()["messages"])

    # The columns: 0 high, 1 normal, 2 low.
    assert stored(sql_conn) == [
        (otp, 0, False),
        (plain, 1, True),
        (campaign, 2, True),
        (loose, 1, False),
        (explicit, 1, True),
    ]
    expected = {
        otp: ("high", False),
        plain: ("normal", True),
        campaign: ("low", True),
        loose: ("normal", False),
        explicit: ("normal", True),
    }
    for task_id, shown in expected.items():
        one = view(client, auth(), task_id)
        assert (one["priority"], one["ordered"]) == shown, task_id
        assert one["waiting_for"] is None  # due, each to its own `to`: only a dispatcher
    listed = client.get(MESSAGES, headers=auth()).json()["messages"]
    assert {m["task_id"]: (m["priority"], m["ordered"]) for m in listed} == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("priority", "urgent"),
        ("priority", "HIGH"),
        ("priority", " high"),
        ("priority", 0),
        ("priority", None),
        ("ordered", "true"),
        ("ordered", 1),
        ("ordered", None),
    ],
)
def test_a_bad_priority_or_ordered_is_a_422_on_the_field_and_nothing_is_stored(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection, field: str, value: Any
) -> None:
    single = client.post(SEND, json=text(**{field: value}), headers=auth())
    assert single.status_code == 422, single.text
    error = single.json()["error"]
    assert error["code"] == "validation_error"
    assert [f["path"] for f in error["fields"]] == [field]

    items = [text(to="5511900000001"), text(to="5511900000002", **{field: value})]
    batch = client.post(BATCH, json={"messages": items}, headers=auth())
    assert batch.status_code == 422, batch.text
    fields = batch.json()["error"]["fields"]
    assert [(f["index"], f["path"]) for f in fields] == [(1, field)]
    assert stored(sql_conn) == []


def test_the_list_filters_by_priority(client: httpx.Client, auth: Auth) -> None:
    ids = {
        priority: send(client, auth(), priority=priority, to=f"55119000000{n:02d}")
        for n, priority in enumerate(["high", "normal", "low"])
    }
    default = send(client, auth(), to="5511900000099")
    someone_elses = send(client, auth("bob"), priority="high", to="5511900000098")

    def listed(query: str, headers: dict[str, str]) -> list[str]:
        response = client.get(f"{MESSAGES}?{query}", headers=headers)
        assert response.status_code == 200, response.text
        return [m["task_id"] for m in response.json()["messages"]]

    assert listed("priority=high", auth()) == [ids["high"]]
    assert listed("priority=normal", auth()) == [default, ids["normal"]]  # newest first
    assert listed("priority=low", auth()) == [ids["low"]]
    assert listed("priority=high&status=pending", auth()) == [ids["high"]]
    assert listed("priority=low&status=sent", auth()) == []
    admin = auth("root", admin=True)
    assert listed("priority=high", admin) == [someone_elses, ids["high"]]

    for bad in ("urgent", "HIGH", "0", ""):
        response = client.get(MESSAGES, params={"priority": bad}, headers=auth())
        assert response.status_code == 422, (bad, response.text)
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert [f["path"] for f in error["fields"]] == ["priority"], bad


# Replays ------------------------------------------------------------------------------


def test_a_replay_must_repeat_priority_and_ordered(client: httpx.Client, auth: Auth) -> None:
    first = client.post(SEND, json=text(client_message_id="otp-1", priority="high"), headers=auth())
    assert first.status_code == 202, first.text
    task_id = first.json()["task_id"]

    again = client.post(SEND, json=text(client_message_id="otp-1", priority="high"), headers=auth())
    assert again.status_code == 202, again.text
    assert again.json()["task_id"] == task_id
    assert again.headers["Idempotent-Replayed"] == "true"

    for changed in ({"priority": "low"}, {}, {"priority": "high", "ordered": False}):
        body = text(client_message_id="otp-1", **changed)
        response = client.post(SEND, json=body, headers=auth())
        assert response.status_code == 409, (changed, response.text)

    # The defaults written out are the request that left them out.
    send(client, auth(), client_message_id="plain-1")
    explicit = text(client_message_id="plain-1", priority="normal", ordered=True)
    response = client.post(SEND, json=explicit, headers=auth())
    assert response.status_code == 202, response.text
    assert response.headers["Idempotent-Replayed"] == "true"

    # In a batch: a replay is flagged, a changed priority is a 409 naming its item.
    items = [text(client_message_id="otp-1", priority="high"), text(client_message_id="b-1")]
    batch = client.post(BATCH, json={"messages": items}, headers=auth())
    assert batch.status_code == 202, batch.text
    assert batch.json()["messages"][0] == {
        "message": "Mensagem enfileirada para envio",
        "task_id": task_id,
        "to": "5511999999999",
        "client_message_id": "otp-1",
        "status": "queued",
        "replayed": True,
    }
    items = [text(client_message_id="b-2"), text(client_message_id="otp-1", priority="normal")]
    conflict = client.post(BATCH, json={"messages": items}, headers=auth())
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["error"]["index"] == 1


def test_a_default_request_keeps_the_hash_it_had_before_priority_and_ordered(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    # A request stored before these fields existed hashed only these keys: a faithful
    # resend (defaults left out or written out) must hash alike to replay.
    task_id = send(client, auth(), priority="normal", ordered=True, to="+5511912345678")
    before = {
        "to": "5511912345678",
        "type": "text",
        "content": {"body": "hi", "preview_url": False},
        "send_at": None,
        "expires_at": None,
    }
    digest = hashlib.sha256(orjson.dumps(before, option=orjson.OPT_SORT_KEYS)).digest()
    row = sql_conn.execute(
        "SELECT request_hash FROM outbox.messages WHERE id = %s", [task_id]
    ).fetchone()
    assert row is not None and bytes(row[0]) == digest


# waiting_for --------------------------------------------------------------------------


def test_a_scheduled_message_waits_for_its_send_at(client: httpx.Client, auth: Auth) -> None:
    task_id = send(client, auth(), send_at=iso_in(timedelta(hours=1)))
    shown = view(client, auth(), task_id)
    assert shown["waiting_for"] == {"reason": "send_at", "until": shown["send_at"]}


def test_the_second_message_to_a_recipient_waits_for_the_first(
    client: httpx.Client, auth: Auth
) -> None:
    # No dispatcher runs: both stay pending, the first due and waiting for none.
    first = send(client, auth())
    second = send(client, auth())
    unordered = send(client, auth(), ordered=False)
    other_recipient = send(client, auth(), to="5511900000001")
    assert waiting_for(client, auth(), first) is None
    assert waiting_for(client, auth(), second) == {"reason": "earlier_message", "task_id": first}
    assert waiting_for(client, auth(), unordered) is None  # neither waits nor holds back
    assert waiting_for(client, auth(), other_recipient) is None
    listed = client.get(MESSAGES, headers=auth()).json()["messages"]
    assert {m["task_id"]: m["waiting_for"] for m in listed}[second] == {
        "reason": "earlier_message",
        "task_id": first,
    }

    # A batch to one recipient: each waits for the first one still live, a priority
    # never reordering them.
    items = [text(to="5511900000002", priority="low"), text(to="5511900000002", priority="high")]
    batch = client.post(BATCH, json={"messages": items}, headers=auth())
    assert batch.status_code == 202, batch.text
    low, high = (item["task_id"] for item in batch.json()["messages"])
    assert waiting_for(client, auth(), low) is None
    assert waiting_for(client, auth(), high) == {"reason": "earlier_message", "task_id": low}

    # Once the first is final, the second waits for nothing but a dispatcher.
    assert client.delete(f"{MESSAGES}/{first}", headers=auth()).status_code == 200
    assert waiting_for(client, auth(), first) is None  # cancelled: not pending
    assert waiting_for(client, auth(), second) is None


def test_a_due_message_of_a_paused_sender_waits_for_its_sender(
    client: httpx.Client, auth: Auth
) -> None:
    task_id = send(client, auth())
    assert waiting_for(client, auth(), task_id) is None
    admin = auth("root", admin=True)
    paused = client.post(f"{SENDERS}/default/pause", json={"reason": "maintenance"}, headers=admin)
    assert paused.status_code == 200, paused.text
    shown = waiting_for(client, auth(), task_id)
    assert shown["reason"] == "sender_paused"
    assert shown.get("until") is None  # a pause by hand: no probe is due, only a resume
    assert client.post(f"{SENDERS}/default/resume", headers=admin).status_code == 200
    assert waiting_for(client, auth(), task_id) is None


def test_a_message_between_attempts_waits_for_its_retry(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    task_id = send(client, auth())
    sql_conn.execute(
        """UPDATE outbox.messages SET attempts = 1, last_error = 'timeout',
               next_attempt_at = now() + interval '1 hour' WHERE id = %s""",
        [task_id],
    )
    sql_conn.execute(
        """INSERT INTO outbox.attempts
               (message_id, attempt, dispatcher, started_at, finished_at, outcome, error)
           VALUES (%s, 1, 'd1', now(), now(), 'transient', 'timeout')""",
        [task_id],
    )
    shown = view(client, auth(), task_id)
    assert shown["waiting_for"] == {"reason": "retry", "until": shown["next_attempt_at"]}


def test_a_limited_sender_out_of_tokens_or_throttled_waits_for_its_rate(
    client_with: ClientFactory, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    with client_with(secret_key=Fernet.generate_key().decode()) as http:
        put = http.put(
            f"{SENDERS}/limited",
            json={"provider": "fake", "rate_limit": 0.01},  # a token per 100 s
            headers=auth("root", admin=True),
        )
        assert put.status_code == 201, put.text
        task_id = send(http, auth(), sender="limited")
        assert waiting_for(http, auth(), task_id) is None  # a new bucket is full
        sql_conn.execute(
            "UPDATE outbox.sender_state SET tokens = 0, refilled_at = now() WHERE id = 'limited'"
        )
        assert waiting_for(http, auth(), task_id) == {"reason": "rate_limit"}

        # Throttled by the provider: it waits out the throttle, until its next attempt.
        throttled = send(http, auth(), to="5511900000001")
        sql_conn.execute(
            "UPDATE outbox.messages SET throttles = 1, next_attempt_at = now() + interval"
            " '1 minute' WHERE id = %s",
            [throttled],
        )
        sql_conn.execute(
            """INSERT INTO outbox.attempts
                   (message_id, attempt, dispatcher, started_at, finished_at, outcome, error)
               VALUES (%s, 1, 'd1', now(), now(), 'throttled', 'throttled')""",
            [throttled],
        )
        shown = view(http, auth(), throttled)
        assert shown["waiting_for"] == {"reason": "rate_limit", "until": shown["next_attempt_at"]}


@pytest.mark.parametrize("status", ["in_flight", "sent", "error", "cancelled"])
def test_a_message_that_is_not_pending_waits_for_nothing(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection, status: str
) -> None:
    # Scheduled ahead, and behind an earlier message: either would make it wait.
    earlier = send(client, auth())
    task_id = send(client, auth(), send_at=iso_in(timedelta(hours=1)))
    assert waiting_for(client, auth(), task_id)["reason"] == "earlier_message"
    sql_conn.execute(
        """UPDATE outbox.messages
           SET status = %(status)s,
               locked_until = CASE WHEN %(status)s = 'in_flight'
                                   THEN now() + interval '1 minute' END,
               finished_at = CASE WHEN %(status)s <> 'in_flight' THEN now() END
           WHERE id = %(id)s""",
        {"status": status, "id": task_id},
    )
    assert waiting_for(client, auth(), task_id) is None
    assert waiting_for(client, auth(), earlier) is None


# The document, and events ------------------------------------------------------------


def test_the_views_agree_with_the_published_document(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for name in ("MessageView", "ListedMessage"):
        properties = schemas[name]["properties"]
        assert {"priority", "ordered", "waiting_for"} <= properties.keys(), name
        for field in ("priority", "ordered", "waiting_for"):
            assert properties[field].get("description"), (name, field)
    parameters = document["paths"][MESSAGES]["get"]["parameters"]
    [priority] = [p for p in parameters if p["name"] == "priority"]
    assert priority["schema"]["enum"] == ["high", "normal", "low"]

    def validator(schema: str) -> Draft202012Validator:
        return Draft202012Validator(
            {"$ref": f"#/components/schemas/{schema}", "components": document["components"]}
        )

    # A view of each kind of wait, and of none: each valid by the document.
    first = send(client, auth(), priority="high", ordered=False)
    ordered_first = send(client, auth(), to="5511900000001")
    behind = send(client, auth(), to="5511900000001", priority="low")
    scheduled = send(client, auth(), to="5511900000002", send_at=iso_in(timedelta(hours=1)))
    retrying = send(client, auth(), to="5511900000003")
    sql_conn.execute(
        "UPDATE outbox.messages SET attempts = 1, next_attempt_at = now() + interval '1 hour'"
        " WHERE id = %s",
        [retrying],
    )
    views = [view(client, auth(), task_id) for task_id in (first, behind, scheduled, retrying)]
    assert [v["waiting_for"] and v["waiting_for"]["reason"] for v in views] == [
        None,
        "earlier_message",
        "send_at",
        "retry",
    ]
    assert views[1]["waiting_for"]["task_id"] == ordered_first
    admin = auth("root", admin=True)
    assert client.post(f"{SENDERS}/default/pause", headers=admin).status_code == 200
    views.append(view(client, auth(), ordered_first))
    assert views[-1]["waiting_for"]["reason"] == "sender_paused"
    single = validator("MessageView")
    for shown in views:
        errors = [error.message for error in single.iter_errors(shown)]
        assert not errors, (shown, errors)
    listing = client.get(MESSAGES, headers=auth()).json()
    errors = [error.message for error in validator("MessageList").iter_errors(listing)]
    assert not errors, errors
    # The body's rules: both fields, with their defaults, in every message type.
    for member in schemas["SendRequest"]["oneOf"]:
        properties = schemas[member["$ref"].rsplit("/", 1)[1]]["properties"]
        assert properties["priority"]["enum"] == ["high", "normal", "low"]
        assert properties["priority"]["default"] == "normal"
        assert (properties["ordered"]["type"], properties["ordered"]["default"]) == (
            "boolean",
            True,
        )


def test_events_carry_the_priority(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    low = send(client, auth(), priority="low", to="5511900000001")
    plain = send(client, auth(), to="5511900000002")
    for task_id in (low, plain):
        assert client.delete(f"{MESSAGES}/{task_id}", headers=auth()).status_code == 200
    events = sql_conn.execute(
        "SELECT message_id::text, event, data->>'priority' FROM outbox.events ORDER BY id"
    ).fetchall()
    assert events == [
        (low, "message_cancelled", "low"),
        (plain, "message_cancelled", "normal"),
    ]
