"""The senders' admin API on a real server and database: create, replace, read, pause,
resume and delete; the environment's read-only `default`; credentials encrypted at rest
with OUTBOX_SECRET_KEY (rotation included) and never shown."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from cryptography.fernet import Fernet, InvalidToken

from tests.integration.conftest import ClientFactory

SENDERS = "/api/v1/whatsapp/senders"
KEY = Fernet.generate_key().decode()
TOKEN = "EAAGplainTokenOfTheCloudApi1234567890"
APP_SECRET = "appSecretOfTheMetaApp0987654321"
HTTP_SECRET = "hmacKeyOfTheGateway-5f2c9e"

Auth = Callable[..., dict[str, str]]


def cloud(**settings: Any) -> dict[str, Any]:
    return {
        "provider": "cloud",
        "settings": {
            "phone_number_id": "106540352242922",
            "access_token": TOKEN,
            "app_secret": APP_SECRET,
            **settings,
        },
        "users": ["*"],
    }


def http_sender(**settings: Any) -> dict[str, Any]:
    return {
        "provider": "http",
        "settings": {"url": "https://gateway.example.com/send", "secret": HTTP_SECRET, **settings},
        "users": ["user-1", "user-2"],
    }


@pytest.fixture
def admin(client_with: ClientFactory, auth: Auth) -> Iterator[httpx.Client]:
    """A server with a secret key, and an admin's headers on every request."""
    with client_with(secret_key=KEY) as http:
        http.headers.update(auth("root", admin=True))
        yield http


def secrets_row(conn: psycopg.Connection, sender_id: str) -> tuple[Any, ...]:
    row = conn.execute(
        "SELECT secrets, secret_fields, settings::text, row_to_json(s)::text"
        " FROM outbox.senders s WHERE id = %s",
        [sender_id],
    ).fetchone()
    assert row is not None
    return tuple(row)


