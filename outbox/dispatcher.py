"""`outbox dispatch`: claim due messages in batches, call the provider, record outcomes.

Roles, after River: this module is the producer (wake-ups, slots, claims) and
runs each attempt; the completer writes outcomes in batches; the notifier
listens for new messages; a reaper returns rows whose lease expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import deque
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg

from outbox.cancellation import RECANCEL_AFTER, cancel_and_wait
from outbox.completer import Completer
from outbox.log import get_logger, mask_phone
from outbox.metrics import DispatchMetrics
from outbox.notifier import listen
from outbox.providers import create_provider
from outbox.providers.base import OutgoingMessage, Provider, ProviderError, clean_text
from outbox.retry import ErrorKind, retry_delay
from outbox.settings import Settings
from outbox.store import Claimed, Completion, Store

log = get_logger("outbox.dispatcher")

NEW_MESSAGE_CHANNEL = "outbox_new"
LEASE_MARGIN = 0.5  # seconds kept between a call's deadline and its lease's end
ERROR_BACKOFF_MAX = 5.0
RECORD_DELAY = 0.001  # seconds: "the loop's next turn" (a zero delay would be call_soon)
HELD_ROW_RECHECK = 0.05  # seconds until a claim looks again at a due row another holds
WRITE_RESERVE = 2.0  # seconds of the shutdown grace kept to write the last outcomes (at most)
EXIT_MARGIN = 1.0  # seconds of the shutdown grace left for closing the process (at most)
BACKSTOP_MARGIN = 1.0  # seconds past the grace before a dispatcher still stopping is cancelled


class Dispatcher:
    """One class with `run()` and `stop()`; `run()` returns after a clean shutdown."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        provider: Provider,
        metrics: DispatchMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.id = settings.dispatcher_id
        self.metrics = metrics or DispatchMetrics()
        self.completer = Completer(
            store, self.id, self.metrics, lambda: self.calls_in_flight > 0, self._settled
        )
        # (id, attempt) of every row claimed whose outcome is not written yet: this
        # process's reaper leaves them alone, however long the database was away.
        self._held_rows: set[tuple[uuid.UUID, int]] = set()
        self.calls_in_flight = 0
        self.metrics.track_in_flight(lambda: self.calls_in_flight)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()  # set when a claim is worth making
        self._running: set[asyncio.Task[None]] = set()  # attempts, until their call ends
        self._slots_taken = 0  # attempts started whose provider call has not ended
        self._started_calls: list[Any] = []  # loggers of calls whose start awaits its log line
        self._ended_calls: list[tuple[Any, ...]] = []  # calls whose outcome awaits recording
        self._recording: asyncio.TimerHandle | None = None
        self._buffer: deque[tuple[Claimed, float]] = deque()  # claimed, not started; lease end
        self._concurrency = settings.dispatch_concurrency
        prefetch = settings.dispatch_prefetch
        self._capacity = self._concurrency + (self._concurrency if prefetch is None else prefetch)
        # Claim in batches of a useful size, except to fill an idle slot at once.
        self._claim_threshold = max(1, self._capacity // 4)
        self._paused_until = 0.0  # monotonic time; sender-level errors pause all sending
        self._resume_at = datetime.now(UTC)  # the same moment, as a wall-clock time
        self._ready_logged = False
        self._claiming: asyncio.Task[Any] | None = None  # the producer, while it claims
        self._claim_cuts = 0  # cancellations stop() sent to a claim
        self.deadline = float("inf")  # monotonic time by which a stopped dispatcher is done

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
        side_tasks = [
            asyncio.create_task(self.completer.run(), name="completer"),
            asyncio.create_task(
                listen(
                    self.settings.listen_database_url,
                    NEW_MESSAGE_CHANNEL,
                    lambda _payload: self.wake(),
                    on_connect=self.wake,  # notifications missed while away: look now
                ),
                name="notifier",
            ),
            asyncio.create_task(self._reap_forever(), name="reaper"),
        ]
        try:
            await self._produce()
            await self._drain()
        finally:
            await cancel_and_wait(side_tasks)
        log.info("stopped", dispatcher=self.id)

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
        error_delay = 0.1
        while not self._stopping.is_set():
            # Cleared before claiming: a notification during the claim runs the loop again.
            self._wake.clear()
            timeout = self._poll_interval()
            paused_for = self._paused_until - time.monotonic()
            if paused_for > 0:
                await self._wait_for(self._wake, min(timeout, paused_for))
                continue
            self._start_buffered()  # anything left over from before a pause
            if not self._should_claim():
                self._room.clear()
                await self._wait_for(self._room, timeout)
                continue
            want = self._capacity - self._held()
            try:
                outcome = await self._claim_unless_stopped(want)
                error_delay = 0.1
            except psycopg.OperationalError as exc:
                log.warning("claim failed, retrying", error=str(exc).strip(), retry_in=error_delay)
                await self._wait_for(self._stopping, error_delay)
                error_delay = min(error_delay * 2, ERROR_BACKOFF_MAX)
                continue
            if outcome is None:
                return  # stop() cut the claim short
            claimed, next_due_at = outcome
            if claimed == want:
                continue  # maybe more is due: claim again when there is room
            if next_due_at is not None:
                due_in = (next_due_at - datetime.now(UTC)).total_seconds()
                # Due already, yet not claimed: another session holds that row (its
                # claim, or a transaction that may roll back): look again shortly.
                timeout = min(timeout, due_in if due_in > 0 else HELD_ROW_RECHECK)
            await self._wait_for(self._wake, timeout)

    async def _claim_unless_stopped(self, limit: int) -> tuple[int, datetime | None] | None:
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

    async def _claim(self, limit: int) -> tuple[int, datetime | None]:
        """Claim up to `limit` rows and start what slots allow; returns how many were
        claimed, and when the earliest pending row not yet due becomes due."""
        if not self._ready_logged:
            # One connection claims while another records outcomes: both open before
            # "ready", which marks the end of start-up.
            await self.store.queue.open_claiming_connections(
                2, self.id, self.settings.lease_seconds
            )
            log.info(
                "ready",
                dispatcher=self.id,
                provider=self.provider.name,
                concurrency=self._concurrency,
                prefetch=self._capacity - self._concurrency,
            )
            self._ready_logged = True
        # The lease runs from the database's now() inside the claim: count from before it.
        lease_end = time.monotonic() + self.settings.lease_seconds
        claimed, next_due_at = await self.store.queue.claim(
            self.id, limit, self.settings.lease_seconds
        )
        self.metrics.claim_size.observe(len(claimed))
        self._held_rows.update((message.id, message.attempt) for message in claimed)
        self._buffer.extend((message, lease_end) for message in claimed)
        if self._paused_until > time.monotonic():
            # A sender-level error arrived during the claim: these rows wait for the pause.
            self._hand_back_buffer("sending paused", self._resume_at)
        self._start_buffered()
        return len(claimed), next_due_at

    def _start_buffered(self) -> None:
        if self._paused_until > time.monotonic() or self._stopping.is_set():
            return
        while self._buffer and self._slots_taken < self._concurrency:
            message, lease_end = self._buffer.popleft()
            self._slots_taken += 1
            task = asyncio.create_task(self._attempt(message, lease_end))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _release_slot(self) -> None:
        self._slots_taken -= 1
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
            handed_back = self._interrupted(message, now, reason)
            self.completer.put(replace(handed_back, next_attempt_at=next_attempt_at, refund=1))

    def _poll_interval(self) -> float:
        # Jittered so that many dispatchers do not poll in step.
        return self.settings.poll_interval * random.uniform(0.8, 1.2)

    async def _wait_for(self, event: asyncio.Event, seconds: float) -> None:
        """Until `event` is set or `seconds` pass (`stop()` sets every event waited on).
        Awaited in the producer's own task: a wake-up costs one turn of the loop, with
        no helper task to start, wait for and cancel before the claim goes out."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()

    # One attempt ------------------------------------------------------------------

    async def _attempt(self, message: Claimed, lease_end: float) -> None:
        try:
            await self._attempt_in_slot(message, lease_end)
        finally:
            self._release_slot()  # the slot frees when the call ends (or never started)

    async def _attempt_in_slot(self, message: Claimed, lease_end: float) -> None:
        started_at = datetime.now(UTC)
        attempt_label = f"{message.attempt}/{message.max_attempts}"
        bound = log.bind(
            message_id=str(message.id),
            user_id=message.user_id,
            to=mask_phone(message.to),
            attempt=attempt_label,
        )
        if message.expires_at is not None and message.expires_at <= started_at:
            bound.warning("expired before sending", outcome="expired")
            self.completer.put(
                Completion(
                    id=message.id,
                    attempt=message.attempt,
                    status="error",
                    outcome="expired",
                    started_at=started_at,
                    finished_at=started_at,
                    error="expired",
                    refund=1,
                )
            )
            return
        if self._paused_until > time.monotonic():
            # Started in the turn of the loop in which another call hit a sender-level
            # error: back to the database for the pause, unattempted.
            self.completer.put(
                replace(
                    self._interrupted(message, started_at, "sending paused"),
                    next_attempt_at=self._resume_at,
                    refund=1,
                )
            )
            return
        # One deadline for the whole call (httpx times each phase on its own), inside
        # what is left of the lease, so that the lease really bounds an attempt.
        budget = self.settings.provider_timeout
        if lease_end - time.monotonic() - LEASE_MARGIN < budget:
            # Waited in the prefetch buffer until the lease could not cover a whole call:
            # hand it back unattempted rather than cut the call short.
            self.completer.put(
                replace(
                    self._interrupted(message, started_at, "lease too short to attempt"),
                    refund=1,
                )
            )
            return
        # Logged on the loop's next turn, like outcomes: the call starts first (a wave of
        # calls starting together would otherwise each wait for the others' lines).
        self._started_calls.append(bound)
        self._schedule_recording()
        clock = time.perf_counter()
        self.calls_in_flight += 1
        try:
            async with asyncio.timeout(budget):
                provider_id = await self.provider.send(
                    OutgoingMessage(
                        id=message.id,
                        user_id=message.user_id,
                        to=message.to,
                        type=message.type,
                        payload=message.payload,
                        client_message_id=message.client_message_id,
                        attempt=message.attempt,
                    )
                )
            failure = None
        except ProviderError as exc:
            provider_id, failure = None, exc
        except TimeoutError:
            provider_id = None
            failure = ProviderError(
                ErrorKind.TRANSIENT,
                f"{self.provider.name}: no answer within {budget:.3g}s",
            )
        except asyncio.CancelledError:
            # Shutdown grace ran out: hand the row back rather than leave it in flight.
            self.completer.put(
                self._interrupted(message, started_at, "interrupted by dispatcher shutdown")
            )
            raise
        except Exception as exc:  # a provider bug must not kill the dispatcher
            self._log_started_calls()  # this call's start line first
            bound.exception("provider raised unexpectedly")
            provider_id = None
            failure = ProviderError(ErrorKind.TRANSIENT, f"unexpected {type(exc).__name__}: {exc}")
        finally:
            self.calls_in_flight -= 1
        latency_ms = (time.perf_counter() - clock) * 1000
        finished_at = datetime.now(UTC)
        if failure is not None and failure.kind is ErrorKind.SENDER:
            self._pause_sending(failure, finished_at)  # before a buffered message can start
        self._ended_calls.append(
            (message, bound, provider_id, failure, started_at, finished_at, latency_ms)
        )
        self._schedule_recording()

    def _schedule_recording(self) -> None:
        if self._recording is None:
            # The log lines and outcomes of calls wait for the loop's next turn, after
            # the calls that replace them have started: calls that end together (a
            # slow provider's waves) are all refilled before any bookkeeping.
            self._recording = asyncio.get_running_loop().call_later(
                RECORD_DELAY, self._record_calls
            )

    def _record_calls(self) -> None:
        self._recording = None
        self._log_started_calls()  # before any outcome: a call that started and ended
        ended, self._ended_calls = self._ended_calls, []  # within one turn logs in order
        for call in ended:
            try:
                self._record(*call)
            except Exception:
                # A bug in one outcome must not lose the others of this turn, nor this
                # call's: a sent message is recorded sent, any other is retried.
                message, _, _, failure, started_at, finished_at, latency_ms = call
                log.exception("could not record an outcome", message_id=str(message.id))
                self.completer.put(
                    Completion(
                        id=message.id,
                        attempt=message.attempt,
                        status="sent" if failure is None else "pending",
                        outcome="sent" if failure is None else "transient",
                        started_at=started_at,
                        finished_at=finished_at,
                        latency_ms=latency_ms,
                        error=None if failure is None else failure.reason,
                        next_attempt_at=None if failure is None else finished_at,
                    )
                )
        if not self.calls_in_flight:
            self.completer.calls_ended()

    def _log_started_calls(self) -> None:
        started, self._started_calls = self._started_calls, []
        for bound in started:
            bound.info("attempt started")

    def _record(
        self,
        message: Claimed,
        bound: Any,  # the structlog logger bound to this message's context
        provider_id: str | None,
        failure: ProviderError | None,
        started_at: datetime,
        finished_at: datetime,
        latency_ms: float,
    ) -> None:
        self.metrics.provider_duration.observe(latency_ms / 1000)
        bound = bound.bind(duration_ms=round(latency_ms, 2))
        if failure is None:
            bound.info("sent", outcome="sent", provider_message_id=provider_id)
            self.completer.put(
                Completion(
                    id=message.id,
                    attempt=message.attempt,
                    status="sent",
                    outcome="sent",
                    started_at=started_at,
                    finished_at=finished_at,
                    latency_ms=latency_ms,
                    provider_message_id=clean_text(provider_id) if provider_id else None,
                )
            )
            return
        self.completer.put(
            self._failed(message, failure, started_at, finished_at, latency_ms, bound)
        )

    def _failed(
        self,
        message: Claimed,
        failure: ProviderError,
        started_at: datetime,
        finished_at: datetime,
        latency_ms: float,
        logger: Any,  # the structlog logger bound to this message's context
    ) -> Completion:
        final = Completion(
            id=message.id,
            attempt=message.attempt,
            status="error",
            outcome=failure.kind.value,
            started_at=started_at,
            finished_at=finished_at,
            latency_ms=latency_ms,
            error=failure.reason,
        )
        settings = self.settings
        if failure.kind is ErrorKind.SENDER:
            resume = self._resume_at
            logger.error(
                "sender cannot send: pausing all sending",
                outcome="sender",
                error=failure.reason,
                pause_seconds=settings.sender_pause,
            )
            return replace(final, status="pending", next_attempt_at=resume, refund=1)
        if failure.kind is ErrorKind.TRANSIENT and message.attempt < message.max_attempts:
            delay = retry_delay(
                message.attempt,
                base=settings.retry_base_delay,
                cap=settings.retry_max_delay,
                jitter=settings.retry_jitter,
                retry_after=failure.retry_after,
            )
            logger.info(
                "attempt failed, will retry",
                outcome="transient",
                error=failure.reason,
                retry_in=round(delay, 3),
            )
            return replace(
                final, status="pending", next_attempt_at=finished_at + timedelta(seconds=delay)
            )
        logger.error(
            f"failed after {message.attempt} attempts",
            outcome=failure.kind.value,
            error=failure.reason,
        )
        return final

    def _pause_sending(self, failure: ProviderError, finished_at: datetime) -> None:
        """A sender-level error: no call starts until the pause ends, and the rows
        waiting in the buffer go back to the database for that time."""
        pause = self.settings.sender_pause
        self._paused_until = time.monotonic() + pause
        self._resume_at = finished_at + timedelta(seconds=pause)
        self._hand_back_buffer("sending paused: " + failure.reason, self._resume_at)

    def _interrupted(self, message: Claimed, started_at: datetime, reason: str) -> Completion:
        now = datetime.now(UTC)
        return Completion(
            id=message.id,
            attempt=message.attempt,
            status="pending",
            outcome="interrupted",
            started_at=started_at,
            finished_at=now,
            error=reason,
            next_attempt_at=now,
        )

    def _settled(self, batch: list[Completion]) -> None:
        """The completer wrote (or dropped) these outcomes: the rows are no longer ours."""
        for completion in batch:
            self._held_rows.discard((completion.id, completion.attempt))

    # Shutdown and maintenance -----------------------------------------------------

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
        if self._recording is not None:
            self._recording.cancel()
            self._record_calls()
        try:
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                await self.completer.wait_idle()
        except TimeoutError:
            # PostgreSQL away: these rows stay in flight and come back after their lease.
            log.error(
                "shutdown grace over before every outcome was written",
                unwritten=len(self._held_rows),
                grace=grace,
            )

    async def _reap_forever(self) -> None:
        interval = max(0.05, min(self.settings.lease_seconds / 4, 30.0))
        while True:
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            # Never a row of ours: its outcome, a success perhaps, is on its way (a lease
            # runs out while the database is away). Other dispatchers' rows, and those of
            # a predecessor under the same id, are reaped as usual.
            keep = {message_id for message_id, _ in self._held_rows}
            try:
                reaped = await self.store.queue.reap_expired_leases(keep=keep)
            except psycopg.OperationalError as exc:
                log.warning("lease reaper failed", error=str(exc).strip())
                continue
            if reaped:
                self.metrics.leases_recovered.inc(reaped)
                log.warning("returned rows whose lease expired", count=reaped)
                self.wake()


def provider_client(settings: Settings) -> httpx.AsyncClient:
    """One client per process, its keep-alive pool sized to the concurrency."""
    return httpx.AsyncClient(
        timeout=settings.provider_timeout,
        limits=httpx.Limits(
            max_connections=settings.dispatch_concurrency,
            max_keepalive_connections=settings.dispatch_concurrency,
        ),
    )


async def run_dispatcher(
    settings: Settings, store: Store, stop: asyncio.Event, metrics: DispatchMetrics | None = None
) -> None:
    """Run a dispatcher until `stop` is set; used by `outbox dispatch` and `outbox dev`."""
    async with provider_client(settings) as client:
        dispatcher = Dispatcher(settings, store, create_provider(settings, client), metrics)
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
