"""WhatsApp Business Cloud API provider (facts: ../shared/whatsapp-cloud-api.md).

`POST {base}/{version}/{phone_number_id}/messages` with a bearer token. The Cloud
API has no idempotency key; `Idempotency-Key` is still sent (harmless, and useful to
a proxy in front of it), and the task id travels in `biz_opaque_callback_data` so
status webhooks can be matched to the row. Without that key a call that got no answer
after its request was written may have been sent: its outcome is `unknown`
(`base.transport_error`), retried or final per OUTBOX_UNKNOWN_OUTCOME.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from outbox.providers.base import (
    MAX_RESPONSE_BYTES,
    JsonPost,
    OutgoingMessage,
    ProviderError,
    ProviderResponse,
    SettingError,
    check_url,
    int_code,
    json_object,
    parse_retry_after,
    transport_error,
)
from outbox.retry import classify


class CloudProvider:
    name = "cloud"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        base_url: str,
        api_version: str,
        phone_number_id: str,
        token: str,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        if not phone_number_id or not token:
            raise SettingError(
                "the cloud provider needs {} and {}", ["phone_number_id", "access_token"]
            )
        check_url(base_url, "base_url")
        url = f"{base_url.rstrip('/')}/{api_version.strip('/')}/{phone_number_id}/messages"
        try:
            self._post = JsonPost(  # the URL parsed once
                client, httpx.URL(url), name=self.name, max_response_bytes=max_response_bytes
            )
        except httpx.InvalidURL as exc:  # a stray newline in a mounted secret, say
            raise SettingError(
                "{} or {} makes an invalid URL", ["phone_number_id", "api_version"], f": {exc}"
            ) from exc
        self._token = token

    def encode(self, message: OutgoingMessage) -> bytes:
        body = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": message.to,
            "type": message.type,
            message.type: message.payload,
            "biz_opaque_callback_data": str(message.id),
        }
        return orjson.dumps(body)

    async def send(self, message: OutgoingMessage) -> str | None:
        headers = {"Authorization": f"Bearer {self._token}", "Idempotency-Key": str(message.id)}
        try:
            response = await self._post(self.encode(message), headers)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc, self._post.client.timeout.read) from exc
        data = json_object(response.body)
        if response.is_success:
            return _message_id(data)
        raise _error(response, data)


def _message_id(data: dict[str, Any]) -> str | None:
    messages = data.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        provider_id = messages[0].get("id")
        if provider_id:
            return str(provider_id)
    return None  # accepted (2xx) without an id: still sent, nothing to record


def _error(response: ProviderResponse, data: dict[str, Any]) -> ProviderError:
    error = data.get("error")
    error = error if isinstance(error, dict) else {}
    code = int_code(error.get("code"))
    error_data = error.get("error_data")
    details = error_data.get("details") if isinstance(error_data, dict) else None
    text = "; ".join(str(part) for part in (error.get("message"), details) if part)
    head = f"cloud {code}" if code is not None else f"cloud http {response.status_code}"
    return ProviderError(
        classify(response.status_code, code),
        f"{head}: {text}" if text else head,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        code=code,
        http_status=response.status_code,
    )
