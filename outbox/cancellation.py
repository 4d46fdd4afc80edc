"""Stopping long-lived tasks for sure, though a library may swallow one cancellation.

On Python 3.11, `asyncio.wait_for` returns the result instead of raising when the
cancellation and the result arrive in the same turn of the loop (fixed in 3.12).
psycopg_pool waits for a connection that way: a task cancelled just as its connection
arrived carries on, and a loop then waits for its next wake-up forever (the feed's
follower did, and so did every shutdown that awaited it). psycopg, cancelled during a
query, waits up to 10 s for the server to confirm; a second cancellation cuts that short.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

# Between two cancellations of a task that has not ended: long enough for a clean exit
# (a query's cancel request is a round trip), short enough to go unnoticed at shutdown.
RECANCEL_AFTER = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and return once every one has ended, cancelling again those that
    are still running after RECANCEL_AFTER. Their results and exceptions are dropped;
    a cancellation of the caller itself is not (it stops waiting, the tasks go on ending)."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_AFTER)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
