"""The outcome policy (`outbox.executor.completion`): what each way an attempt can end
writes, one error class at a time, with the clock and the randomness given."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from outbox.executor import CallResult, Ending, RetryPolicy, completion, fallback_completion
from outbox.providers.base import ProviderError
from outbox.retry import RETRY_AFTER_MAX, ErrorKind
from outbox.states import AttemptOutcome, MessageStatus
from outbox.store import Completion
from tests.unit.offline import claimed, offline_settings

STARTED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
FINISHED = STARTED + timedelta(milliseconds=250)
# Backoff 2 s · 2^(n−1), capped at 30 s, without jitter: retry n waits exactly that.
POLICY = RetryPolicy(base=2.0, cap=30.0, jitter=0, sender_pause=60.0)


def answered(failure: ProviderError | None = None, provider_id: str | None = None) -> CallResult:
    return CallResult(Ending.ANSWERED, STARTED, FINISHED, 250.0, provider_id, failure)


def outcome_of(attempt: int, result: CallResult, policy: RetryPolicy = POLICY) -> Completion:
    """The completion of `attempt` (of 4) that ended as `result`."""
    message = claimed(attempt)
    done = completion(message, result, policy)
    assert (done.id, done.attempt) == (message.id, message.attempt)
    assert (done.started_at, done.finished_at) == (result.started_at, result.finished_at)
    return done


def test_a_success_is_sent_with_the_providers_id_cleaned() -> None:
    done = outcome_of(1, answered(provider_id="wamid.\x00abc"))
    assert (done.status, done.outcome) == (MessageStatus.SENT, AttemptOutcome.SENT)
    assert done.provider_message_id == "wamid.\ufffdabc"  # PostgreSQL stores no NUL
    assert (done.latency_ms, done.error, done.next_attempt_at, done.refund) == (
        250.0,
        None,
        None,
        0,
    )


def test_a_success_without_an_id_is_sent() -> None:
    done = outcome_of(1, answered(provider_id=None))
    assert (done.status, done.provider_message_id) == (MessageStatus.SENT, None)


@pytest.mark.parametrize(("attempt", "delay"), [(1, 2.0), (2, 4.0), (3, 8.0)])
def test_a_transient_failure_with_attempts_left_is_pending_after_the_backoff(
    attempt: int, delay: float
) -> None:
    done = outcome_of(attempt, answered(ProviderError(ErrorKind.TRANSIENT, "503 from provider")))
    assert (done.status, done.outcome) == (MessageStatus.PENDING, AttemptOutcome.TRANSIENT)
    assert done.next_attempt_at == FINISHED + timedelta(seconds=delay)
    assert (done.error, done.refund, done.latency_ms) == ("503 from provider", 0, 250.0)


def test_the_backoff_is_capped() -> None:
    policy = RetryPolicy(base=2.0, cap=3.0, jitter=0, sender_pause=60.0)
    done = outcome_of(3, answered(ProviderError(ErrorKind.TRANSIENT, "timeout")), policy)
    assert done.next_attempt_at == FINISHED + timedelta(seconds=3.0)


def test_the_jitter_draws_from_the_policys_randomness() -> None:
    # ±20 % around 2 s; a draw of 0.75 lands at 1.6 + 0.8 · 0.75 = 2.2 s.
    policy = RetryPolicy(base=2.0, cap=30.0, jitter=0.2, sender_pause=60.0, random=lambda: 0.75)
    done = outcome_of(1, answered(ProviderError(ErrorKind.TRANSIENT, "timeout")), policy)
    assert done.next_attempt_at == FINISHED + timedelta(seconds=2.2)


def test_a_transient_failure_on_the_last_attempt_is_final() -> None:
    done = outcome_of(4, answered(ProviderError(ErrorKind.TRANSIENT, "503 from provider")))
    assert (done.status, done.outcome) == (MessageStatus.ERROR, AttemptOutcome.TRANSIENT)
    assert (done.next_attempt_at, done.refund, done.error) == (None, 0, "503 from provider")


UNKNOWN = ProviderError(ErrorKind.UNKNOWN, "cloud: timeout after 10s (ReadTimeout)")


@pytest.mark.parametrize(("attempt", "delay"), [(1, 2.0), (2, 4.0), (3, 8.0)])
def test_an_unknown_outcome_is_retried_after_the_backoff_by_default(
    attempt: int, delay: float
) -> None:
    # It may have been sent: the attempt is spent, recorded `unknown`, never refunded.
    done = outcome_of(attempt, answered(UNKNOWN))
    assert (done.status, done.outcome) == (MessageStatus.PENDING, AttemptOutcome.UNKNOWN)
    assert done.next_attempt_at == FINISHED + timedelta(seconds=delay)
    assert (done.error, done.refund, done.latency_ms) == (
        "cloud: timeout after 10s (ReadTimeout)",
        0,
        250.0,
    )


def test_an_unknown_outcome_on_the_last_attempt_is_final() -> None:
    done = outcome_of(4, answered(UNKNOWN))
    assert (done.status, done.outcome) == (MessageStatus.ERROR, AttemptOutcome.UNKNOWN)
    assert (done.next_attempt_at, done.refund, done.error) == (
        None,
        0,
        "cloud: timeout after 10s (ReadTimeout)",
    )


@pytest.mark.parametrize("attempt", [1, 4])
def test_an_unknown_outcome_with_fail_is_final_at_once(attempt: int) -> None:
    policy = dataclasses.replace(POLICY, unknown_outcome="fail")
    done = outcome_of(attempt, answered(UNKNOWN), policy)
    assert (done.status, done.outcome) == (MessageStatus.ERROR, AttemptOutcome.UNKNOWN)
    assert (done.next_attempt_at, done.refund, done.error) == (
        None,
        0,
        "unknown outcome: cloud: timeout after 10s (ReadTimeout)",
    )


def test_fail_leaves_a_transient_failure_retried() -> None:
    # Only an unknown outcome is final: a call known not sent is retried as ever.
    policy = dataclasses.replace(POLICY, unknown_outcome="fail")
    failure = ProviderError(ErrorKind.TRANSIENT, "cloud: ConnectError: refused")
    done = outcome_of(1, answered(failure), policy)
    assert (done.status, done.outcome) == (MessageStatus.PENDING, AttemptOutcome.TRANSIENT)
    assert (done.error, done.next_attempt_at) == (
        "cloud: ConnectError: refused",
        FINISHED + timedelta(seconds=2.0),
    )


def test_the_policy_takes_unknown_outcome_from_the_settings() -> None:
    assert RetryPolicy.from_settings(offline_settings()).unknown_outcome == "retry"
    fail = offline_settings(unknown_outcome="fail")
    assert RetryPolicy.from_settings(fail).unknown_outcome == "fail"


@pytest.mark.parametrize("attempt", [1, 4])
def test_a_permanent_failure_is_final_whatever_the_attempts_left(attempt: int) -> None:
    done = outcome_of(attempt, answered(ProviderError(ErrorKind.PERMANENT, "131026")))
    assert (done.status, done.outcome) == (MessageStatus.ERROR, AttemptOutcome.PERMANENT)
    assert (done.next_attempt_at, done.refund, done.error) == (None, 0, "131026")


@pytest.mark.parametrize("attempt", [1, 4])
def test_a_sender_failure_stays_pending_refunded_and_pauses_its_sender(attempt: int) -> None:
    # Due at once: its sender's pause (written with the outcome, in SQL) keeps the claim
    # away from it, whatever the attempts left or the Retry-After.
    failure = ProviderError(ErrorKind.SENDER, "token expired", retry_after=5.0, code=190)
    done = outcome_of(attempt, answered(failure))
    assert (done.status, done.outcome) == (MessageStatus.PENDING, AttemptOutcome.SENDER)
    assert (done.next_attempt_at, done.refund, done.error) == (FINISHED, 1, "token expired")
    assert (done.pause_base, done.pause_max, done.code) == (60.0, 3600.0, "190")
    assert (done.throttle, done.sender) == (None, "default")


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [
        (120.0, 120.0),  # later than the backoff: the provider's floor wins
        (1.0, 2.0),  # sooner than the backoff: the backoff
        (None, 2.0),
        (10 * RETRY_AFTER_MAX, RETRY_AFTER_MAX),  # at most a day
    ],
)
def test_retry_after_is_a_floor(retry_after: float | None, delay: float) -> None:
    failure = ProviderError(ErrorKind.TRANSIENT, "http 503", retry_after=retry_after)
    done = outcome_of(1, answered(failure))
    assert done.next_attempt_at == FINISHED + timedelta(seconds=delay)


def test_retry_after_does_not_extend_the_last_attempt() -> None:
    failure = ProviderError(ErrorKind.TRANSIENT, "http 503", retry_after=120.0)
    done = outcome_of(4, answered(failure))
    assert (done.status, done.next_attempt_at) == (MessageStatus.ERROR, None)


def test_an_expired_message_is_final_uncalled_and_refunded() -> None:
    done = outcome_of(2, CallResult(Ending.EXPIRED, STARTED, STARTED))
    assert (done.status, done.outcome) == (MessageStatus.ERROR, AttemptOutcome.EXPIRED)
    assert (done.error, done.refund, done.next_attempt_at, done.latency_ms) == (
        "expired",
        1,
        None,
        None,
    )
    assert done.finished_at == done.started_at


def test_a_message_whose_sender_is_unknown_is_final_uncalled_and_refunded() -> None:
    reason = "sender 'gone' does not exist"
    done = outcome_of(1, CallResult(Ending.REFUSED, STARTED, FINISHED, reason=reason))
    assert (done.status, done.outcome) == (MessageStatus.ERROR, AttemptOutcome.PERMANENT)
    assert (done.error, done.refund, done.next_attempt_at) == (reason, 1, None)
    assert done.sender == "default"  # the message's, for the attempts counter


def test_a_call_cut_short_by_the_shutdown_is_pending_at_once_its_attempt_spent() -> None:
    cut = CallResult(Ending.CUT, STARTED, FINISHED, reason="interrupted by dispatcher shutdown")
    done = outcome_of(2, cut)
    assert (done.status, done.outcome) == (MessageStatus.PENDING, AttemptOutcome.INTERRUPTED)
    assert (done.next_attempt_at, done.refund, done.error) == (
        FINISHED,
        0,
        "interrupted by dispatcher shutdown",
    )


def test_a_row_handed_back_uncalled_is_pending_at_once_and_refunded() -> None:
    handed_back = CallResult(
        Ending.HANDED_BACK, STARTED, FINISHED, reason="lease too short to attempt"
    )
    done = outcome_of(2, handed_back)
    assert (done.status, done.outcome) == (MessageStatus.PENDING, AttemptOutcome.INTERRUPTED)
    assert (done.next_attempt_at, done.refund, done.error) == (
        FINISHED,
        1,
        "lease too short to attempt",
    )


def test_a_row_handed_back_with_a_retry_time_is_due_then() -> None:
    later = FINISHED + timedelta(seconds=1)
    unread = CallResult(
        Ending.HANDED_BACK, STARTED, FINISHED, reason="senders could not be read", retry_at=later
    )
    done = outcome_of(1, unread)
    assert (done.status, done.next_attempt_at, done.refund) == (MessageStatus.PENDING, later, 1)


def test_the_fallback_records_a_success_sent_and_retries_anything_else_at_once() -> None:
    message = claimed(4)
    sent = fallback_completion(message, answered(provider_id="wamid.1"))
    assert (sent.status, sent.outcome, sent.next_attempt_at) == (
        MessageStatus.SENT,
        AttemptOutcome.SENT,
        None,
    )
    failed = fallback_completion(message, answered(ProviderError(ErrorKind.PERMANENT, "bad")))
    assert (failed.status, failed.outcome, failed.next_attempt_at, failed.error) == (
        MessageStatus.PENDING,
        AttemptOutcome.TRANSIENT,
        FINISHED,
        "bad",
    )
