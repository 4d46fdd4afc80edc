"""Generic JSON webhook / self-hosted gateway provider, signed with HMAC-SHA256.

Request: `POST OUTBOX_PROVIDER_URL` with the JSON body
`{"task_id", "user_id", "to", "type", <type>: <content>, "client_message_id", "attempt"}`,
headers `Idempotency-Key: <task_id>` and, when `OUTBOX_PROVIDER_SECRET` is set,
`X-Outbox-Signature-256: t=<unix seconds>,v1=<hex HMAC-SHA256 of t + "." + body>` (a
receiver refuses a stale `t`, so a captured call cannot be replayed later) beside the
older `X-Outbox-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>`.
Response: any 2xx is success, with the provider id in an optional JSON `{"id": "..."}`.
Errors: classified by `outbox.retry.classify_gateway` from the status and the body's
`error` (a word such as "session_not_ready", or `{"code", "message"}`); `Retry-After`
(seconds or HTTP-date) is honoured.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import httpx
import orjson

from outbox.providers.base import (
    MAX_RESPONSE_BYTES,
    JsonPost,
    OutgoingMessage,
    ProviderError,
    ProviderResponse,
    check_url,
    int_code,
    json_object,
    parse_retry_after,
    transport_error,
)
from outbox.retry import classify_gateway

SIGNATURE_HEADER = "X-Outbox-Signature"
TIMESTAMPED_SIGNATURE_HEADER = "X-Outbox-Signature-256"


def sign(secret: str, body: bytes) -> str:
    """The older header's value; a receiver recomputes it over the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def sign_timestamped(secret: str, body: bytes, timestamp: int) -> str:
    """`t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>." + body>`: the timestamp is
    signed with the body, so a receiver that refuses old ones refuses replays."""
    signed = str(timestamp).encode() + b"." + body
    return f"t={timestamp},v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


class HttpProvider:
    name = "http"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        url: str,
        secret: str = "",
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        check_url(url, "url")
        # The URL parsed once.
        self._post = JsonPost(
            client, httpx.URL(url), name=self.name, max_response_bytes=max_response_bytes
        )
        self._secret = secret

    def encode(self, message: OutgoingMessage) -> bytes:
        body = {
            "task_id": str(message.id),
            "user_id": message.user_id,
            "to": message.to,
            "type": message.type,
            message.type: message.payload,
            "client_message_id": message.client_message_id,
            "attempt": message.attempt,
        }
        return orjson.dumps(body)

    async def send(self, message: OutgoingMessage) -> str | None:
        body = self.encode(message)
        headers = {"Idempotency-Key": str(message.id)}
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
            headers[TIMESTAMPED_SIGNATURE_HEADER] = sign_timestamped(
                self._secret, body, int(time.time())
            )
        try:
            response = await self._post(body, headers)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc, self._post.client.timeout.read) from exc
        data = json_object(response.body)
        if response.is_success:
            provider_id = data.get("id")
            return str(provider_id) if provider_id not in (None, "") else None
        raise _error(response, data)


def _error(response: ProviderResponse, data: dict[str, Any]) -> ProviderError:
    error = data.get("error")
    word: str | None = None
    code: int | None = None
    message = ""
    if isinstance(error, str):
        word = error
    elif isinstance(error, dict):
        code = int_code(error.get("code"))
        if code is None and isinstance(error.get("code"), str):
            word = error["code"]
        message = str(error.get("message") or "")
    label = word if word is not None else code
    detail = ": ".join(str(part) for part in (label, message) if part is not None and part != "")
    return ProviderError(
        classify_gateway(response.status_code, label),
        f"http {response.status_code}" + (f": {detail}" if detail else ""),
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        code=code,
        http_status=response.status_code,
    )
