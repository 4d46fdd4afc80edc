"""A dispatcher and an executor without a database, for tests of what happens inside one
process: the store is never reached, outcomes only queue in the completer."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from outbox.completer import Completer
from outbox.dispatcher import Dispatcher
from outbox.executor import Executor
from outbox.metrics import DispatchMetrics
from outbox.providers.base import OutgoingMessage, Provider
from outbox.sender_directory import KnownSender
from outbox.sender_providers import SenderProviders
from outbox.senders import SenderConfig
from outbox.settings import Settings
from outbox.store import Claimed, Completion, Store


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


def stored_sender(
    sender_id: str,
    provider: str,
    settings: dict[str, Any],
    secrets: dict[str, str] | None = None,
    paused: dict[str, Any] | None = None,
) -> KnownSender:
    """A stored sender as a dispatcher's directory knows it (put in `directory.senders`)."""
    now = datetime.now(UTC)
    config = SenderConfig(
        id=sender_id,
        provider=provider,
        settings=settings,
        secrets_set=frozenset(secrets or {}),
        rate_limit=None,
        users=["*"],
        paused=paused,
        source="api",
        created_at=now,
        updated_at=now,
    )
    return KnownSender(config, secrets or {})


def queued(executor: Executor) -> list[Completion]:
    """The completions handed to the (offline) completer so far, in order."""
    queue = executor.completer._queue
    return [queue.get_nowait() for _ in range(queue.qsize())]


class CountingProvider:
    """Sends everything, counting the calls."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, message: OutgoingMessage) -> str | None:
        self.calls += 1
        return f"id-{self.calls}"
