"""A row whose sender is paused by the time its attempt starts (it waited in the prefetch
buffer, or its claim raced the pause) goes back uncalled, refunded and due at once: the
claim then leaves it alone until the sender resumes."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from outbox.states import AttemptOutcome, MessageStatus
from outbox.store import Completion
from tests.unit.offline import CountingProvider, claimed, offline_executor, queued, stored_sender

FAKE = {"latency_ms": 0.0, "failure_rate": 0.0}


def test_a_row_of_a_paused_sender_goes_back_uncalled_and_refunded() -> None:
    provider = CountingProvider()

    async def run() -> list[Completion]:
        executor = offline_executor(provider)
        directory = executor.providers.directory
        directory.senders["gw"] = stored_sender("gw", "fake", FAKE, paused={"reason": "why"})
        directory.senders["ok"] = stored_sender("ok", "fake", FAKE)
        lease_end = time.monotonic() + 60
        await executor.attempt(dataclasses.replace(claimed(), sender="gw"), lease_end)
        await executor.attempt(dataclasses.replace(claimed(), sender="ok"), lease_end)
        await executor.attempt(claimed(), lease_end)  # default: never paused
        await asyncio.sleep(0.05)  # the loop's next turns: the deferred outcomes
        return queued(executor)

    held, sent_ok, sent_default = asyncio.run(run())
    assert provider.calls == 1  # default's; "ok" has a fake provider of its own
    assert (held.sender, held.status, held.outcome) == (
        "gw",
        MessageStatus.PENDING,
        AttemptOutcome.INTERRUPTED,
    )
    assert held.error == "sender paused" and held.refund == 1
    assert held.next_attempt_at == held.finished_at  # due now: the claim skips it
    assert (sent_ok.sender, sent_ok.status) == ("ok", MessageStatus.SENT)
    assert (sent_default.sender, sent_default.status) == ("default", MessageStatus.SENT)
