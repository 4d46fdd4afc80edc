"""A sender-level error stops every buffered row, even one whose slot freed in the same
turn of the event loop (a provider answers many calls at once)."""

from __future__ import annotations

import asyncio
import time

from outbox.dispatcher import Dispatcher
from outbox.providers.base import OutgoingMessage, ProviderError
from outbox.retry import ErrorKind
from tests.unit.offline import claimed, offline_dispatcher


class GatedProvider:
    """Each call waits for the test to answer it."""

    name = "gated"

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.answers: dict[int, asyncio.Future[str]] = {}

    async def send(self, message: OutgoingMessage) -> str | None:
        self.calls.append(message.attempt)
        answer = asyncio.get_running_loop().create_future()
        self.answers[message.attempt] = answer
        return await answer


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_call_ending_with_the_pausing_one_starts_no_buffered_row() -> None:
    provider = GatedProvider()

    async def run() -> Dispatcher:
        dispatcher = offline_dispatcher(provider, dispatch_concurrency=2, sender_pause=30)
        lease_end = time.monotonic() + 60
        dispatcher.take([claimed(n) for n in (1, 2, 3, 4)], lease_end)
        await turns(5)
        assert provider.calls == [1, 2]
        # Both answers in one turn: call 1 sent (its slot frees first), call 2 says the
        # sender cannot send.
        provider.answers[1].set_result("wamid.1")
        provider.answers[2].set_exception(ProviderError(ErrorKind.SENDER, "token expired"))
        await turns(10)
        return dispatcher

    dispatcher = asyncio.run(run())
    assert provider.calls == [1, 2]  # rows 3 and 4 were not called during the pause
    assert dispatcher.buffered == 0 and dispatcher.slots_taken == 0
