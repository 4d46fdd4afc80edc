"""A dispatcher and an executor without a database, for tests of what happens inside one
process: the store is never reached, outcomes only queue in the completer."""

from __future__ import annotations

import uuid
from typing import Any

from outbox.completer import Completer
from outbox.dispatcher import Dispatcher
from outbox.executor import Executor
from outbox.metrics import DispatchMetrics
from outbox.providers.base import Provider
from outbox.sender_providers import SenderProviders
from outbox.settings import Settings
from outbox.store import Claimed, Store


def offline_settings(**settings: Any) -> Settings:
    return Settings(database_url="postgresql://127.0.0.1/unused", **settings)


def offline_providers(provider: Provider, settings: Settings) -> SenderProviders:
    """`provider` as the sender `default`'s; no other sender is known."""
    return SenderProviders(settings, Store.__new__(Store), default=provider)


def offline_dispatcher(provider: Provider, **settings: Any) -> Dispatcher:
    config = offline_settings(**settings)
    return Dispatcher(config, Store.__new__(Store), offline_providers(provider, config))


def offline_executor(provider: Provider, **settings: Any) -> Executor:
    config = offline_settings(**settings)
    metrics = DispatchMetrics()
    completer = Completer(Store.__new__(Store), "offline", metrics)
    return Executor(config, offline_providers(provider, config), completer, metrics)


def claimed(attempt: int = 1) -> Claimed:
    """A claimed text message on its `attempt`-th attempt of 4."""
    return Claimed(
        id=uuid.uuid4(),
        user_id="user-1",
        to="5511999999999",
        type="text",
        payload={"body": "hi"},
        client_message_id=None,
        attempt=attempt,
        max_attempts=4,
        expires_at=None,
        sender="default",
    )
