"""The outcome policy for the provider's rate limits and sender-level errors: a throttle
spends no attempt and comes back after Retry-After (a pair throttle: at least the pair
delay) until the message has been throttled too often; a sender-level error stays pending
and pauses its sender. And the classes those errors get from a status and a code."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime, timedelta

import pytest

from outbox.executor import CallResult, Ending, RetryPolicy, completion
from outbox.providers.base import OutgoingMessage, ProviderError
from outbox.retry import RETRY_AFTER_MAX, SESSION_NOT_READY, ErrorKind, classify, classify_gateway
from outbox.states import AttemptOutcome, MessageStatus
from outbox.store import Completion
from tests.unit.offline import claimed, offline_executor, offline_settings, queued

STARTED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
FINISHED = STARTED + timedelta(milliseconds=250)
POLICY = RetryPolicy(
    base=2.0,
    cap=30.0,
    jitter=0,
    sender_pause=60.0,
    sender_pause_max=3600.0,
    max_throttles=5,
    pair_delay=6.0,
)


def answered(failure: ProviderError) -> CallResult:
    return CallResult(Ending.ANSWERED, STARTED, FINISHED, 250.0, None, failure)


def outcome_of(
    failure: ProviderError, *, attempt: int = 1, throttles: int = 0, policy: RetryPolicy = POLICY
) -> Completion:
    """The completion of `attempt` (of 4), throttled `throttles` times before, that
    failed with `failure`."""
    message = dataclasses.replace(claimed(attempt), throttles=throttles)
    done = completion(message, answered(failure), policy)
    assert (done.id, done.attempt, done.sender) == (message.id, message.attempt, "default")
    assert (done.started_at, done.finished_at, done.latency_ms) == (STARTED, FINISHED, 250.0)
    return done


def rate_limited(retry_after: float | None = None) -> ProviderError:
    return ProviderError(
        ErrorKind.THROTTLED, "cloud 130429: rate limit hit", retry_after=retry_after, code=130429
    )


def pair_limited(retry_after: float | None = None) -> ProviderError:
    return ProviderError(
        ErrorKind.PAIR_THROTTLED, "cloud 131056: pair rate limit", retry_after=retry_after
    )


# Throttles ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [
        (None, 1.0),  # no Retry-After: one second
        (3.0, 3.0),
        (0.0, 0.0),
        (10 * RETRY_AFTER_MAX, RETRY_AFTER_MAX),  # at most a day
    ],
)
def test_a_rate_throttle_is_pending_after_retry_after_and_refunded(
    retry_after: float | None, delay: float
) -> None:
    done = outcome_of(rate_limited(retry_after))
    assert (done.status, done.outcome, done.throttle) == (
        MessageStatus.PENDING,
        AttemptOutcome.THROTTLED,
        "rate",
    )
    assert done.next_attempt_at == FINISHED + timedelta(seconds=delay)
    assert (done.refund, done.error) == (1, "cloud 130429: rate limit hit")
    assert (done.pause_base, done.pause_max) == (None, None)  # no pause: its rate adapts


def test_a_throttle_on_the_last_attempt_spends_nothing_and_is_not_final() -> None:
    done = outcome_of(rate_limited(), attempt=4)
    assert (done.status, done.refund) == (MessageStatus.PENDING, 1)
    assert done.next_attempt_at == FINISHED + timedelta(seconds=1)


def test_the_backoff_does_not_apply_to_a_throttle() -> None:
    # Attempt 3's backoff would be 8 s: a throttle waits only for the provider.
    done = outcome_of(rate_limited(), attempt=3)
    assert done.next_attempt_at == FINISHED + timedelta(seconds=1)


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [
        (None, 6.0),  # the pair delay
        (2.0, 6.0),  # a shorter Retry-After: still the pair delay
        (20.0, 20.0),  # a longer one wins
    ],
)
def test_a_pair_throttle_waits_at_least_the_pair_delay(
    retry_after: float | None, delay: float
) -> None:
    done = outcome_of(pair_limited(retry_after))
    assert (done.status, done.outcome, done.throttle) == (
        MessageStatus.PENDING,
        AttemptOutcome.THROTTLED,
        "pair",
    )
    assert done.next_attempt_at == FINISHED + timedelta(seconds=delay)
    assert done.refund == 1


def test_the_pair_delay_is_the_policys() -> None:
    policy = dataclasses.replace(POLICY, pair_delay=0.5)
    done = outcome_of(pair_limited(), policy=policy)
    assert done.next_attempt_at == FINISHED + timedelta(seconds=1.0)  # 1 s beats 0.5 s
    policy = dataclasses.replace(POLICY, pair_delay=30.0)
    done = outcome_of(pair_limited(), policy=policy)
    assert done.next_attempt_at == FINISHED + timedelta(seconds=30.0)


@pytest.mark.parametrize("failure", [rate_limited(2.0), pair_limited()])
def test_a_message_throttled_too_often_ends_in_error_throttled(failure: ProviderError) -> None:
    # Throttled max_throttles (5) times already: this one is the last it takes.
    done = outcome_of(failure, throttles=POLICY.max_throttles)
    assert (done.status, done.outcome, done.error) == (
        MessageStatus.ERROR,
        AttemptOutcome.THROTTLED,
        "throttled",
    )
    assert (done.next_attempt_at, done.refund) == (None, 1)
    assert done.throttle is not None  # its sender was throttled all the same


def test_one_throttle_short_of_the_limit_is_still_pending() -> None:
    done = outcome_of(rate_limited(), throttles=POLICY.max_throttles - 1)
    assert (done.status, done.error) == (MessageStatus.PENDING, "cloud 130429: rate limit hit")


def test_no_throttle_is_taken_with_max_throttles_zero() -> None:
    done = outcome_of(rate_limited(), policy=dataclasses.replace(POLICY, max_throttles=0))
    assert (done.status, done.error, done.refund) == (MessageStatus.ERROR, "throttled", 1)


# Sender-level errors --------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 4])
def test_a_sender_level_error_is_pending_refunded_and_carries_the_pause(attempt: int) -> None:
    policy = dataclasses.replace(POLICY, sender_pause=5.0, sender_pause_max=40.0)
    failure = ProviderError(ErrorKind.SENDER, "cloud 190: token expired", code=190)
    done = outcome_of(failure, attempt=attempt, policy=policy)
    assert (done.status, done.outcome, done.refund) == (
        MessageStatus.PENDING,
        AttemptOutcome.SENDER,
        1,
    )
    # Due at once: its sender's pause keeps the claim away from it meanwhile.
    assert done.next_attempt_at == FINISHED
    assert (done.pause_base, done.pause_max) == (5.0, 40.0)
    assert (done.code, done.error, done.throttle) == ("190", "cloud 190: token expired", None)


def test_a_sender_level_error_without_a_code_has_none() -> None:
    done = outcome_of(ProviderError(ErrorKind.SENDER, "blocked"))
    assert (done.code, done.pause_base) == (None, 60.0)


def test_other_failures_tell_nothing_of_their_sender() -> None:
    for failure in (
        ProviderError(ErrorKind.TRANSIENT, "http 503", code=131000),
        ProviderError(ErrorKind.PERMANENT, "undeliverable", code=131026),
    ):
        done = outcome_of(failure)
        assert (done.throttle, done.pause_base, done.pause_max) == (None, None, None)


def test_the_policy_comes_from_the_settings() -> None:
    settings = offline_settings(
        sender_pause=7, sender_pause_max=70, max_throttles=3, pair_delay=2.5
    )
    policy = RetryPolicy.from_settings(settings)
    assert (policy.sender_pause, policy.sender_pause_max) == (7.0, 70.0)
    assert (policy.max_throttles, policy.pair_delay) == (3, 2.5)
    defaults = RetryPolicy.from_settings(offline_settings())
    assert (defaults.sender_pause, defaults.sender_pause_max) == (60.0, 3600.0)
    assert (defaults.max_throttles, defaults.pair_delay) == (100, 6.0)


# In the executor: a throttle holds nothing back -----------------------------------


class ThrottledOnce:
    """Throttles its first call, sends the others."""

    name = "throttled-once"

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, message: OutgoingMessage) -> str | None:
        self.calls += 1
        if self.calls == 1:
            raise rate_limited(0.5)
        return f"id-{self.calls}"


def test_a_throttle_does_not_hold_its_sender_in_the_process() -> None:
    provider = ThrottledOnce()

    async def run() -> list[Completion]:
        executor = offline_executor(provider)
        lease_end = time.monotonic() + 60
        await executor.attempt(claimed(), lease_end)
        assert not executor.providers.paused("default")
        await executor.attempt(claimed(), lease_end)
        await asyncio.sleep(0.05)  # the loop's next turns: the deferred outcomes
        return queued(executor)

    throttled, sent = asyncio.run(run())
    assert provider.calls == 2
    assert (throttled.outcome, throttled.throttle, throttled.refund) == (
        AttemptOutcome.THROTTLED,
        "rate",
        1,
    )
    assert throttled.next_attempt_at == throttled.finished_at + timedelta(seconds=0.5)
    assert sent.status is MessageStatus.SENT


# Classes --------------------------------------------------------------------------


def test_a_429_without_a_code_is_a_throttle() -> None:
    assert classify(429, None) is ErrorKind.THROTTLED
    assert classify(429, 999_999) is ErrorKind.THROTTLED  # a code not in the table


@pytest.mark.parametrize("status", [None, 408, 500, 502, 503, 504, 599])
def test_no_answer_408_and_5xx_stay_transient(status: int | None) -> None:
    assert classify(status, None) is ErrorKind.TRANSIENT


@pytest.mark.parametrize(("code", "status"), [(130429, 429), (80007, 400), (4, 403)])
def test_the_cloud_rate_limits_are_throttles(code: int, status: int) -> None:
    assert classify(status, code) is ErrorKind.THROTTLED


def test_the_pair_rate_limit_is_a_pair_throttle() -> None:
    assert classify(400, 131056) is ErrorKind.PAIR_THROTTLED
    assert classify(429, 131056) is ErrorKind.PAIR_THROTTLED


def test_a_gateway_relaying_a_cloud_rate_limit_is_throttled() -> None:
    assert classify_gateway(400, 130429) is ErrorKind.THROTTLED
    assert classify_gateway(502, 131056) is ErrorKind.PAIR_THROTTLED
    assert classify_gateway(429, None) is ErrorKind.THROTTLED
    assert classify_gateway(429, "slow_down") is ErrorKind.THROTTLED
    # A gateway's session not ready stays transient per message, whatever its status.
    assert classify_gateway(429, SESSION_NOT_READY) is ErrorKind.TRANSIENT
