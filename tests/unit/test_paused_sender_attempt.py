"""A row whose sender is paused by the time its attempt starts (it waited in the prefetch
buffer, or its claim raced the pause) goes back uncalled, refunded and due at once: the
claim then leaves it alone until the sender resumes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime
from typing import Any

from outbox.executor import Executor
from outbox.providers.base import OutgoingMessage
from outbox.sender_directory import KnownSender
from outbox.senders import SenderConfig
from outbox.states import AttemptOutcome, MessageStatus
from outbox.store import Completion
from tests.unit.offline import claimed, offline_executor


class CountingProvider:
    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, message: OutgoingMessage) -> str | None:
        self.calls += 1
        return "id"


def fake_sender(sender_id: str, paused: dict[str, Any] | None) -> KnownSender:
    now = datetime.now(UTC)
    config = SenderConfig(
        id=sender_id,
        provider="fake",
        settings={"latency_ms": 0.0, "failure_rate": 0.0},
        secrets_set=frozenset(),
        rate_limit=None,
        users=["*"],
        paused=paused,
        source="api",
        created_at=now,
        updated_at=now,
    )
    return KnownSender(config)


def queued(executor: Executor) -> list[Completion]:
    """The completions handed to the (offline) completer so far."""
    queue = executor.completer._queue
    return [queue.get_nowait() for _ in range(queue.qsize())]


def test_a_row_of_a_paused_sender_goes_back_uncalled_and_refunded() -> None:
    provider = CountingProvider()

    async def run() -> list[Completion]:
        executor = offline_executor(provider)
        directory = executor.providers.directory
        directory.senders["gw"] = fake_sender("gw", {"reason": "by hand", "manual": True})
        directory.senders["ok"] = fake_sender("ok", None)
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
