"""The lease reaper: rows whose lease ran out (their dispatcher died, or lost the database
for longer than the lease) go back to pending, their attempt recorded `lease_expired`; and
pending messages whose expires_at has passed end `error` "expired", those of a paused or
limited sender included, which no claim takes meanwhile; and parked messages that no
finalisation will release (two of one conversation finalised at the same moment) go on."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Iterable

import psycopg

from outbox.log import get_logger
from outbox.metrics import DispatchMetrics
from outbox.store import Store

log = get_logger("outbox.reaper")

MIN_INTERVAL = 0.05  # seconds between two looks, at least
MAX_INTERVAL = 30.0  # and at most


class Reaper:
    """Looks every quarter lease (jittered); `own_rows()` are this process's rows whose
    outcome is on its way, never reaped; `on_reaped()` runs when rows came back."""

    def __init__(
        self,
        store: Store,
        lease_seconds: float,
        metrics: DispatchMetrics,
        own_rows: Callable[[], Iterable[uuid.UUID]],
        on_reaped: Callable[[], None],
    ) -> None:
        self._store = store
        self._interval = max(MIN_INTERVAL, min(lease_seconds / 4, MAX_INTERVAL))
        self._metrics = metrics
        self._own_rows = own_rows
        self._on_reaped = on_reaped
        # Where the next sweep of parked rows starts (conversations visited in order).
        self._stranded_after: tuple[str, str] | None = None

    async def run(self) -> None:
        """Until cancelled; a statement that fails other than by the database being away
        (a bug, a missing privilege) ends it, and the dispatcher with it."""
        while True:
            await asyncio.sleep(self._interval * random.uniform(0.8, 1.2))
            # Never a row of ours: its outcome, a success perhaps, is on its way (a lease
            # runs out while the database is away). Other dispatchers' rows, and those of
            # a predecessor under the same id, are reaped as usual.
            keep = set(self._own_rows())
            try:
                reaped = await self._store.queue.reap_expired_leases(keep=keep)
                expired = await self._store.queue.expire_pending()
                released, self._stranded_after = await self._store.queue.release_stranded(
                    self._stranded_after
                )
            except psycopg.OperationalError as exc:
                log.warning("lease reaper failed", error=str(exc).strip())
                continue
            if expired:
                log.info("pending messages expired", count=expired)
            if released:
                log.warning("released parked messages nothing else would have", count=released)
            if reaped:
                self._metrics.leases_recovered.inc(reaped)
                log.warning("returned rows whose lease expired", count=reaped)
                self._on_reaped()
