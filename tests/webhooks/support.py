"""Driving the receipt webhooks of a real server: Meta's payloads (fixtures after
../shared/whatsapp-cloud-api.md §6) and a gateway's, signed as each provider signs them,
and what the database holds afterwards."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import psycopg
from cryptography.fernet import Fernet
from psycopg.rows import dict_row

from outbox.sender_directory import SenderDirectory
from outbox.services import lifespan_services
from tests.scrape import scrape, value
from tests.support import ServerThread, wait_for

KEY = Fernet.generate_key().decode()
VERIFY_TOKEN = "meta-verify-token-42"
ENV_APP_SECRET = "env-app-secret-0123456789"
DEFAULT_SECRET = "default-gateway-secret"  # OUTBOX_PROVIDER_SECRET of `default` (http)
WHATSAPP = "/webhooks/whatsapp"
HTTP = "/webhooks/http"
SEND = "/api/v1/whatsapp/send"
SENDERS = "/api/v1/whatsapp/senders"
TO = "5511999999999"
PHONE_NUMBER_ID = "106540352242922"


def hub_signature(body: bytes, secret: str) -> str:
    """Meta's X-Hub-Signature-256, computed here independently of outbox's code."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def gateway_signature(body: bytes, secret: str, t: int | None = None) -> str:
    """X-Outbox-Signature-256 as a gateway computes it."""
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def wamid() -> str:
    return "wamid.HBgLNTUxMTk5OTk5OTk5FQIAERgS" + uuid.uuid4().hex.upper()


