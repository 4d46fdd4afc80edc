"""A call's log lines come in the order they happened, whatever the provider does."""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from outbox.providers.base import OutgoingMessage
from tests.unit.offline import claimed, offline_executor


class RaisingProvider:
    """A provider with a bug: it raises before its first await."""

    name = "raising"

    async def send(self, message: OutgoingMessage) -> str | None:
        raise RuntimeError("provider bug")


def test_a_provider_that_raises_logs_after_the_attempt_started_line() -> None:
    async def attempt() -> list[str]:
        executor = offline_executor(RaisingProvider())
        message = claimed()
        with capture_logs() as lines:
            await executor.attempt(message, time.monotonic() + 60)
            await asyncio.sleep(0.05)  # the loop's next turns: the deferred lines
        return [line["event"] for line in lines]

    assert asyncio.run(attempt()) == [
        "attempt started",
        "provider raised unexpectedly",
        "attempt failed, will retry",
    ]
