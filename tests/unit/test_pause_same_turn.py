"""A sender-level error stops every buffered row of that sender, even one whose slot freed
in the same turn of the event loop (a provider answers many calls at once), while the
buffered rows of another sender still start."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from outbox.dispatcher import Dispatcher
from outbox.providers.base import OutgoingMessage, ProviderError
from outbox.retry import ErrorKind
from outbox.sender_providers import SenderProvider
from outbox.states import AttemptOutcome, MessageStatus
from outbox.store import Completion
from tests.unit.offline import claimed, offline_dispatcher, queued, stored_sender


class GatedProvider:
    """Each call waits for the test to answer it."""

    name = "gated"

    def __init__(self) -> None:
        self.calls: list[uuid.UUID] = []
        self.answers: dict[uuid.UUID, asyncio.Future[str]] = {}

    async def send(self, message: OutgoingMessage) -> str | None:
        self.calls.append(message.id)
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.answers[message.id] = answer
        return await answer


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_sender_error_starts_no_buffered_row_of_its_sender_but_others_still_start() -> None:
    provider = GatedProvider()
    # Sender A is `default`; sender B is a stored one, called through the same gated
    # provider (given, so never rebuilt from its settings).
    a1, a2, a3, a5 = (claimed(1) for _ in range(4))
    b4 = dataclasses.replace(claimed(1), sender="b")

    async def run() -> tuple[Dispatcher, list[Completion]]:
        dispatcher = offline_dispatcher(provider, dispatch_concurrency=2, sender_pause=30)
        providers = dispatcher.providers
        providers.directory.senders["b"] = stored_sender("b", "fake", {})
        providers._providers["b"] = SenderProvider("b", provider, None, None)
        lease_end = time.monotonic() + 60
        dispatcher.take([a1, a2, a3, b4, a5], lease_end)
        await turns(5)
        assert provider.calls == [a1.id, a2.id]
        # Both answers in one turn: A's first call sent (its slot frees first), its second
        # says the sender cannot send.
        provider.answers[a1.id].set_result("wamid.1")
        provider.answers[a2.id].set_exception(ProviderError(ErrorKind.SENDER, "token expired"))
        await turns(10)
        assert provider.calls == [a1.id, a2.id, b4.id]  # B goes on, A's others wait
        provider.answers[b4.id].set_result("wamid.4")
        await asyncio.sleep(0.05)  # the loop's next turns: the deferred outcomes
        return dispatcher, queued(dispatcher.executor)

    dispatcher, done = asyncio.run(run())
    assert dispatcher.buffered == 0 and dispatcher.slots_taken == 0
    by_id = {completion.id: completion for completion in done}
    assert set(by_id) == {a1.id, a2.id, a3.id, b4.id, a5.id}
    assert by_id[a1.id].status == by_id[b4.id].status == MessageStatus.SENT
    paused = by_id[a2.id]
    assert (paused.status, paused.outcome, paused.refund) == (
        MessageStatus.PENDING,
        AttemptOutcome.SENDER,
        1,
    )
    for row in (a3, a5):  # back uncalled, refunded, due at once: the claim skips them
        back = by_id[row.id]
        assert (back.status, back.outcome, back.error, back.refund) == (
            MessageStatus.PENDING,
            AttemptOutcome.INTERRUPTED,
            "sender paused",
            1,
        )
        assert back.next_attempt_at == back.finished_at
