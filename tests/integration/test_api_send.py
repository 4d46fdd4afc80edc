"""POST /api/v1/whatsapp/send: the 202 body, every type, validation, idempotency, send_at."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import psycopg
import pytest

SEND = "/api/v1/whatsapp/send/"
Auth = Callable[..., dict[str, str]]


def text(**extra: Any) -> dict[str, Any]:
    return {"to": "5511999999999", "type": "text", "text": "hello", **extra}


def count_rows(sql_conn: psycopg.Connection, user_id: str = "user-1") -> int:
    row = sql_conn.execute(
        "SELECT count(*) FROM outbox.messages WHERE user_id = %s", [user_id]
    ).fetchone()
    assert row is not None
    return int(row[0])


def field_paths(response: httpx.Response) -> list[str]:
    return [field["path"] for field in response.json()["error"]["fields"]]


def test_202_body_is_exactly_the_old_systems(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    response = client.post(SEND, json=text(client_message_id="custom_123"), headers=auth())
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"message", "task_id", "to", "client_message_id", "status"}
    assert body["message"] == "Mensagem enfileirada para envio"
    assert body["to"] == "5511999999999"
    assert body["client_message_id"] == "custom_123"
    assert body["status"] == "queued"
    assert str(uuid.UUID(body["task_id"])) == body["task_id"]
    assert "Idempotent-Replayed" not in response.headers
    # Returned only after the commit: another connection sees the row at once.
    row = sql_conn.execute(
        "SELECT user_id, client_message_id, status, attempts, max_attempts"
        " FROM outbox.messages WHERE id = %s",
        [body["task_id"]],
    ).fetchone()
    assert row == ("user-1", "custom_123", "pending", 0, 4)


def test_without_client_message_id_it_is_null(client: httpx.Client, auth: Auth) -> None:
    response = client.post(SEND, json=text(), headers=auth())
    assert response.status_code == 202, response.text
    assert response.json()["client_message_id"] is None


@pytest.mark.parametrize("path", ["/api/v1/whatsapp/send/", "/api/v1/whatsapp/send"])
def test_both_paths_accept(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection, path: str
) -> None:
    response = client.post(path, json=text(), headers=auth())
    assert response.status_code == 202, response.text
    assert count_rows(sql_conn) == 1


def test_plus_is_dropped_from_to(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    response = client.post(SEND, json=text(to="+551188887777"), headers=auth())
    assert response.status_code == 202, response.text
    assert response.json()["to"] == "551188887777"
    row = sql_conn.execute(
        'SELECT "to" FROM outbox.messages WHERE id = %s', [response.json()["task_id"]]
    ).fetchone()
    assert row == ("551188887777",)


LINK = "https://example.com/file.bin"
TYPES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"type": "text", "text": "hi"}, {"body": "hi", "preview_url": False}),
    (
        {"type": "text", "text": "see https://x.y", "preview_url": True},
        {"body": "see https://x.y", "preview_url": True},
    ),
    (
        {
            "type": "template",
            "template": {
                "name": "order_update",
                "language": {"code": "pt_BR"},
                "components": [
                    {"type": "body", "parameters": [{"type": "text", "text": "42"}]},
                ],
            },
        },
        {
            "name": "order_update",
            "language": {"code": "pt_BR"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "42"}]}],
        },
    ),
    (
        {"type": "image", "image": {"link": LINK, "caption": "a picture"}},
        {"link": LINK, "caption": "a picture"},
    ),
    (
        {"type": "document", "document": {"link": LINK, "caption": "c", "filename": "a.pdf"}},
        {"link": LINK, "caption": "c", "filename": "a.pdf"},
    ),
    ({"type": "audio", "audio": {"link": LINK}}, {"link": LINK}),
    ({"type": "video", "video": {"link": LINK, "caption": "v"}}, {"link": LINK, "caption": "v"}),
]


@pytest.mark.parametrize(("content", "payload"), TYPES, ids=lambda v: str(v.get("type", "")))
def test_every_type_is_accepted_and_its_payload_stored(
    client: httpx.Client,
    auth: Auth,
    sql_conn: psycopg.Connection,
    content: dict[str, Any],
    payload: dict[str, Any],
) -> None:
    response = client.post(SEND, json={"to": "5511999999999", **content}, headers=auth())
    assert response.status_code == 202, response.text
    row = sql_conn.execute(
        "SELECT type, payload FROM outbox.messages WHERE id = %s", [response.json()["task_id"]]
    ).fetchone()
    assert row == (content["type"], payload)


AUDIO_CAPTION = {"type": "audio", "audio": {"link": LINK, "caption": "x"}}
IMAGE_FILENAME = {"type": "image", "image": {"link": LINK, "filename": "a"}}
NO_LANGUAGE = {"type": "template", "template": {"name": "n"}}
LONG_CLIENT_ID = {"type": "text", "text": "x", "client_message_id": "c" * 129}
BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("caption on audio", AUDIO_CAPTION, "audio.caption"),
    ("filename on image", IMAGE_FILENAME, "image.filename"),
    ("unknown top-level field", {"type": "text", "text": "x", "colour": "red"}, "colour"),
    ("unknown field in media", {"type": "video", "video": {"link": LINK, "x": 1}}, "video.x"),
    ("unknown type", {"type": "sticker", "sticker": {}}, "type"),
    ("missing type", {"text": "x"}, "type"),
    ("empty text", {"type": "text", "text": ""}, "text"),
    ("text too long", {"type": "text", "text": "x" * 4097}, "text"),
    ("text as object", {"type": "text", "text": {"body": "x"}}, "text"),
    ("content of another type", {"type": "text", "image": {"link": LINK}}, "text"),
    ("media without link", {"type": "image", "image": {"caption": "x"}}, "image.link"),
    ("non-http link", {"type": "image", "image": {"link": "file:///etc/passwd"}}, "image.link"),
    ("template without language", NO_LANGUAGE, "template.language"),
    ("client_message_id too long", LONG_CLIENT_ID, "client_message_id"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "path"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_shapes_are_422_naming_the_field(
    client: httpx.Client,
    auth: Auth,
    sql_conn: psycopg.Connection,
    name: str,
    content: dict[str, Any],
    path: str,
) -> None:
    response = client.post(SEND, json={"to": "5511999999999", **content}, headers=auth())
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert path in field_paths(response), error
    assert count_rows(sql_conn) == 0


@pytest.mark.parametrize(
    "to",
    ["55119999abcd", "phone", "1234567", "+1234567", "1234567890123456", "", "55 11 99999 9999"],
)
def test_bad_to_is_422(client: httpx.Client, auth: Auth, to: str) -> None:
    response = client.post(SEND, json=text(to=to), headers=auth())
    assert response.status_code == 422, response.text
    assert field_paths(response) == ["to"]


@pytest.mark.parametrize("to", ["12345678", "+123456789012345"])
def test_to_at_the_length_limits_is_accepted(client: httpx.Client, auth: Auth, to: str) -> None:
    response = client.post(SEND, json=text(to=to), headers=auth())
    assert response.status_code == 202, response.text
    assert response.json()["to"] == to.removeprefix("+")


# Idempotency -------------------------------------------------------------------------


def test_replay_returns_the_original_answer_and_no_second_row(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    first = client.post(SEND, json=text(client_message_id="abc"), headers=auth())
    assert first.status_code == 202, first.text
    assert "Idempotent-Replayed" not in first.headers
    # The same request after normalisation: a leading '+', another key order.
    again = {"client_message_id": "abc", "text": "hello", "type": "text", "to": "+5511999999999"}
    second = client.post(SEND, json=again, headers=auth())
    assert second.status_code == 202, second.text
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert count_rows(sql_conn) == 1


def test_same_client_message_id_different_body_is_409(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    first = client.post(SEND, json=text(client_message_id="abc"), headers=auth())
    assert first.status_code == 202, first.text
    for changed in (
        text(client_message_id="abc", text="other"),
        text(client_message_id="abc", to="5511888888888"),
        text(client_message_id="abc", preview_url=True),
    ):
        response = client.post(SEND, json=changed, headers=auth())
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "conflict"
    assert count_rows(sql_conn) == 1


def test_client_message_id_is_per_user(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    a = client.post(SEND, json=text(client_message_id="same"), headers=auth("alice"))
    b = client.post(SEND, json=text(client_message_id="same", text="x"), headers=auth("bob"))
    assert a.status_code == b.status_code == 202
    assert a.json()["task_id"] != b.json()["task_id"]
    assert count_rows(sql_conn, "alice") == count_rows(sql_conn, "bob") == 1


def test_fifty_concurrent_identical_posts_create_one_row(
    api: Any, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    headers = auth()
    body = text(client_message_id="race")

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=api.url, timeout=30, limits=limits) as http:
            return await asyncio.gather(
                *(http.post(SEND, json=body, headers=headers) for _ in range(50))
            )

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [202] * 50, [r.text for r in responses]
    assert len({r.json()["task_id"] for r in responses}) == 1
    replayed = [r.headers.get("Idempotent-Replayed") for r in responses]
    assert replayed.count(None) == 1 and replayed.count("true") == 49
    assert count_rows(sql_conn) == 1


# send_at / expires_at ----------------------------------------------------------------


def _times(sql_conn: psycopg.Connection, task_id: str) -> tuple[Any, ...]:
    row = sql_conn.execute(
        "SELECT send_at, expires_at, next_attempt_at, now() FROM outbox.messages WHERE id = %s",
        [task_id],
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_future_send_at_delays_the_first_attempt(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    send_at = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    local = send_at.astimezone(timezone(timedelta(hours=-3)))
    response = client.post(SEND, json=text(send_at=local.isoformat()), headers=auth())
    assert response.status_code == 202, response.text
    stored_send_at, _, next_attempt_at, _ = _times(sql_conn, response.json()["task_id"])
    assert stored_send_at == send_at
    assert next_attempt_at == send_at


def test_past_send_at_means_now(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    before = datetime.now(UTC)
    past = (before - timedelta(hours=5)).isoformat()
    response = client.post(SEND, json=text(send_at=past), headers=auth())
    assert response.status_code == 202, response.text
    _, _, next_attempt_at, now = _times(sql_conn, response.json()["task_id"])
    assert before - timedelta(seconds=5) <= next_attempt_at <= now


def test_send_at_more_than_30_days_ahead_is_422(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    far = (datetime.now(UTC) + timedelta(days=30, hours=1)).isoformat()
    response = client.post(SEND, json=text(send_at=far), headers=auth())
    assert response.status_code == 422, response.text
    assert field_paths(response) == ["send_at"]
    assert count_rows(sql_conn) == 0


def test_send_at_without_timezone_is_422(client: httpx.Client, auth: Auth) -> None:
    naive = (datetime.now(UTC) + timedelta(hours=1)).replace(tzinfo=None).isoformat()
    response = client.post(SEND, json=text(send_at=naive), headers=auth())
    assert response.status_code == 422, response.text
    assert field_paths(response) == ["send_at"]


def test_expires_at_before_send_at_is_422(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    send_at = datetime.now(UTC) + timedelta(days=1)
    body = text(send_at=send_at.isoformat(), expires_at=(send_at - timedelta(hours=1)).isoformat())
    response = client.post(SEND, json=body, headers=auth())
    assert response.status_code == 422, response.text
    assert field_paths(response) == ["expires_at"]
    assert count_rows(sql_conn) == 0


def test_expires_at_after_send_at_is_stored(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    send_at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    expires_at = send_at + timedelta(hours=6)
    body = text(send_at=send_at.isoformat(), expires_at=expires_at.isoformat())
    response = client.post(SEND, json=body, headers=auth())
    assert response.status_code == 202, response.text
    stored_send_at, stored_expires_at, _, _ = _times(sql_conn, response.json()["task_id"])
    assert (stored_send_at, stored_expires_at) == (send_at, expires_at)


def test_the_owner_is_the_token_sub(
    client: httpx.Client, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    response = client.post(SEND, json=text(), headers=auth("service-billing"))
    assert response.status_code == 202, response.text
    assert count_rows(sql_conn, "service-billing") == 1
