"""Providers behind one small interface; each sender names one (`OUTBOX_PROVIDER` the
sender `default`'s)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from outbox.providers.base import MAX_RESPONSE_BYTES, OutgoingMessage, Provider, ProviderError
from outbox.providers.cloud import CloudProvider
from outbox.providers.fake import FakeProvider
from outbox.providers.http import HttpProvider

__all__ = [
    "CloudProvider",
    "FakeProvider",
    "HttpProvider",
    "OutgoingMessage",
    "Provider",
    "ProviderError",
    "build_provider",
]


def build_provider(
    kind: str,
    settings: Mapping[str, Any],
    secrets: Mapping[str, str],
    client: httpx.AsyncClient | None,
    *,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
) -> Provider:
    """A provider of `kind` (cloud, http, fake) from a sender's plain settings and its
    credentials, calling through `client` (its timeout and pool; a fake provider needs
    none). The environment's provider and a stored sender's both come from here."""
    if kind == "fake":
        return FakeProvider(
            latency_ms=float(settings.get("latency_ms", 0.0)),
            failure_rate=float(settings.get("failure_rate", 0.0)),
        )
    if client is None:
        raise ValueError(f"the {kind} provider calls through an HTTP client")
    match kind:
        case "http":
            return HttpProvider(
                client,
                url=str(settings.get("url") or ""),
                secret=secrets.get("secret", ""),
                max_response_bytes=max_response_bytes,
            )
        case "cloud":
            return CloudProvider(
                client,
                base_url=str(settings.get("base_url") or ""),
                api_version=str(settings.get("api_version") or ""),
                phone_number_id=str(settings.get("phone_number_id") or ""),
                token=secrets.get("access_token", ""),
                max_response_bytes=max_response_bytes,
            )
    raise ValueError(f"unknown provider {kind!r}")
