"""The purge: retention applied in short committed batches (`outbox purge` and the job)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from outbox.log import get_logger
from outbox.settings import Settings
from outbox.store import PurgeCounts, PurgeCutoffs, Store

log = get_logger("outbox.purge")


async def cutoffs(
    store: Store,
    settings: Settings,
    older_than: float | None = None,
    *,
    now: datetime | None = None,
) -> PurgeCutoffs:
    """The run's cutoffs as of `now` (the database clock when None); `older_than` overrides
    the error retention."""
    return await store.jobs.purge_cutoffs(
        settings.error_retention if older_than is None else older_than,
        settings.sent_retention,
        settings.event_retention,
        now=now,
    )


async def dry_run(
    store: Store,
    settings: Settings,
    older_than: float | None = None,
    *,
    now: datetime | None = None,
) -> PurgeCounts:
    """What a purge would delete now (or as of `now`); deletes nothing."""
    return await store.jobs.purge_counts(await cutoffs(store, settings, older_than, now=now))


async def run_purge(
    store: Store,
    settings: Settings,
    *,
    older_than: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    trigger: str = "manual",
    now: datetime | None = None,
) -> PurgeCounts:
    """Delete what the retention settings allow, batch by batch (each its own transaction):
    errored messages, then sent and cancelled ones, then events. Attempts and events of a
    deleted message go with it. `should_stop` is checked between batches. `now`: purge as
    of that time (the database clock when None)."""
    started = time.monotonic()
    limits = await cutoffs(store, settings, older_than, now=now)
    size = settings.purge_batch_size
    totals: dict[str, int] = {}
    batches = 0
    interrupted = False
    for kind, cutoff in (
        ("errored", limits.errored),
        ("done", limits.done),
        ("events", limits.events),
    ):
        total = 0
        while cutoff is not None:
            if should_stop():
                interrupted = True
                break
            deleted = await store.jobs.purge_batch(kind, cutoff, size)
            batches += 1
            total += deleted
            if deleted < size:
                break
        totals[kind] = total
    counts = PurgeCounts(errored=totals["errored"], sent=totals["done"], events=totals["events"])
    log.info(
        "purge interrupted" if interrupted else "purge finished",
        trigger=trigger,
        rows=counts.total,
        errored=counts.errored,
        sent=counts.sent,
        events=counts.events,
        batches=batches,
        duration_ms=round((time.monotonic() - started) * 1000, 1),
    )
    return counts
