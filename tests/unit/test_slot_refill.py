"""A slot whose call ends starts the next buffered row in the same turn of the loop."""

from __future__ import annotations

import asyncio
import time
import uuid

from outbox.dispatcher import Dispatcher
from outbox.providers.base import OutgoingMessage
from outbox.settings import Settings
from outbox.store import Claimed, Store


class TurnMarkingProvider:
    """Ends each call by asking the loop for a callback on its next turn: whatever
    runs before that callback ran in the turn in which the call ended."""

    name = "turn-marking"

    def __init__(self) -> None:
        self.trace: list[str] = []

    async def send(self, message: OutgoingMessage) -> str | None:
        self.trace.append(f"start {message.attempt}")
        await asyncio.sleep(0)
        asyncio.get_running_loop().call_soon(self.trace.append, f"turn after {message.attempt}")
        return f"id-{message.attempt}"


def claimed(attempt: int) -> Claimed:
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


def test_the_next_buffered_row_starts_in_the_turn_the_call_ended() -> None:
    provider = TurnMarkingProvider()

    async def run() -> int:
        settings = Settings(database_url="postgresql://127.0.0.1/unused", dispatch_concurrency=1)
        # The store is never reached: outcomes only queue in the completer here.
        dispatcher = Dispatcher(settings, Store.__new__(Store), provider)
        lease_end = time.monotonic() + 60
        dispatcher._buffer.extend((claimed(n), lease_end) for n in (1, 2, 3))
        dispatcher._start_buffered()
        while dispatcher._running:  # the tasks of the slot, however many there are
            await asyncio.gather(*list(dispatcher._running))
        return dispatcher._slots_taken

    assert asyncio.run(run()) == 0  # the slot is free again
    # A task per row would start the next call a turn later, after the callback.
    assert provider.trace[:4] == ["start 1", "start 2", "turn after 1", "start 3"]
