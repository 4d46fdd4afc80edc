"""One way to wait for an event with a time limit."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Until `event` is set or `seconds` pass; True when it is set. Awaited in the
    caller's own task: a wake-up costs one turn of the loop, with no helper task to
    start, wait for and cancel (as `asyncio.wait_for` on 3.11 would)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()
