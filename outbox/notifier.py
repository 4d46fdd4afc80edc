"""LISTEN on a connection of its own (not from the pool), reconnected with backoff."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg
from psycopg import sql

from outbox.log import get_logger
from outbox.retry import Backoff

log = get_logger("outbox.notifier")

RECONNECT_MIN = 0.1
RECONNECT_MAX = 10.0


async def listen(
    conninfo: str,
    channel: str,
    on_notify: Callable[[str], None],
    *,
    on_connect: Callable[[], None] | None = None,
) -> None:
    """Call `on_notify(payload)` for every notification until cancelled.

    `on_connect` runs after each (re)connection: notifications sent while the
    connection was down are lost, so the caller should look for missed work.
    """
    backoff = Backoff(RECONNECT_MIN, RECONNECT_MAX)
    while True:
        lost: str | None = None  # why the connection ended, when it failed
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                backoff.reset()
                if on_connect is not None:
                    on_connect()
                async for notify in conn.notifies():
                    on_notify(notify.payload)
        except psycopg.Error as exc:
            lost = str(exc).strip()
        delay = backoff.next_delay()
        if lost is not None:
            log.warning("listen connection lost", channel=channel, error=lost, retry_in=delay)
        await asyncio.sleep(delay)
