"""Providers behind one small interface; `OUTBOX_PROVIDER` picks one."""

from __future__ import annotations

import httpx

from outbox.providers.base import OutgoingMessage, Provider, ProviderError
from outbox.providers.cloud import CloudProvider
from outbox.providers.fake import FakeProvider
from outbox.providers.http import HttpProvider
from outbox.settings import Settings

__all__ = [
    "CloudProvider",
    "FakeProvider",
    "HttpProvider",
    "OutgoingMessage",
    "Provider",
    "ProviderError",
    "create_provider",
]


def create_provider(settings: Settings, client: httpx.AsyncClient) -> Provider:
    """The configured provider, using the caller's shared client (its timeout and pool)."""
    match settings.provider:
        case "fake":
            return FakeProvider(
                latency_ms=settings.fake_latency_ms, failure_rate=settings.fake_failure_rate
            )
        case "http":
            return HttpProvider(
                client,
                url=settings.provider_url,
                secret=settings.provider_secret,
                max_response_bytes=settings.provider_max_response_bytes,
            )
        case "cloud":
            return CloudProvider(
                client,
                base_url=settings.cloud_base_url,
                api_version=settings.cloud_api_version,
                phone_number_id=settings.cloud_phone_number_id,
                token=settings.cloud_token,
                max_response_bytes=settings.provider_max_response_bytes,
            )
