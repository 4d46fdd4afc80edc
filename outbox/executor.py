"""One attempt: call the provider for a claimed message within its lease, and turn how
the attempt ended into the completion the completer writes.

`completion()` is the outcome policy, a pure function of the message, how its attempt
ended and the retry policy; `Executor` runs the calls, logs them and hands each
completion to the completer. What an outcome means for its sender (a throttle halves its
rate, a sender-level error pauses it for the whole cluster) is written with it, in
PostgreSQL (sql/migrations/016_sender_limits.sql).
"""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Literal

from outbox.completer import Completer
from outbox.log import get_logger, mask_phone
from outbox.metrics import DispatchMetrics
from outbox.providers.base import (
    CALL_PROGRESS,
    CallProgress,
    OutgoingMessage,
    Provider,
    ProviderError,
    clean_text,
)
from outbox.retry import RETRY_AFTER_MAX, ErrorKind, retry_delay
from outbox.sender_providers import SenderLeftOut, SenderProvider, SenderProviders, UnknownSender
from outbox.settings import Settings
from outbox.states import AttemptOutcome, MessageStatus
from outbox.store import Claimed, Completion

log = get_logger("outbox.executor")

LEASE_MARGIN = 0.5  # seconds kept between a call's deadline and its lease's end
RECORD_DELAY = 0.001  # seconds: "the loop's next turn" (a zero delay would be call_soon)
REREAD_RETRY = 1.0  # seconds before a row is due again when the senders could not be read

THROTTLE_RETRY = 1.0  # seconds before a throttled message is due again, without Retry-After

_FAILED_OUTCOME = {
    ErrorKind.TRANSIENT: AttemptOutcome.TRANSIENT,
    ErrorKind.PERMANENT: AttemptOutcome.PERMANENT,
    ErrorKind.SENDER: AttemptOutcome.SENDER,
    ErrorKind.THROTTLED: AttemptOutcome.THROTTLED,
    ErrorKind.PAIR_THROTTLED: AttemptOutcome.THROTTLED,
    ErrorKind.UNKNOWN: AttemptOutcome.UNKNOWN,
}
_THROTTLES = {ErrorKind.THROTTLED: "rate", ErrorKind.PAIR_THROTTLED: "pair"}


class Ending(Enum):
    """How an attempt ended, before the outcome policy says what that means."""

    ANSWERED = "answered"  # the call ended: sent, unless `failure` says why not
    EXPIRED = "expired"  # not called: the message's expires_at had passed
    REFUSED = "refused"  # not called: its sender is unknown here (`reason` says why)
    HANDED_BACK = "handed_back"  # not called (a pause, a short lease, a shutdown): refunded
    CUT = "cut"  # called, but the shutdown cut the call short: the attempt counts