def status(
    state: str,
    at: int,
    *,
    provider_id: str | None = None,
    task_id: str | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One of Meta's `value.statuses`: the wamid, and the task id outbox sent as
    biz_opaque_callback_data when given."""
    entry: dict[str, Any] = {
        "id": provider_id or wamid(),
        "status": state,
        "timestamp": str(at),
        "recipient_id": TO,
    }
    if task_id is not None:
        entry["biz_opaque_callback_data"] = task_id
    if state in ("sent", "delivered"):
        entry["conversation"] = {
            "id": "0d6e1ab5a4b1a4bba1b5c0c3e0b8f0f1",
            "expiration_timestamp": str(at + 86400),
            "origin": {"type": "utility"},
        }
        entry["pricing"] = {"billable": True, "pricing_model": "PMP", "category": "utility"}
    if errors is not None:
        entry["errors"] = errors
    return entry


META_FAILURE = {
    "code": 131026,
    "title": "Message undeliverable",
    "message": "Message undeliverable",
    "error_data": {"details": "Message Undeliverable."},
    "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
}


def change(value: dict[str, Any], field: str = "messages") -> dict[str, Any]:
    return {"field": field, "value": value}


def messages_value(**parts: Any) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
        **parts,
    }


def notification(*changes: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": list(changes)}],
    }


def statuses(*entries: dict[str, Any]) -> dict[str, Any]:
    """A notification of these statuses, one change."""
    return notification(change(messages_value(statuses=list(entries))))


class Hooks:
    """One server (a real uvicorn running create_app), its client and its database."""

    def __init__(
        self,
        server: ServerThread,
        client: httpx.Client,
        auth: Callable[..., dict[str, str]],
        conn: psycopg.Connection,
    ) -> None:
        self.server = server
        self.client = client
        self.auth = auth
        self.conn = conn

    # Senders and messages ------------------------------------------------------------

    @property
    def directory(self) -> SenderDirectory:
        services = lifespan_services(self.server.server.lifespan.state)
        assert services is not None
        return services.senders

    def put_sender(self, sender_id: str, body: dict[str, Any], secret: tuple[str, str]) -> None:
        """PUT the sender as an admin; returns once this server holds its secret."""
        response = self.client.put(
            f"{SENDERS}/{sender_id}", json=body, headers=self.auth("root", admin=True)
        )
        assert response.status_code in (200, 201), response.text
        name, expected = secret

        def known() -> bool:
            sender = self.directory.get(sender_id)
            return sender is not None and sender.secrets.get(name) == expected

        wait_for(known, what=f"sender {sender_id} known with its {name}")

    def cloud_sender(self, sender_id: str, app_secret: str) -> None:
        body = {
            "provider": "cloud",
            "settings": {
                "phone_number_id": PHONE_NUMBER_ID,
                "access_token": f"EAAG-{sender_id}-token",
                "app_secret": app_secret,
            },
            "users": ["*"],
        }
        self.put_sender(sender_id, body, ("app_secret", app_secret))

    def http_sender(self, sender_id: str, secret: str) -> None:
        body = {
            "provider": "http",
            "settings": {"url": "http://127.0.0.1:9/gateway", "secret": secret},
            "users": ["*"],
        }
        self.put_sender(sender_id, body, ("secret", secret))

    def send(self, sender: str = "default") -> str:
        body = {"type": "text", "to": TO, "text": "hi", "sender": sender}
        response = self.client.post(SEND, json=body, headers=self.auth())
        assert response.status_code == 202, response.text
        task_id: str = response.json()["task_id"]
        return task_id

    def mark_sent(self, task_id: str, provider_id: str | None) -> None:
        """The provider accepted the call: what a dispatcher's completion writes (the
        status, the provider's id, the attempt, its `message_sent` event)."""
        self.finish(task_id, "sent", provider_id=provider_id)

    def finish(
        self,
        task_id: str,
        status: str,
        *,
        provider_id: str | None = None,
        last_error: str | None = None,
    ) -> None:
        with self.conn.transaction():
            self.conn.execute(
                """UPDATE outbox.messages
                   SET status = %s, provider_message_id = %s, last_error = %s, attempts = 1,
                       finished_at = now(), updated_at = now()
                   WHERE id = %s""",
                [status, provider_id, last_error, task_id],
            )
            self.conn.execute(
                """INSERT INTO outbox.attempts (message_id, attempt, started_at, finished_at,
                                                outcome, error, dispatcher)
                   VALUES (%s, 1, now(), now(), %s, %s, 'test')""",
                [task_id, "sent" if status == "sent" else "unknown", last_error],
            )
            self.conn.execute("SELECT outbox.write_events(ARRAY[%s]::uuid[])", [task_id])

    def sent_message(self, sender: str = "default") -> tuple[str, str]:
        """A message accepted by its provider: (task id, wamid)."""
        task_id = self.send(sender)
        provider_id = wamid()
        self.mark_sent(task_id, provider_id)
        return task_id, provider_id

    # Webhooks ------------------------------------------------------------------------

    def post_meta(
        self, document: Any, secret: str | None = ENV_APP_SECRET, **headers: str
    ) -> httpx.Response:
        body = document if isinstance(document, bytes) else orjson.dumps(document)
        sent = {"Content-Type": "application/json", **headers}
        if secret is not None:
            sent["X-Hub-Signature-256"] = hub_signature(body, secret)
        return self.client.post(WHATSAPP, content=body, headers=sent)

    def post_gateway(
        self, document: Any, secret: str = DEFAULT_SECRET, t: int | None = None
    ) -> httpx.Response:
        body = document if isinstance(document, bytes) else orjson.dumps(document)
        headers = {
            "Content-Type": "application/json",
            "X-Outbox-Signature-256": gateway_signature(body, secret, t),
        }
        return self.client.post(HTTP, content=body, headers=headers)

    # What the database holds ---------------------------------------------------------

    def row(self, task_id: str) -> dict[str, Any]:
        """The message as outbox.message_view shows it (its delivery columns included)."""
        with self.conn.cursor(row_factory=dict_row) as cur:
            found = cur.execute(
                "SELECT * FROM outbox.message_view WHERE id = %s", [task_id]
            ).fetchone()
        assert found is not None, task_id
        return found

    def events(self, task_id: str, kind: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """(event, data) of the message's events in id order (of one kind when given)."""
        rows = self.conn.execute(
            "SELECT event, data FROM outbox.events WHERE message_id = %s ORDER BY id", [task_id]
        ).fetchall()
        return [(event, data) for event, data in rows if kind is None or event == kind]

    def status_events(self, task_id: str) -> list[dict[str, Any]]:
        return [data for _, data in self.events(task_id, "message_status")]

    def receipts_counted(self, source: str, outcome: str) -> float:
        samples = scrape(f"{self.server.url}/metrics")
        return value(samples, "outbox_receipts_total", source=source, outcome=outcome)
