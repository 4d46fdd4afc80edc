"""Batched completion: outcomes that finish close together are written in one statement."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import psycopg

from outbox.log import get_logger
from outbox.metrics import DispatchMetrics
from outbox.retry import Backoff
from outbox.states import MessageStatus
from outbox.store import Completion, Store
from outbox.waiting import wait_event

log = get_logger("outbox.completer")

MAX_BATCH = 1000
LINGER_SECONDS = 0.005
RETRY_MIN = 0.05
RETRY_MAX = 5.0


class Completer:
    """Collects outcomes from the attempt tasks and writes them in batches.

    A write that fails (database away) keeps its outcomes and retries with
    backoff: an outcome is only dropped once PostgreSQL has it. A success the
    batch could not apply (the lease ran out and the row was reaped) is written
    again as a late success, recorded unless a later attempt has started.
    `settled` is told of each batch once it is written or dropped.
    """

    def __init__(
        self,
        store: Store,
        dispatcher_id: str,
        metrics: DispatchMetrics | None = None,
        calls_running: Callable[[], bool] = lambda: True,
        settled: Callable[[list[Completion]], None] = lambda batch: None,
    ) -> None:
        self._store = store
        self._dispatcher_id = dispatcher_id
        self._metrics = metrics or DispatchMetrics()
        self._calls_running = calls_running  # whether more outcomes are on their way
        self._settled = settled
        self._calls_ended = asyncio.Event()
        self._queue: asyncio.Queue[Completion] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._backoff = Backoff(RETRY_MIN, RETRY_MAX)  # between tries of a write

    def put(self, completion: Completion) -> None:
        self._idle.clear()
        self._queue.put_nowait(completion)

    def calls_ended(self) -> None:
        """No call is running any more: write what is queued without lingering."""
        self._calls_ended.set()

    async def wait_idle(self) -> None:
        """Until every outcome handed in so far is written."""
        await self._idle.wait()

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._calls_running():
                # Linger a moment so that outcomes finishing close together share one
                # round trip and one commit (a round trip costs far more than the
                # wait), unless the last running call ends first.
                self._calls_ended.clear()
                await wait_event(self._calls_ended, LINGER_SECONDS)
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            except Exception:
                # One outcome PostgreSQL refuses must not stop the others: write one by
                # one; a row that still fails stays in flight and the reaper returns it.
                log.exception("could not record outcomes, writing them one by one")
                for completion in batch:
                    try:
                        await self._write([completion])
                    except Exception:
                        log.exception("outcome dropped", message_id=str(completion.id))
            self._settled(batch)
            if self._queue.empty():
                self._idle.set()

    async def _write(self, batch: list[Completion]) -> None:
        applied = await self._until_written(self._store.queue.complete, batch)
        if len(applied) == len(batch):  # the hot path: every row still held
            self._metrics.count_outcomes(batch)
            return
        unapplied = [c for c in batch if c.id not in applied]
        late = [c for c in unapplied if c.status == MessageStatus.SENT]
        if late:
            # The lease ran out first (the database away longer than it): the provider
            # took the message, so it is sent, unless attempt N+1 has started already.
            recorded = await self._until_written(self._store.queue.record_late_successes, late)
            if recorded:
                applied = applied | recorded
                self._metrics.late_successes.inc(len(recorded))
                for completion in late:
                    if completion.id in recorded:
                        log.warning(
                            "late success recorded: the lease had expired",
                            message_id=str(completion.id),
                            attempt=completion.attempt,
                        )
        # Counted once per batch and outcome, as written (a lost outcome did not happen).
        self._metrics.count_outcomes(c for c in batch if c.id in applied)
        lost = [c for c in unapplied if c.id not in applied]
        if lost:
            self._metrics.outcomes_lost.inc(len(lost))
            # The lease expired and the row was reclaimed: a failure after a reap changes
            # nothing, and a success arrived after a newer attempt had started.
            for completion in lost:
                log.warning(
                    "outcome dropped: lease lost",
                    message_id=str(completion.id),
                    attempt=completion.attempt,
                    outcome=completion.outcome,
                )

    async def _until_written(
        self,
        write: Callable[[str, list[Completion]], Awaitable[set[uuid.UUID]]],
        batch: list[Completion],
    ) -> set[uuid.UUID]:
        """`write(dispatcher, batch)`, retried with backoff while the database is away."""
        self._backoff.reset()
        while True:
            try:
                return await write(self._dispatcher_id, batch)
            except psycopg.OperationalError as exc:
                delay = self._backoff.next_delay()
                log.warning(
                    "could not record outcomes, retrying",
                    count=len(batch),
                    error=str(exc).strip(),
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
