"""Stopping the feed while its follower waits for the pool's first connection.

A second `make run` on a port in use stopped its feed about when the pool's first
connection came: when the cancellation reached the follower in the same turn of the
loop as that connection, psycopg_pool's wait (asyncio.wait_for on Python 3.11) returned
the connection instead of raising, the follower carried on, and the shutdown waited
for it forever. Here the stop is timed from the pool's `configure` hook, a few turns
of the loop after the connection is ready, so one of them lands in that turn."""

from __future__ import annotations

import asyncio
from typing import Any

from psycopg_pool import AsyncConnectionPool

from outbox import db
from outbox.auth import TokenVerifier
from outbox.feed import Feed
from outbox.settings import Settings
from outbox.store import Store

STOP_WITHIN = 3.0  # seconds; the follower honours its cancellation in milliseconds


async def stop_as_the_connection_arrives(settings: Settings, turns: int) -> float | None:
    """Start a feed, stop it `turns` loop turns after the pool's first connection is
    configured; how long the stop took (None: it did not end within STOP_WITHIN)."""
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []
    stopped = asyncio.Event()
    feed: Feed | None = None

    def stop_after(turns_left: int) -> None:
        if turns_left:
            loop.call_soon(stop_after, turns_left - 1)
        elif feed is not None and not stopping:
            stopping.append(asyncio.create_task(feed.stop()))
            stopped.set()

    async def configure(conn: Any) -> None:
        await db._configure_connection(conn)
        loop.call_soon(stop_after, turns)

    # As db.create_pool makes it, with a hook of the test's.
    pool = AsyncConnectionPool(
        settings.database_url,
        max_size=settings.db_pool_size,
        kwargs=db.connection_kwargs(settings),
        configure=configure,
        open=False,
    )
    await pool.open(wait=False)
    try:
        feed = Feed(settings, Store(pool), TokenVerifier(settings))
        feed.start()
        await stopped.wait()
        started = loop.time()
        done, _ = await asyncio.wait(stopping, timeout=STOP_WITHIN)
        if not done:
            for task in asyncio.all_tasks():  # let the test end: the feed's own tasks
                if task.get_name().startswith("feed-"):
                    task.cancel()
            return None
        return loop.time() - started
    finally:
        await pool.close()


def test_the_feed_stops_when_cancelled_as_its_first_connection_arrives(
    settings: Settings,
) -> None:
    async def each_moment() -> dict[int, float | None]:
        return {turns: await stop_as_the_connection_arrives(settings, turns) for turns in range(6)}

    took = asyncio.run(each_moment())
    stuck = [turns for turns, seconds in took.items() if seconds is None]
    assert stuck == [], f"stopped {stuck} turns after the connection: not ended in {STOP_WITHIN}s"