def never_shown(text: str | bytes, *secrets: str) -> None:
    """None of `secrets` appears in `text` in plain, hex or base64 (either alphabet)."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    for secret in secrets:
        raw = secret.encode()
        forms = [
            raw,
            raw.hex().encode(),
            raw.hex().upper().encode(),
            base64.b64encode(raw).rstrip(b"="),
            base64.urlsafe_b64encode(raw).rstrip(b"="),
        ]
        for form in forms:
            assert form not in data, f"a form of {secret[:4]}… appears"


def test_a_cloud_sender_is_created_replaced_paused_resumed_and_deleted(
    admin: httpx.Client, sql_conn: psycopg.Connection
) -> None:
    created = admin.put(f"{SENDERS}/acme-main", json=cloud())
    assert created.status_code == 201, created.text
    view = created.json()
    assert view["id"] == "acme-main"
    assert view["provider"] == "cloud"
    assert view["settings"] == {
        "phone_number_id": "106540352242922",
        "api_version": "v21.0",
        "base_url": "https://graph.facebook.com",
        "access_token": {"set": True},
        "app_secret": {"set": True},
    }
    assert view["rate_limit"] == 80 and view["effective_rate"] == 80  # the Cloud API's
    assert view["state"] == "active" and view["paused"] is None
    assert (view["pending"], view["in_flight"]) == (0, 0)
    assert view["source"] == "api" and view["created_at"] and view["updated_at"]

    # A replace without credentials keeps the stored ones, token for token.
    token_before = secrets_row(sql_conn, "acme-main")[0]
    replaced = admin.put(
        f"{SENDERS}/acme-main",
        json={
            "provider": "cloud",
            "settings": {"phone_number_id": "999", "api_version": "v22.0"},
            "rate_limit": None,
            "users": ["user-1"],
        },
    )
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["settings"]["access_token"] == {"set": True}
    assert replaced.json()["settings"]["phone_number_id"] == "999"
    assert replaced.json()["rate_limit"] is None  # null: unlimited
    assert replaced.json()["users"] == ["user-1"]
    assert bytes(secrets_row(sql_conn, "acme-main")[0]) == bytes(token_before)

    one = admin.get(f"{SENDERS}/acme-main")
    assert one.status_code == 200 and one.json() == replaced.json()
    listing = admin.get(SENDERS)
    assert listing.status_code == 200
    assert [s["id"] for s in listing.json()["senders"]] == ["default", "acme-main"]

    paused = admin.post(f"{SENDERS}/acme-main/pause", json={"reason": "token rotation"})
    assert paused.status_code == 200, paused.text
    state = paused.json()
    assert state["state"] == "paused"
    assert state["paused"]["reason"] == "token rotation"
    assert state["paused"]["manual"] is True
    assert state["paused"]["code"] is None and state["paused"]["until"] is None
    since = state["paused"]["since"]
    assert since.endswith("Z")
    # Paused again (no body): the reason changes, `since` stays. A replace keeps the pause.
    again = admin.post(f"{SENDERS}/acme-main/pause")
    assert again.status_code == 200
    assert again.json()["paused"]["since"] == since
    assert again.json()["paused"]["reason"] == "paused by hand"
    kept = admin.put(f"{SENDERS}/acme-main", json=cloud())
    assert kept.status_code == 200 and kept.json()["state"] == "paused"

    resumed = admin.post(f"{SENDERS}/acme-main/resume")
    assert resumed.status_code == 200
    assert resumed.json()["state"] == "active" and resumed.json()["paused"] is None

    deleted = admin.delete(f"{SENDERS}/acme-main")
    assert deleted.status_code == 204 and deleted.content == b""
    for method, path in (
        ("GET", ""),
        ("DELETE", ""),
        ("POST", "/pause"),
        ("POST", "/resume"),
    ):
        gone = admin.request(method, f"{SENDERS}/acme-main{path}")
        assert gone.status_code == 404, (method, path, gone.text)
        assert gone.json()["error"]["code"] == "not_found"
    assert [s["id"] for s in admin.get(SENDERS).json()["senders"]] == ["default"]


def test_http_and_fake_senders_take_their_own_settings_and_defaults(
    admin: httpx.Client,
) -> None:
    http = admin.put(f"{SENDERS}/gateway_1", json=http_sender())
    assert http.status_code == 201, http.text
    assert http.json()["settings"] == {
        "url": "https://gateway.example.com/send",
        "secret": {"set": True},
    }
    assert http.json()["rate_limit"] is None  # unlimited unless given
    assert http.json()["users"] == ["user-1", "user-2"]
    fake = admin.put(f"{SENDERS}/fake", json={"provider": "fake", "rate_limit": 5})
    assert fake.status_code == 201, fake.text
    assert fake.json()["settings"] == {"latency_ms": 0, "failure_rate": 0}
    assert fake.json()["rate_limit"] == 5 and fake.json()["users"] == ["*"]
    # A sender whose provider changes needs the new provider's credentials.
    switched = admin.put(
        f"{SENDERS}/fake", json={"provider": "http", "settings": {"url": "https://a.example"}}
    )
    assert switched.status_code == 422
    assert switched.json()["error"]["fields"][0]["path"] == "settings.secret"
    switched = admin.put(f"{SENDERS}/gateway_1", json=cloud(access_token=None, app_secret=None))
    assert switched.status_code == 422
    assert [f["path"] for f in switched.json()["error"]["fields"]] == ["settings.access_token"]


def test_sender_rate_setting_is_the_default_limit(client_with: ClientFactory, auth: Auth) -> None:
    with client_with(secret_key=KEY, sender_rate=12.5) as http:
        headers = auth("root", admin=True)
        assert http.get(f"{SENDERS}/default", headers=headers).json()["rate_limit"] == 12.5
        created = http.put(f"{SENDERS}/c", json=cloud(), headers=headers)
        assert created.json()["rate_limit"] == 12.5


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/Bad-Id", cloud(), "id"),
        ("/" + "a" * 65, cloud(), "id"),
        ("/ok", {"settings": {}}, "provider"),
        ("/ok", {"provider": "sms", "settings": {}}, "provider"),
        ("/ok", cloud(base_url="http://graph.example.com"), "settings.base_url"),
        ("/ok", cloud(base_url="ftp://graph.example.com"), "settings.base_url"),
        ("/ok", cloud(phone_number_id="12a"), "settings.phone_number_id"),
        ("/ok", cloud(access_token="has space"), "settings.access_token"),
        ("/ok", cloud(extra="x"), "settings.extra"),
        ("/ok", {**cloud(), "rate_limit": 0}, "rate_limit"),
        ("/ok", {**cloud(), "users": "*"}, "users"),
        ("/ok", {**cloud(), "colour": "red"}, "colour"),
        ("/ok", http_sender(secret=None), "settings.secret"),
        ("/ok", http_sender(url="gateway.example.com"), "settings.url"),
        ("/ok", {"provider": "fake", "settings": {"failure_rate": 2}}, "settings.failure_rate"),
    ],
)
def test_a_bad_id_or_body_is_422_naming_the_field(
    admin: httpx.Client, path: str, body: dict[str, Any], field: str
) -> None:
    answer = admin.put(SENDERS + path, json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "validation_error"
    assert field in [f["path"] for f in error["fields"]], error
    assert admin.get(SENDERS + path).status_code == 404


def test_a_loopback_cloud_base_url_may_be_plain_http(admin: httpx.Client) -> None:
    answer = admin.put(f"{SENDERS}/local", json=cloud(base_url="http://127.0.0.1:8080/graph"))
    assert answer.status_code == 201, answer.text


def test_no_token_is_401_and_a_user_token_403_on_every_route(
    admin: httpx.Client, auth: Auth
) -> None:
    routes = [
        ("GET", SENDERS, None),
        ("GET", f"{SENDERS}/default", None),
        ("PUT", f"{SENDERS}/x", cloud()),
        ("DELETE", f"{SENDERS}/x", None),
        ("POST", f"{SENDERS}/x/pause", None),
        ("POST", f"{SENDERS}/x/resume", None),
    ]
    for method, path, body in routes:
        anonymous = admin.request(method, path, json=body, headers={"Authorization": ""})
        assert anonymous.status_code == 401, (method, path)
        assert anonymous.json()["error"]["code"] == "unauthorized"
        assert "WWW-Authenticate" in anonymous.headers
        user = admin.request(method, path, json=body, headers=auth("user-1"))
        assert user.status_code == 403, (method, path)
        assert user.json()["error"]["code"] == "forbidden"
    assert admin.get(f"{SENDERS}/x").status_code == 404  # nothing was created


def test_default_is_the_environments_and_read_only(admin: httpx.Client) -> None:
    view = admin.get(f"{SENDERS}/default")
    assert view.status_code == 200
    assert view.json()["provider"] == "fake"
    assert view.json()["source"] == "environment"
    assert view.json()["rate_limit"] is None  # a fake default stays unlimited
    assert view.json()["settings"] == {"latency_ms": 0, "failure_rate": 0}
    # Its configuration is the environment's; its pause is not (test_api_senders.py).
    for method, path, body in (
        ("PUT", "", cloud()),
        ("DELETE", "", None),
    ):
        answer = admin.request(method, f"{SENDERS}/default{path}", json=body)
        assert answer.status_code == 409, (method, answer.text)
        assert "environment" in answer.json()["error"]["message"]


def test_an_http_default_shows_its_settings_but_not_its_secret(
    client_with: ClientFactory, auth: Auth
) -> None:
    env_secret = "environmentHmacSecret-77"
    with client_with(
        provider="http", provider_url="http://gw.internal:9000/send", provider_secret=env_secret
    ) as http:
        answer = http.get(f"{SENDERS}/default", headers=auth("root", admin=True))
        assert answer.status_code == 200
        assert answer.json()["settings"] == {
            "url": "http://gw.internal:9000/send",
            "secret": {"set": True},
        }
        assert answer.json()["rate_limit"] is None
        never_shown(answer.content, env_secret)
        listing = http.get(SENDERS, headers=auth("root", admin=True))
        never_shown(listing.content, env_secret)


def test_credentials_are_stored_encrypted_and_never_answered(
    admin: httpx.Client, sql_conn: psycopg.Connection
) -> None:
    answers = [
        admin.put(f"{SENDERS}/cloud-1", json=cloud()),
        admin.put(f"{SENDERS}/http-1", json=http_sender()),
        admin.get(SENDERS),
        admin.get(f"{SENDERS}/cloud-1"),
        admin.post(f"{SENDERS}/http-1/pause"),
    ]
    for answer in answers:
        assert answer.status_code in (200, 201), answer.text
        never_shown(answer.content, TOKEN, APP_SECRET, HTTP_SECRET)
    token, fields, settings, whole = secrets_row(sql_conn, "cloud-1")
    assert fields == ["access_token", "app_secret"]
    for text in (bytes(token), settings, whole):
        never_shown(text, TOKEN, APP_SECRET)
    assert orjson.loads(Fernet(KEY.encode()).decrypt(bytes(token))) == {
        "access_token": TOKEN,
        "app_secret": APP_SECRET,
    }
    token, fields, settings, whole = secrets_row(sql_conn, "http-1")
    assert fields == ["secret"]
    for text in (bytes(token), settings, whole):
        never_shown(text, HTTP_SECRET)


def test_a_second_key_rotates_the_credentials(
    client_with: ClientFactory, auth: Auth, sql_conn: psycopg.Connection
) -> None:
    old, new = KEY, Fernet.generate_key().decode()
    headers = auth("root", admin=True)
    with client_with(secret_key=old) as http:
        assert http.put(f"{SENDERS}/c", json=cloud(), headers=headers).status_code == 201
    with client_with(secret_key=f"{new}, {old}") as http:
        # Only the app secret given: the token kept is decrypted with the old key (second
        # in the list), and both are written again with the new one (first).
        body = cloud(access_token=None, app_secret="rotatedAppSecret")
        replaced = http.put(f"{SENDERS}/c", json=body, headers=headers)
        assert replaced.status_code == 200, replaced.text
    token = bytes(secrets_row(sql_conn, "c")[0])
    assert orjson.loads(Fernet(new.encode()).decrypt(token)) == {
        "access_token": TOKEN,
        "app_secret": "rotatedAppSecret",
    }
    with pytest.raises(InvalidToken):
        Fernet(old.encode()).decrypt(token)
    with client_with(secret_key=Fernet.generate_key().decode()) as http:
        # A key that decrypts nothing stored: a replace that must merge is refused.
        body = cloud(access_token=None, app_secret="another")
        refused = http.put(f"{SENDERS}/c", json=body, headers=headers)
        assert refused.status_code == 503, refused.text
        assert "OUTBOX_SECRET_KEY" in refused.json()["error"]["message"]


def test_without_a_key_a_put_is_503_naming_the_setting(client: httpx.Client, auth: Auth) -> None:
    headers = auth("root", admin=True)
    answer = client.put(f"{SENDERS}/fake-1", json={"provider": "fake"}, headers=headers)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "unavailable"
    assert "OUTBOX_SECRET_KEY" in answer.json()["error"]["message"]
    # Reading needs no key: a deployment that sets nothing new works as before.
    assert [s["id"] for s in client.get(SENDERS, headers=headers).json()["senders"]] == ["default"]


def test_delete_is_409_while_the_sender_has_live_messages(
    admin: httpx.Client, sql_conn: psycopg.Connection
) -> None:
    assert admin.put(f"{SENDERS}/bulk", json={"provider": "fake"}).status_code == 201
    message_id = str(uuid.uuid4())
    sql_conn.execute(
        """INSERT INTO outbox.messages
               (id, user_id, "to", type, payload, request_hash, max_attempts, sender)
           VALUES (%s, 'user-1', '5511999999999', 'text', '{"body": "hi"}', '\\x00', 4,
                   'bulk')""",
        [message_id],
    )
    view = admin.get(f"{SENDERS}/bulk").json()
    assert (view["pending"], view["in_flight"]) == (1, 0)
    refused = admin.delete(f"{SENDERS}/bulk")
    assert refused.status_code == 409, refused.text
    assert "1 pending" in refused.json()["error"]["message"]
    sql_conn.execute("UPDATE outbox.messages SET status = 'in_flight' WHERE id = %s", [message_id])
    assert admin.get(f"{SENDERS}/bulk").json()["in_flight"] == 1
    assert admin.delete(f"{SENDERS}/bulk").status_code == 409
    sql_conn.execute(
        "UPDATE outbox.messages SET status = 'sent', finished_at = now() WHERE id = %s",
        [message_id],
    )
    assert admin.delete(f"{SENDERS}/bulk").status_code == 204
    # The finished message keeps its sender's id.
    kept = sql_conn.execute("SELECT sender FROM outbox.messages WHERE id = %s", [message_id])
    assert kept.fetchone() == ("bulk",)


def test_the_default_senders_counts_are_of_messages_that_name_none(
    admin: httpx.Client, sql_conn: psycopg.Connection
) -> None:
    sql_conn.execute(
        """INSERT INTO outbox.messages
               (id, user_id, "to", type, payload, request_hash, max_attempts)
           VALUES (%s, 'user-1', '5511999999999', 'text', '{"body": "hi"}', '\\x00', 4)""",
        [str(uuid.uuid4())],
    )
    assert admin.get(f"{SENDERS}/default").json()["pending"] == 1


def test_no_repr_shows_a_credential() -> None:
    from outbox.senders import SENDER_REQUEST, Keyring
    from outbox.settings import Settings

    shown = [
        repr(SENDER_REQUEST.validate_python(cloud())),
        repr(SENDER_REQUEST.validate_python(http_sender())),
        repr(Keyring(KEY)),
        repr(Settings(secret_key=KEY)),
    ]
    never_shown("\n".join(shown), TOKEN, APP_SECRET, HTTP_SECRET, KEY)


def test_every_change_is_announced_on_outbox_senders(
    admin: httpx.Client, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN outbox_senders")
        changes = [
            lambda: admin.put(f"{SENDERS}/n", json={"provider": "fake"}),
            lambda: admin.put(f"{SENDERS}/n", json={"provider": "fake", "rate_limit": 3}),
            lambda: admin.post(f"{SENDERS}/n/pause"),
            lambda: admin.post(f"{SENDERS}/n/resume"),
            lambda: admin.delete(f"{SENDERS}/n"),
        ]
        for change in changes:
            assert change().status_code in (200, 201, 204)
            heard = list(listener.notifies(timeout=10, stop_after=1))
            assert [n.channel for n in heard] == ["outbox_senders"]
