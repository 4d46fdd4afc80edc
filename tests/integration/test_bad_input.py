"""Bad input is a 4xx naming what is wrong, never a 500, and nothing is stored."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from outbox import body, models
from tests.integration.test_api_errors import assert_error

SEND = "/api/v1/whatsapp/send/"
BATCH = "/api/v1/whatsapp/send/batch"
LIST = "/api/v1/whatsapp/messages"
Auth = Callable[..., dict[str, str]]
TEXT = {"to": "5511999999999", "type": "text", "text": "hi"}


def stored(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM outbox.messages").fetchone()
    assert row is not None
    return int(row[0])


def post(client: httpx.Client, auth: Auth, route: str, message: dict[str, Any]) -> httpx.Response:
    payload = {"messages": [TEXT, message]} if route == BATCH else message
    return client.post(route, json=payload, headers=auth())


def refused_field(response: httpx.Response, route: str) -> dict[str, Any]:
    """The one field a 422 names; on the batch route, of item 1."""
    error = assert_error(response, 422, "validation_error")
    assert len(error["fields"]) == 1, error
    field: dict[str, Any] = error["fields"][0]
    if route == BATCH:
        assert field.pop("index") == 1, error
    return field


@pytest.mark.parametrize("route", [SEND, BATCH])
@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        # PostgreSQL's timestamptz refuses offsets beyond ±15:59 (was a 500).
        ("send_at", "2020-01-01T00:00:00+16:00", "offset"),
        ("expires_at", "2099-01-01T00:00:00-16:00", "offset"),
        # Before year 1 once in UTC (was an OverflowError, a 500).
        ("send_at", "0001-01-01T00:00:00+01:00", "year"),
        # What lax parsing read as 1970 though the OpenAPI document says date-time.
        ("send_at", 0, "RFC 3339"),
        ("send_at", "0", "RFC 3339"),
        ("expires_at", 1e12, "RFC 3339"),
        # RFC 3339 only, as the document's `format: date-time` says.
        ("send_at", "2026-12-05 10:00:00Z", "RFC 3339"),
        ("send_at", "2026-12-05T10:00Z", "RFC 3339"),
        ("send_at", "2026-12-05T10:00:00+0100", "RFC 3339"),
        ("preview_url", "yes", "boolean"),
        ("preview_url", 1, "boolean"),
    ],
)
def test_a_bad_field_is_a_422_naming_it_and_stores_nothing(
    client: httpx.Client,
    auth: Auth,
    sql_conn: psycopg.Connection,
    route: str,
    field: str,
    value: Any,
    reason: str,
) -> None:
    response = post(client, auth, route, {**TEXT, field: value})
    named = refused_field(response, route)
    assert named["path"] == field
    assert reason in named["message"]
    assert stored(sql_conn) == 0


def test_an_offset_within_range_is_the_same_instant_in_utc(
    client: httpx.Client, auth: Auth
) -> None:
    sent = client.post(SEND, json={**TEXT, "send_at": "2020-01-01T05:30:00+15:30"}, headers=auth())
    assert sent.status_code == 202, sent.text
    view = client.get(f"{LIST}/{sent.json()['task_id']}", headers=auth()).json()
    assert view["send_at"] == "2019-12-31T14:00:00.000Z"


def test_a_year_before_1000_is_written_with_four_digits(client: httpx.Client, auth: Auth) -> None:
    sent = client.post(SEND, json={**TEXT, "send_at": "0999-06-01T00:00:00Z"}, headers=auth())
    assert sent.status_code == 202, sent.text
    view = client.get(f"{LIST}/{sent.json()['task_id']}", headers=auth()).json()
    assert view["send_at"] == "0999-06-01T00:00:00.000Z"


@pytest.mark.parametrize("name", ["after", "limit", "status", "client_message_id"])
def test_an_empty_list_parameter_is_refused(client: httpx.Client, auth: Auth, name: str) -> None:
    response = client.get(LIST, params={name: ""}, headers=auth())
    error = assert_error(response, 422, "validation_error")
    assert error["fields"] == [
        {"path": name, "message": "must not be empty (leave the parameter out instead)"}
    ]


@pytest.mark.parametrize(
    "after",
    [
        "0123456789abcdef0123456789abcdef",
        "{01936a2e-1234-7d8e-9f01-123456789012}",
        "urn:uuid:01936a2e-1234-7d8e-9f01-123456789012",
    ],
)
def test_after_is_a_uuid_in_its_usual_form_only(
    client: httpx.Client, auth: Auth, after: str
) -> None:
    response = client.get(LIST, params={"after": after}, headers=auth())
    error = assert_error(response, 422, "validation_error")
    assert [field["path"] for field in error["fields"]] == ["after"]


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("components", "reason"),
    [
        ([{"type": "body", "parameters": nested(models.MAX_COMPONENTS_DEPTH)}], "levels"),
        (
            [{"type": "body", "parameters": list(range(models.MAX_COMPONENTS_VALUES))}],
            "JSON values",
        ),
        # The document bounds numbers to 64-bit integers' range; floats too.
        ([{"type": "body", "parameters": [2.193074345450636e307]}], "64-bit"),
    ],
)
def test_template_components_are_bounded(
    client: httpx.Client,
    auth: Auth,
    sql_conn: psycopg.Connection,
    components: list[Any],
    reason: str,
) -> None:
    template = {"name": "otp", "language": {"code": "pt_BR"}, "components": components}
    message = {"to": "5511999999999", "type": "template", "template": template}
    for route in (SEND, BATCH):
        named = refused_field(post(client, auth, route, message), route)
        assert named["path"] == "template.components"
        assert reason in named["message"]
    assert stored(sql_conn) == 0
    # Just within both bounds: accepted.
    template["components"] = [{"type": "body", "parameters": nested(7)}]
    assert client.post(SEND, json=message, headers=auth()).status_code == 202


@pytest.mark.parametrize("item", [[], "text", 1, None])
def test_a_batch_item_that_is_not_an_object_is_refused(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection, item: Any
) -> None:
    response = client.post(BATCH, json={"messages": [TEXT, item]}, headers=auth())
    error = assert_error(response, 422, "validation_error")
    assert error["fields"] == [{"index": 1, "path": "", "message": "Input should be an object"}]
    assert stored(sql_conn) == 0


def test_a_large_body_holding_too_many_values_is_refused_before_it_is_parsed(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    values = 1 + BATCH_VALUES
    raw = b'{"messages": [{"a": [' + b",".join([b"0"] * values) + b"]}]}"
    assert len(raw) > body.PARSE_INLINE_BYTES
    response = client.post(
        BATCH, content=raw, headers={**auth(), "Content-Type": "application/json"}
    )
    error = assert_error(response, 413, "payload_too_large")
    assert f"more than {BATCH_VALUES} JSON values" in error["message"]
    assert stored(sql_conn) == 0


BATCH_VALUES = models.MAX_BATCH * 200


def test_a_large_valid_batch_is_parsed_off_the_loop_and_accepted(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    messages = [{**TEXT, "text": f"{i} " + "é" * 1000} for i in range(1000)]
    raw = orjson.dumps({"messages": messages})
    assert len(raw) > body.PARSE_INLINE_BYTES
    response = client.post(
        BATCH, content=raw, headers={**auth(), "Content-Type": "application/json"}
    )
    assert response.status_code == 202, response.text[:500]
    assert len(response.json()["messages"]) == 1000
    assert stored(sql_conn) == 1000


@pytest.mark.parametrize("route", [SEND, BATCH])
def test_excess_nesting_is_a_400_that_says_so(client: httpx.Client, auth: Auth, route: str) -> None:
    raw = b'{"messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}"
    response = client.post(
        route, content=raw, headers={**auth(), "Content-Type": "application/json"}
    )
    error = assert_error(response, 400, "malformed_json")
    assert "recursion limit" in error["message"]


def test_the_value_bound_counts_what_a_parser_builds() -> None:
    # An upper bound on values and keys: exact when no container is empty.
    assert body.json_values_bound(b"0") == 1
    assert body.json_values_bound(b"[]") == 2
    assert body.json_values_bound(b'["a,b,[c]", {"k": [1, 2]}]') == 7
    # Strings never count their commas, colons or brackets, whatever their escapes.
    assert body.json_values_bound(b'{"s": "\\"[,:{"}') == 3
    text = orjson.dumps({"t": '\\",:[]{}' * 1000})
    assert body.json_values_bound(text) == 3
