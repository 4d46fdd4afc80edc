"""`outbox dispatch`: claim due messages in batches, call the provider, record outcomes.

Roles, after River: this module is the producer (wake-ups, slots, claims) and watches
the side tasks; the executor (outbox/executor.py) runs each attempt, with its message's
sender's provider (outbox/sender_providers.py), and turns its end into a completion; the
completer writes completions in batches; the notifier listens for new messages; the
senders' directory follows their changes; the reaper returns rows whose lease expired;
the scheduler runs the scheduled purge. A side task that dies stops the dispatcher, which
then fails.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import psycopg

from outbox.cancellation import RECANCEL_AFTER, cancel_and_wait
from outbox.completer import Completer
from outbox.executor import Executor
from outbox.log import get_logger
from outbox.metrics import DispatchMetrics
from outbox.notifier import listen
from outbox.reaper import Reaper
from outbox.retry import Backoff
from outbox.schedule import Scheduler
from outbox.sender_providers import SenderProviders
from outbox.settings import Settings
from outbox.store import Claimed, Completion, Store
from outbox.waiting import wait_event

log = get_logger("outbox.dispatcher")

NEW_MESSAGE_CHANNEL = "outbox_new"
ERROR_BACKOFF_MIN = 0.1  # seconds before a failed claim is tried again, doubling
ERROR_BACKOFF_MAX = 5.0
HELD_ROW_RECHECK = 0.05  # seconds until a claim looks again at a due row another holds
WRITE_RESERVE = 2.0  # seconds of the shutdown grace kept to write the last outcomes (at most)
EXIT_MARGIN = 1.0  # seconds of the shutdown grace left for closing the process (at most)
BACKSTOP_MARGIN = 1.0  # seconds past the grace before a dispatcher still stopping is cancelled


class SideTaskDied(Exception):
    """A side task of the dispatcher (completer, notifier, senders, reaper, scheduler)
    raised: the dispatcher stopped rather than run on without it."""


class SideTasks:
    """The dispatcher's side tasks, by name, watched: the first that raises is logged and
    `on_death()` runs (one that returns, or is cancelled, has simply ended)."""

    def __init__(self, on_death: Callable[[], None]) -> None:
        self._on_death = on_death
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.dead: str | None = None  # the first side task that died

    def start(self, roles: dict[str, Coroutine[Any, Any, None]]) -> None:
        for name, role in roles.items():
            task = asyncio.create_task(role, name=name)
            task.add_done_callback(self._ended)
            self._tasks[name] = task

    async def wait_unless_ended(self, name: str, wait: Callable[[], Awaitable[Any]]) -> None:
        """Await `wait()`, unless the side task `name` ends (dies) first."""
        task = self._tasks.get(name)
        if task is None or task.done():
            return
        waiting = asyncio.ensure_future(wait())
        try:
            await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()

    async def cancel(self) -> None:
        await cancel_and_wait(self._tasks.values())

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error(
            "side task died: stopping the dispatcher",
            task=task.get_name(),
            exc_info=task.exception(),
        )
        if self.dead is None:
            self.dead = task.get_name()
        self._on_death()


class Dispatcher:
    """One class with `run()` and `stop()`; `run()` returns after a clean shutdown, and
    raises `SideTaskDied` after the shutdown a dead side task caused."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: SenderProviders,
        metrics: DispatchMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.id = settings.dispatcher_id
        self.metrics = metrics or DispatchMetrics()
        self.completer = Completer(
            store, self.id, self.metrics, lambda: self.executor.calls_in_flight > 0, self._settled
        )
        self.executor = Executor(
            settings, providers, self.completer, self.metrics, self._hand_back_paused
        )
        self.metrics.track_in_flight(lambda: self.executor.calls_in_flight)
        providers.watch(self._hand_back_paused)
        # (id, attempt) of every row claimed whose outcome is not written yet: this
        # process's reaper leaves them alone, however long the database was away.
        self._held_rows: set[tuple[uuid.UUID, int]] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()  # set when a claim is worth making
        self._running: set[asyncio.Task[None]] = set()  # attempts, until their call ends
        self._slots_taken = 0  # attempts started whose provider call has not ended
        self._buffer: deque[tuple[Claimed, float]] = deque()  # claimed, not started; lease end
        # Per sender, the user whose rows its last claim took last: the next claim there
        # serves the users after it first (round-robin).
        self._cursors: dict[str, str] = {}
        self._concurrency = settings.dispatch_concurrency
        prefetch = settings.dispatch_prefetch
        self._capacity = self._concurrency + (self._concurrency if prefetch is None else prefetch)
        # Claim in batches of a useful size, except to fill an idle slot at once.
        self._claim_threshold = max(1, self._capacity // 4)
        self._ready_logged = False
        self._claiming: asyncio.Task[Any] | None = None  # the producer, while it claims
        self._claim_cuts = 0  # cancellations stop() sent to a claim
        # Without one of them (no outcomes written, no leases reaped, no purge) the
        # dispatcher stops, and fails, rather than run on.
        self._side_tasks = SideTasks(on_death=self.stop)
        self.deadline = float("inf")  # monotonic time by which a stopped dispatcher is done

    @property
    def buffered(self) -> int:
        """Rows claimed and waiting for a slot."""
        return len(self._buffer)

    @property
    def slots_taken(self) -> int:
        """Attempts started whose provider call has not ended."""
        return self._slots_taken

    def stop(self) -> None:
        if not self._stopping.is_set():
            grace = self.settings.shutdown_grace
            # Done a moment before the grace ends: the process still has to close and exit.
            self.deadline = time.monotonic() + grace - min(EXIT_MARGIN, grace / 4)
        self._stopping.set()
        self._wake.set()
        self._room.set()  # each wait of the producer ends at once
        if not self._claim_cuts:
            self._cut_claim()

    def _cut_claim(self) -> None:
        """A claim waiting on the database (away, or slow to give a connection) ends now;
        rows it may have taken come back after their lease, never called. Cancelled again
        while it lasts: psycopg waits up to 10 s for the server to confirm a cancelled
        query (a second cancellation closes the connection instead)."""
        if self._claiming is None:
            return
        self._claim_cuts += 1
        self._claiming.cancel()
        asyncio.get_running_loop().call_later(RECANCEL_AFTER, self._cut_claim)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        self._side_tasks.start(self._side_roles())
        try:
            await self._produce()
            await self._drain()
        finally:
            await self._side_tasks.cancel()
        log.info("stopped", dispatcher=self.id)
        if self._side_tasks.dead is not None:
            raise SideTaskDied(f"the dispatcher's {self._side_tasks.dead} died")

    def _side_roles(self) -> dict[str, Coroutine[Any, Any, None]]:
        reaper = Reaper(
            self.store,
            self.settings.lease_seconds,
            self.metrics,
            lambda: {message_id for message_id, _ in self._held_rows},
            self.wake,
        )
        return {
            "completer": self.completer.run(),
            "notifier": listen(
                self.settings.listen_database_url,
                NEW_MESSAGE_CHANNEL,
                lambda _payload: self.wake(),
                on_connect=self.wake,  # notifications missed while away: look now
            ),
            # Senders created, changed, paused or deleted, read again on their NOTIFY.
            "senders": self.providers.follow(),
            "reaper": reaper.run(),
            # The scheduled purge (once per tick across the cluster); it ends by itself
            # when pg_cron owns the job.
            "scheduler": Scheduler(self.settings, self.store, metrics=self.metrics).run(
                self._stopping
            ),
        }

    # Producer ---------------------------------------------------------------------
    #
    # Two limits: at most `concurrency` provider calls in flight, and at most
    # `concurrency + prefetch` rows held (in flight or claimed and waiting). The
    # prefetched rows start the moment a slot frees, so a batch of calls that end
    # together is refilled at once instead of after a claim's round trip.

    def _held(self) -> int:
        return len(self._running) + len(self._buffer)

    def _should_claim(self) -> bool:
        room = self._capacity - self._held()
        idle_slot = not self._buffer and self._slots_taken < self._concurrency
        return room > 0 and (idle_slot or room >= self._claim_threshold)

    async def _produce(self) -> None:
        backoff = Backoff(ERROR_BACKOFF_MIN, ERROR_BACKOFF_MAX)
        while not self._stopping.is_set():
            # Cleared before claiming: a notification during the claim runs the loop again.
            self._wake.clear()
            timeout = self._poll_interval()
            if not self._should_claim():
                self._room.clear()
                await wait_event(self._room, timeout)
                continue
            want = self._capacity - self._held()
            try:
                outcome = await self._claim_unless_stopped(want)
                backoff.reset()
            except psycopg.OperationalError as exc:
                delay = backoff.next_delay()
                log.warning("claim failed, retrying", error=str(exc).strip(), retry_in=delay)
                await wait_event(self._stopping, delay)
                continue
            if outcome is None:
                return  # stop() cut the claim short
            claimed, next_due_at, more = outcome
            if claimed == want or more:
                continue  # maybe more is due: claim again when there is room
            if next_due_at is not None:
                # When a row may next be claimed: due, and its sender with a token or
                # its breaker's probe allowed (the claim says so: no spinning on a held
                # sender's backlog).
                due_in = (next_due_at - datetime.now(UTC)).total_seconds()
                # Due already, yet not claimed: another session holds that row (its
                # claim, or a transaction that may roll back): look again shortly.
                timeout = min(timeout, due_in if due_in > 0 else HELD_ROW_RECHECK)
            await wait_event(self._wake, timeout)

    async def _claim_unless_stopped(self, limit: int) -> tuple[int, datetime | None, bool] | None:
        """`_claim`, or None when stop() cut it short (see `_cut_claim`)."""
        producer = self._claiming = asyncio.current_task()
        try:
            return await self._claim(limit)
        except asyncio.CancelledError:
            if producer is None or not self._claim_cuts:
                raise
            for _ in range(self._claim_cuts):
                others = producer.uncancel()
            if others:
                raise  # not only stop()'s doing
            return None
        finally:
            self._claiming = None

    async def _claim(self, limit: int) -> tuple[int, datetime | None, bool]:
        """Claim up to `limit` rows and start what slots allow; returns how many were
        claimed, when a row may next be claimed, and whether more may be due now."""
        if not self._ready_logged:
            # The senders first: no row is claimed before its sender can be known.
            await self.providers.load()
            # One connection claims while another records outcomes: both open before
            # "ready", which marks the end of start-up.
            await self.store.queue.open_claiming_connections(
                2, self.id, self.settings.lease_seconds, self.settings.sender_burst
            )
            log.info(
                "ready",
                dispatcher=self.id,
                provider=self.providers.default.name,
                senders=len(self.providers.directory.senders),
                concurrency=self._concurrency,
                prefetch=self._capacity - self._concurrency,
            )
            self._ready_logged = True
        # The lease runs from the database's now() inside the claim: count from before it.
        lease_end = time.monotonic() + self.settings.lease_seconds
        # A limited sender's rows are claimed only for the call slots free now, those
        # that earlier paced rows waiting in the buffer will not take: its tokens are
        # spent at the claim, so its calls must start then.
        waiting_paced = sum(1 for message, _ in self._buffer if message.paced)
        free_slots = max(0, self._concurrency - self._slots_taken - waiting_paced)
        result = await self.store.queue.claim(
            self.id,
            limit,
            self.settings.lease_seconds,
            burst=self.settings.sender_burst,
            paced=free_slots,
            cursors=self._cursors,
            user_max_in_flight=self.settings.user_max_in_flight,
        )
        # Round-robin: each sender's next claim starts after the user this one served last.
        self._cursors.update(result.cursors)
        self.metrics.claim_size.observe(len(result.claimed))
        self.take(result.claimed, lease_end)
        return len(result.claimed), result.next_due_at, result.more

    def take(self, claimed: list[Claimed], lease_end: float) -> None:
        """Hold rows just claimed (their lease ends at `lease_end`, monotonic time) and
        start what the slots allow; the others wait in the buffer."""
        self._held_rows.update((message.id, message.attempt) for message in claimed)
        # A row that took its sender's token starts ahead of the others: the limit is kept
        # at the claim, and a call that waits behind another sender's burst would start
        # with the next second's.
        # So does a `high` one (priority 0): prefetched rows of lower priorities claimed
        # before it must not hold it back.
        first = [
            (message, lease_end) for message in claimed if message.paced or message.priority == 0
        ]
        if first:
            self._buffer.extendleft(reversed(first))
        self._buffer.extend(
            (message, lease_end)
            for message in claimed
            if not (message.paced or message.priority == 0)
        )
        self._start_buffered()

    def _start_buffered(self) -> None:
        if self._stopping.is_set():
            return
        while self._buffer and self._slots_taken < self._concurrency:
            message, lease_end = self._buffer.popleft()
            self._slots_taken += 1
            task = asyncio.create_task(self._attempt(message, lease_end))
            self._running.add(task)
            task.add_done_callback(self._finished)

    async def _attempt(self, message: Claimed, lease_end: float) -> None:
        try:
            await self.executor.attempt(message, lease_end)
        finally:
            self._slots_taken -= 1  # the slot frees when the call ends (or never started)
            self._start_buffered()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._should_claim():
            self._room.set()

    def _hand_back_buffer(self, reason: str, next_attempt_at: datetime) -> None:
        """Return the claimed rows not yet started, without spending their attempt."""
        now = datetime.now(UTC)
        while self._buffer:
            message, _ = self._buffer.popleft()
            self.executor.hand_back(message, reason, next_attempt_at, now)

    def _hand_back_paused(self, *_sender: str) -> None:
        """A sender paused meanwhile (the directory says so, or a call of it hit a
        sender-level error here): its rows waiting in the buffer go back at once (each
        would go back uncalled when it started), making room for other senders' rows."""

        def paused(message: Claimed) -> bool:
            return not message.probe and self.providers.paused(message.sender)

        if not any(paused(message) for message, _ in self._buffer):
            return
        now = datetime.now(UTC)
        kept: deque[tuple[Claimed, float]] = deque()
        for message, lease_end in self._buffer:
            if paused(message):
                self.executor.hand_back(message, "sender paused", None, now)
            else:
                kept.append((message, lease_end))
        self._buffer = kept
        if self._should_claim():
            self._room.set()

    def _poll_interval(self) -> float:
        # Jittered so that many dispatchers do not poll in step.
        return self.settings.poll_interval * random.uniform(0.8, 1.2)

    def _settled(self, batch: list[Completion]) -> None:
        """The completer wrote (or dropped) these outcomes: the rows are no longer ours."""
        for completion in batch:
            self._held_rows.discard((completion.id, completion.attempt))

    # Shutdown ---------------------------------------------------------------------

    async def _drain(self) -> None:
        """Let in-flight calls finish, then write every outcome, all by the end of the
        grace period counted from stop(): even with PostgreSQL away, the process exits."""
        grace = self.settings.shutdown_grace
        self._hand_back_buffer("dispatcher shutting down", datetime.now(UTC))
        if self._running:
            # The calls' share of the grace; the rest is for writing their outcomes.
            calls_end = self.deadline - min(WRITE_RESERVE, grace / 3)
            log.info("draining", in_flight=len(self._running), grace=grace)
            _, late = await asyncio.wait(
                self._running, timeout=max(0.0, calls_end - time.monotonic())
            )
            await cancel_and_wait(late)  # each hands its row back (interrupted)
        self.executor.flush()
        try:
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                # A dead completer writes nothing more: its rows come back after their lease.
                await self._side_tasks.wait_unless_ended("completer", self.completer.wait_idle)
        except TimeoutError:
            # PostgreSQL away: these rows stay in flight and come back after their lease.
            log.error(
                "shutdown grace over before every outcome was written",
                unwritten=len(self._held_rows),
                grace=grace,
            )


async def run_dispatcher(
    settings: Settings, store: Store, stop: asyncio.Event, metrics: DispatchMetrics | None = None
) -> None:
    """Run a dispatcher until `stop` is set; used by `outbox dispatch` and `outbox dev`."""
    metrics = metrics or DispatchMetrics()
    providers = SenderProviders(settings, store, on_senders=metrics.keep_senders)
    try:
        dispatcher = Dispatcher(settings, store, providers, metrics)
        run = asyncio.create_task(dispatcher.run())
        stopper = asyncio.create_task(stop.wait())
        cut = False
        try:
            await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
            dispatcher.stop()
            # The drain ends by the deadline; this bounds only what nobody foresaw.
            left = dispatcher.deadline - time.monotonic() + BACKSTOP_MARGIN
            await asyncio.wait({run}, timeout=max(0.0, left))
        finally:
            stopper.cancel()
            if not run.done():
                log.error("dispatcher still running at the end of the shutdown grace: cancelled")
                cut = True
                await cancel_and_wait([run])
        if not (cut and run.cancelled()):
            run.result()  # a dispatcher that failed (or was cancelled) fails the process
    finally:
        await providers.aclose()
