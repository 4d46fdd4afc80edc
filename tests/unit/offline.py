"""A Dispatcher without a database, for tests of what happens inside one process: the
store is never reached, outcomes only queue in its completer."""

from __future__ import annotations

import uuid
from typing import Any

from outbox.dispatcher import Dispatcher
from outbox.providers.base import Provider
from outbox.settings import Settings
from outbox.store import Claimed, Store


def offline_dispatcher(provider: Provider, **settings: Any) -> Dispatcher:
    config = Settings(database_url="postgresql://127.0.0.1/unused", **settings)
    return Dispatcher(config, Store.__new__(Store), provider)


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
    )