@dataclass(slots=True)  # not frozen: one per attempt, and a frozen __init__ costs 5× more
class CallResult:
    """What one attempt gave, as the executor saw it."""

    ending: Ending
    started_at: datetime
    finished_at: datetime
    latency_ms: float | None = None  # the provider call's, when one ended
    provider_id: str | None = None
    failure: ProviderError | None = None
    reason: str | None = None  # why a HANDED_BACK or CUT attempt ended so
    retry_at: datetime | None = None  # HANDED_BACK: due again then (None: at once)
    pausing: bool = False  # its sender-level error is the first of its sender's pause here


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed attempt is tried again (outbox/retry.py), how long a throttle holds a
    message and how many it may take, a sender's breaker, and whether a call of unknown
    outcome is retried ("retry": at least once) or final ("fail": at most once)."""

    base: float
    cap: float
    jitter: float | Literal["full"]
    sender_pause: float = 60.0
    sender_pause_max: float = 3600.0
    max_throttles: int = 100
    pair_delay: float = 6.0
    unknown_outcome: Literal["retry", "fail"] = "retry"
    random: Callable[[], float] = _random.random

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            base=settings.retry_base_delay,
            cap=settings.retry_max_delay,
            jitter=settings.retry_jitter,
            sender_pause=settings.sender_pause,
            sender_pause_max=settings.sender_pause_max,
            max_throttles=settings.max_throttles,
            pair_delay=settings.pair_delay,
            unknown_outcome=settings.unknown_outcome,
        )


def completion(message: Claimed, result: CallResult, policy: RetryPolicy) -> Completion:
    """The outcome policy: what one attempt's end writes.

    Sent → sent. A transient failure with attempts left → pending after the backoff (never
    sooner than the provider's Retry-After); on the last attempt, or a permanent one →
    error. An unknown outcome (called, no answer: it may have been sent) → as a transient
    one, or error "unknown outcome" at once with OUTBOX_UNKNOWN_OUTCOME=fail; never
    refunded. A throttle → pending after Retry-After (else 1 s; a pair throttle: at least
    OUTBOX_PAIR_DELAY), refunded, unless it was throttled max_throttles times already →
    error "throttled". A sender-level failure → pending, refunded: its sender is paused
    (the claim leaves its rows until the breaker's probe). Expired before the call →
    error, refunded. Its sender unknown → error (permanent), refunded. Handed back
    uncalled → pending, refunded; cut short by the shutdown → pending at once, the
    attempt spent (the call may have reached the provider)."""
    ending = result.ending
    if ending is Ending.ANSWERED:
        failure = result.failure
        if failure is not None:
            return _failed(message, result, failure, policy)
        provider_id = result.provider_id
        return Completion(
            id=message.id,
            attempt=message.attempt,
            status=MessageStatus.SENT,
            outcome=AttemptOutcome.SENT,
            started_at=result.started_at,
            finished_at=result.finished_at,
            latency_ms=result.latency_ms,
            provider_message_id=clean_text(provider_id) if provider_id else None,
            sender=message.sender,
        )
    if ending is Ending.EXPIRED or ending is Ending.REFUSED:
        expired = ending is Ending.EXPIRED
        return Completion(
            id=message.id,
            attempt=message.attempt,
            status=MessageStatus.ERROR,
            outcome=AttemptOutcome.EXPIRED if expired else AttemptOutcome.PERMANENT,
            started_at=result.started_at,
            finished_at=result.finished_at,
            error="expired" if expired else result.reason,
            refund=1,
            sender=message.sender,
        )
    handed_back = ending is Ending.HANDED_BACK
    next_attempt_at = result.finished_at
    if handed_back and result.retry_at is not None:
        next_attempt_at = result.retry_at
    return Completion(
        id=message.id,
        attempt=message.attempt,
        status=MessageStatus.PENDING,
        outcome=AttemptOutcome.INTERRUPTED,
        started_at=result.started_at,
        finished_at=result.finished_at,
        error=result.reason,
        next_attempt_at=next_attempt_at,
        refund=1 if handed_back else 0,
        sender=message.sender,
    )


def _failed(
    message: Claimed, result: CallResult, failure: ProviderError, policy: RetryPolicy
) -> Completion:
    next_attempt_at: datetime | None = None
    refund = 0
    error = failure.reason
    kind = failure.kind
    throttle = _THROTTLES.get(kind)
    if kind is ErrorKind.SENDER:
        next_attempt_at, refund = result.finished_at, 1
    elif throttle is not None:
        refund = 1
        if message.throttles >= policy.max_throttles:
            error = "throttled"  # as "expired": the history keeps each throttle's reason
        else:
            delay = THROTTLE_RETRY if failure.retry_after is None else failure.retry_after
            if kind is ErrorKind.PAIR_THROTTLED:
                delay = max(delay, policy.pair_delay)
            next_attempt_at = result.finished_at + timedelta(seconds=min(delay, RETRY_AFTER_MAX))
    elif kind is ErrorKind.UNKNOWN and policy.unknown_outcome == "fail":
        error = f"unknown outcome: {error}"  # at most once: the provider may have sent it
    elif (
        kind is ErrorKind.TRANSIENT or kind is ErrorKind.UNKNOWN
    ) and message.attempt < message.max_attempts:
        delay = retry_delay(
            message.attempt,
            base=policy.base,
            cap=policy.cap,
            jitter=policy.jitter,
            retry_after=failure.retry_after,
            random=policy.random,
        )
        next_attempt_at = result.finished_at + timedelta(seconds=delay)
    sender_level = kind is ErrorKind.SENDER
    return Completion(
        id=message.id,
        attempt=message.attempt,
        status=MessageStatus.ERROR if next_attempt_at is None else MessageStatus.PENDING,
        outcome=_FAILED_OUTCOME[kind],
        started_at=result.started_at,
        finished_at=result.finished_at,
        latency_ms=result.latency_ms,
        error=error,
        next_attempt_at=next_attempt_at,
        refund=refund,
        sender=message.sender,
        throttle=throttle,
        claimed_at=message.claimed_at,
        code=None if failure.code is None else str(failure.code),
        pause_base=policy.sender_pause if sender_level else None,
        pause_max=policy.sender_pause_max if sender_level else None,
    )


def fallback_completion(message: Claimed, result: CallResult) -> Completion:
    """The safety net when recording an outcome failed (a bug): a sent message is recorded
    sent, any other is retried at once."""
    failure = result.failure
    sent = result.ending is Ending.ANSWERED and failure is None
    return Completion(
        id=message.id,
        attempt=message.attempt,
        status=MessageStatus.SENT if sent else MessageStatus.PENDING,
        outcome=AttemptOutcome.SENT if sent else AttemptOutcome.TRANSIENT,
        started_at=result.started_at,
        finished_at=result.finished_at,
        latency_ms=result.latency_ms,
        error=None if sent else (failure.reason if failure else result.reason),
        next_attempt_at=None if sent else result.finished_at,
        sender=message.sender,
    )


class Executor:
    """Runs attempts: each calls its message's sender's provider within what is left of
    its lease, and its completion goes to the completer. A sender-level error holds that
    sender here at once (`providers.hold`) and calls `on_sender_error(sender)`, so that
    its rows waiting to start go back to the database; its pause, for the whole cluster,
    is written with the outcome."""

    def __init__(
        self,
        settings: Settings,
        providers: SenderProviders,
        completer: Completer,
        metrics: DispatchMetrics,
        on_sender_error: Callable[[str], None] = lambda sender: None,
    ) -> None:
        self.providers = providers
        self.completer = completer
        self.metrics = metrics
        self.policy = RetryPolicy.from_settings(settings)
        self.calls_in_flight = 0
        self._call_timeout = settings.provider_timeout
        self._on_sender_error = on_sender_error
        self._started_calls: list[Any] = []  # loggers of calls whose start awaits its log line
        # Calls whose outcome awaits recording, with the logger bound to their message.
        self._ended_calls: list[tuple[Claimed, Any, CallResult]] = []
        self._recording: asyncio.TimerHandle | None = None

    def hand_back(
        self,
        message: Claimed,
        reason: str,
        retry_at: datetime | None = None,
        started_at: datetime | None = None,
    ) -> None:
        """Return a claimed row uncalled, without spending its attempt."""
        finished_at = datetime.now(UTC)
        result = CallResult(
            Ending.HANDED_BACK,
            started_at or finished_at,
            finished_at,
            reason=reason,
            retry_at=retry_at,
        )
        self.completer.put(completion(message, result, self.policy))

    async def attempt(self, message: Claimed, lease_end: float) -> None:
        """One attempt of `message`, whose lease ends at `lease_end` (monotonic time)."""
        started_at = datetime.now(UTC)
        bound = log.bind(
            message_id=str(message.id),
            user_id=message.user_id,
            sender=message.sender,
            to=mask_phone(message.to),
            attempt=f"{message.attempt}/{message.max_attempts}",
        )
        # One deadline for the whole call (httpx times each phase on its own), inside
        # what is left of the lease, so that the lease really bounds an attempt.
        budget = self._call_timeout
        if not self._may_call(message, bound, started_at, lease_end, budget):
            return
        try:
            held = self.providers.acquire(message.sender)
        except SenderLeftOut as exc:  # a key mismatch: no read of the senders mends it
            self._refuse(message, bound, started_at, exc.reason)
            return
        except UnknownSender:
            found = await self._acquire_after_reread(message, bound, started_at, lease_end, budget)
            if found is None:
                return
            held = found
        try:
            await self._call(message, bound, started_at, held.provider, budget)
        finally:
            self.providers.release(held)  # the call no longer uses its client

    async def _call(
        self,
        message: Claimed,
        bound: Any,
        started_at: datetime,
        provider: Provider,
        budget: float,
    ) -> None:
        # Logged on the loop's next turn, like outcomes: the call starts first (a wave of
        # calls starting together would otherwise each wait for the others' lines).
        self._started_calls.append(bound)
        self._schedule_recording()
        clock = time.perf_counter()
        self.calls_in_flight += 1
        progress = CallProgress()
        CALL_PROGRESS.set(progress)  # this attempt's own task: its context alone
        try:
            async with asyncio.timeout(budget):
                provider_id = await provider.send(
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
            # Once the request began to be written the provider may have it: none can
            # say. Before (connecting, waiting for a pooled connection), nothing was sent.
            provider_id = None
            failure = ProviderError(
                ErrorKind.UNKNOWN if progress.request_started else ErrorKind.TRANSIENT,
                f"{provider.name}: no answer within {budget:.3g}s"
                + ("" if progress.request_started else " (request not sent)"),
            )
        except asyncio.CancelledError:
            # Shutdown grace ran out: hand the row back rather than leave it in flight.
            cut = CallResult(
                Ending.CUT,
                started_at,
                datetime.now(UTC),
                reason="interrupted by dispatcher shutdown",
            )
            self.completer.put(completion(message, cut, self.policy))
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
        pausing = False
        if failure is not None and failure.kind is ErrorKind.SENDER:
            # Before a buffered row of this sender can start: it is held here until the
            # pause, written with this outcome, reaches the senders' directory.
            # The first error of a pause here, or a failed probe (its pause starts again,
            # twice as long): one error line each.
            pausing = self.providers.hold(message.sender) or message.probe
            if pausing:
                self._on_sender_error(message.sender)
        result = CallResult(
            Ending.ANSWERED,
            started_at,
            finished_at,
            latency_ms,
            provider_id,
            failure,
            pausing=pausing,
        )
        self._ended_calls.append((message, bound, result))
        self._schedule_recording()

    def _may_call(
        self, message: Claimed, bound: Any, started_at: datetime, lease_end: float, budget: float
    ) -> bool:
        """Whether the call may start; if not, the row's completion is on its way."""
        if message.expires_at is not None and message.expires_at <= started_at:
            bound.warning("expired before sending", outcome=AttemptOutcome.EXPIRED)
            expired = CallResult(Ending.EXPIRED, started_at, started_at)
            self.completer.put(completion(message, expired, self.policy))
            return False
        if self.providers.paused(message.sender) and not message.probe:
            # Paused since the claim took it (it waited in the buffer, the claim raced the
            # pause, or a call of its sender hit a sender-level error in this turn of the
            # loop): back uncalled, due at once; the claim leaves it alone until the sender
            # resumes.
            self.hand_back(message, "sender paused", None, started_at)
            return False
        if lease_end - time.monotonic() - LEASE_MARGIN < budget:
            # Waited in the prefetch buffer until the lease could not cover a whole call:
            # hand it back unattempted rather than cut the call short.
            self.hand_back(message, "lease too short to attempt", None, started_at)
            return False
        return True

    async def _acquire_after_reread(
        self, message: Claimed, bound: Any, started_at: datetime, lease_end: float, budget: float
    ) -> SenderProvider | None:
        """The message's sender is unknown here (created a moment ago, deleted in a race,
        or its settings make no provider): read the senders again, once. Still unknown:
        the attempt ends in error, uncalled and refunded; never a call with another
        sender's credentials. None: the row's completion is on its way."""
        try:
            await self.providers.reread()
        except asyncio.CancelledError:
            self.hand_back(message, "interrupted by dispatcher shutdown", None, started_at)
            raise
        except Exception as exc:  # the database away: the row is due again shortly
            bound.warning("could not read the senders again", error=str(exc).strip())
            retry_at = datetime.now(UTC) + timedelta(seconds=REREAD_RETRY)
            self.hand_back(message, "senders could not be read", retry_at, started_at)
            return None
        try:
            held = self.providers.acquire(message.sender)
        except UnknownSender as exc:
            self._refuse(message, bound, started_at, exc.reason)
            return None
        if not self._may_call(message, bound, started_at, lease_end, budget):
            self.providers.release(held)  # the read took long, or sending paused meanwhile
            return None
        return held

    def _refuse(self, message: Claimed, bound: Any, started_at: datetime, reason: str) -> None:
        """Its sender cannot be called: the attempt ends in error, uncalled and refunded."""
        bound.error("sender unknown: not sent", outcome=AttemptOutcome.PERMANENT, error=reason)
        refused = CallResult(Ending.REFUSED, started_at, datetime.now(UTC), reason=reason)
        self.completer.put(completion(message, refused, self.policy))

    # Recording --------------------------------------------------------------------

    def _schedule_recording(self) -> None:
        if self._recording is None:
            # The log lines and outcomes of calls wait for the loop's next turn, after
            # the calls that replace them have started: calls that end together (a
            # slow provider's waves) are all refilled before any bookkeeping.
            self._recording = asyncio.get_running_loop().call_later(
                RECORD_DELAY, self._record_calls
            )

    def flush(self) -> None:
        """Record now what waits for the loop's next turn (the dispatcher is stopping)."""
        if self._recording is not None:
            self._recording.cancel()
            self._record_calls()

    def _record_calls(self) -> None:
        self._recording = None
        self._log_started_calls()  # before any outcome: a call that started and ended
        ended, self._ended_calls = self._ended_calls, []  # within one turn logs in order
        for message, bound, result in ended:
            try:
                done = self._record(message, bound, result)
            except Exception:
                # A bug in one outcome must not lose the others of this turn, nor this
                # call's: a sent message is recorded sent, any other is retried.
                log.exception("could not record an outcome", message_id=str(message.id))
                done = fallback_completion(message, result)
            self.completer.put(done)
        if not self.calls_in_flight:
            self.completer.calls_ended()

    def _log_started_calls(self) -> None:
        started, self._started_calls = self._started_calls, []
        for bound in started:
            bound.info("attempt started")

    def _record(self, message: Claimed, bound: Any, result: CallResult) -> Completion:
        latency_ms = result.latency_ms or 0.0
        self.metrics.provider_duration.observe(latency_ms / 1000)
        done = completion(message, result, self.policy)
        bound = bound.bind(duration_ms=round(latency_ms, 2))
        failure = result.failure
        if failure is None:
            bound.info("sent", outcome=AttemptOutcome.SENT, provider_message_id=result.provider_id)
        elif failure.kind is ErrorKind.SENDER:
            # One error line per pause; the calls that were out meanwhile say it quietly.
            log_line = bound.error if result.pausing else bound.info
            log_line(
                "sender cannot send: pausing it",
                outcome=AttemptOutcome.SENDER,
                error=failure.reason,
                code=failure.code,
            )
        elif done.outcome is AttemptOutcome.THROTTLED:
            log_line = bound.info if done.next_attempt_at is not None else bound.error
            retry_in = (
                None
                if done.next_attempt_at is None
                else round((done.next_attempt_at - result.finished_at).total_seconds(), 3)
            )
            log_line(
                "throttled" if retry_in is not None else "throttled too often: not sent",
                outcome=AttemptOutcome.THROTTLED,
                error=failure.reason,
                throttles=message.throttles + 1,
                retry_in=retry_in,
            )
        elif done.next_attempt_at is not None:
            delay = (done.next_attempt_at - result.finished_at).total_seconds()
            bound.info(
                "attempt failed, will retry",
                outcome=done.outcome,  # transient, or unknown: it may have been sent
                error=failure.reason,
                retry_in=round(delay, 3),
            )
        elif failure.kind is ErrorKind.UNKNOWN and self.policy.unknown_outcome == "fail":
            bound.error(
                "unknown outcome: not retried (OUTBOX_UNKNOWN_OUTCOME=fail)",
                outcome=done.outcome,
                error=failure.reason,
            )
        else:
            bound.error(
                f"failed after {message.attempt} attempts",
                outcome=done.outcome,
                error=failure.reason,
            )
        return done
