"""A sender whose settings make no provider: a stored one is refused with a reason that
names its settings (never the environment's variables), built once per version of its
settings rather than once per message; the environment's `default` stops the start
naming the variables to fix. A sender whose credentials do not decrypt is refused at
once: reading the senders again cannot mend a key mismatch."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from outbox.providers import CloudProvider
from outbox.sender_directory import KnownSender
from outbox.sender_providers import SenderProviders, UnknownSender
from outbox.states import AttemptOutcome, MessageStatus
from outbox.store import Completion, Store
from tests.unit.offline import (
    CountingProvider,
    claimed,
    offline_executor,
    offline_settings,
    queued,
    stored_sender,
)

CLOUD = {"phone_number_id": "123", "api_version": "v21.0", "base_url": "https://graph.facebook.com"}


def cloud_sender(settings: dict[str, Any], secrets: dict[str, str]) -> KnownSender:
    return stored_sender("cl", "cloud", settings, secrets)


def test_a_stored_sender_that_makes_no_provider_is_refused_once_per_version() -> None:
    async def run() -> list[str]:
        providers = SenderProviders(offline_settings(provider="fake"), Store.__new__(Store))
        directory = providers.directory
        reasons: list[str] = []
        with capture_logs() as lines:
            directory.senders["cl"] = cloud_sender(CLOUD, {})  # no access_token
            for _ in range(3):  # as many messages: built once
                with pytest.raises(UnknownSender) as refused:
                    providers.acquire("cl")
                reasons.append(refused.value.reason)
            # Another version of its settings, still without a token: built again.
            directory.senders["cl"] = cloud_sender({**CLOUD, "phone_number_id": "456"}, {})
            with pytest.raises(UnknownSender):
                providers.acquire("cl")
            # Given its token: a provider at last.
            directory.senders["cl"] = cloud_sender(CLOUD, {"access_token": "tok"})
            held = providers.acquire("cl")
            assert isinstance(held.provider, CloudProvider)
            providers.release(held)
        await providers.aclose()
        failures = [line for line in lines if line["event"].startswith("sender cannot be used")]
        assert [line["sender"] for line in failures] == ["cl", "cl"]
        return reasons

    reasons = asyncio.run(run())
    assert (
        reasons
        == ["sender 'cl' cannot be used: the cloud provider needs phone_number_id and access_token"]
        * 3
    )


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (
            {"provider": "cloud", "cloud_phone_number_id": "", "cloud_token": "tok"},
            "the cloud provider needs OUTBOX_CLOUD_PHONE_NUMBER_ID and OUTBOX_CLOUD_TOKEN",
        ),
        (
            {"provider": "cloud", "cloud_phone_number_id": "1\n2", "cloud_token": "tok"},
            "OUTBOX_CLOUD_PHONE_NUMBER_ID or OUTBOX_CLOUD_API_VERSION makes an invalid URL",
        ),
        (
            {"provider": "http", "provider_url": "gw.local/send", "provider_secret": "s"},
            "OUTBOX_PROVIDER_URL must be an http:// or https:// URL",
        ),
    ],
    ids=["cloud-missing", "cloud-invalid-url", "http-url"],
)
def test_the_environments_sender_names_the_variables_to_fix(
    settings: dict[str, Any], named: str
) -> None:
    async def build() -> None:
        SenderProviders(offline_settings(**settings), Store.__new__(Store))

    with pytest.raises(ValueError) as refused:
        asyncio.run(build())
    assert not isinstance(refused.value, UnknownSender)
    assert str(refused.value).startswith(named)


def test_a_sender_left_out_is_refused_at_once_without_reading_the_senders_again() -> None:
    async def run() -> tuple[int, list[Completion]]:
        executor = offline_executor(CountingProvider())
        directory = executor.providers.directory
        directory.left_out = frozenset({"foreign"})  # as a read that could not decrypt it
        message = dataclasses.replace(claimed(), sender="foreign")
        await executor.attempt(message, time.monotonic() + 60)
        return directory.reads, queued(executor)

    reads, [refused] = asyncio.run(run())
    assert reads == 0  # the offline store would have failed a read: handed back
    assert (refused.status, refused.outcome, refused.refund) == (
        MessageStatus.ERROR,
        AttemptOutcome.PERMANENT,
        1,
    )
    assert refused.error == (
        "sender 'foreign' cannot be used: its credentials do not decrypt with this"
        " dispatcher's OUTBOX_SECRET_KEY"
    )
