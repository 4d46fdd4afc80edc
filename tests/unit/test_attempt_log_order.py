"""A call's log lines come in the order they happened, whatever the provider does."""

from __future__ import annotations

import asyncio
import time
import uuid

from structlog.testing import capture_logs

from outbox.dispatcher import Dispatcher
from outbox.providers.base import OutgoingMessage
from outbox.settings import Settings
from outbox.store import Claimed, Store


class RaisingProvider:
    """A provider with a bug: it raises before its first await."""

    name = "raising"

    async def send(self, message: OutgoingMessage) -> str | None:
        raise RuntimeError("provider bug")


def test_a_provider_that_raises_logs_after_the_attempt_started_line() -> None:
    async def attempt() -> list[str]:
        settings = Settings(database_url="postgresql://127.0.0.1/unused")
        # The store is never reached: outcomes only queue in the completer here.
        dispatcher = Dispatcher(settings, Store.__new__(Store), RaisingProvider())
        message = Claimed(
            id=uuid.uuid4(),
            user_id="user-1",
            to="5511999999999",
            type="text",
            payload={"body": "hi"},
            client_message_id=None,
            attempt=1,
            max_attempts=4,
            expires_at=None,
        )
        with capture_logs() as lines:
            await dispatcher._attempt(message, time.monotonic() + 60)
            await asyncio.sleep(0.05)  # the loop's next turns: the deferred lines
        return [line["event"] for line in lines]

    assert asyncio.run(attempt()) == [
        "attempt started",
        "provider raised unexpectedly",
        "attempt failed, will retry",
    ]
