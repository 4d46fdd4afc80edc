"""A provider that accepts everything: the default of `outbox dev`, and for load tests."""

from __future__ import annotations

import asyncio
import random as _random
from collections.abc import Callable

from outbox.providers.base import OutgoingMessage, ProviderError, SettingError
from outbox.retry import ErrorKind


class FakeProvider:
    name = "fake"

    def __init__(
        self,
        *,
        latency_ms: float = 0.0,
        failure_rate: float = 0.0,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if not 0 <= failure_rate <= 1:
            raise SettingError("{} must be in [0, 1]", ["failure_rate"])
        self._latency = max(0.0, latency_ms) / 1000
        self._failure_rate = failure_rate
        self._random = random

    async def send(self, message: OutgoingMessage) -> str | None:
        if self._latency > 0:  # no sleep at all at 0 ms: a benchmark measures the dispatcher
            await asyncio.sleep(self._latency)
        # random() is in [0, 1): rate 1.0 always fails, 0.0 never does.
        if self._random() < self._failure_rate:
            raise ProviderError(ErrorKind.TRANSIENT, "fake: simulated transient failure")
        # 128 random bits, as unique as a uuid4 without its system call per id.
        return f"fake-{_random.getrandbits(128):032x}"
