"""The retry policy (property tests of bounds and cap) and the error-class table, row by row."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.retry import (
    CLOUD_ERROR_KINDS,
    RETRY_AFTER_MAX,
    SESSION_NOT_READY,
    ErrorKind,
    backoff_delay,
    classify,
    classify_gateway,
    retry_delay,
)

T, P, S = ErrorKind.TRANSIENT, ErrorKind.PERMANENT, ErrorKind.SENDER
R, PAIR = ErrorKind.THROTTLED, ErrorKind.PAIR_THROTTLED

attempts = st.integers(min_value=1, max_value=10**6)
seconds = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
fractions = st.floats(min_value=0, max_value=1, allow_nan=False)
unit_random = st.floats(min_value=0, max_value=1, exclude_max=True, allow_nan=False)
jitters: st.SearchStrategy[float | Literal["full"]] = st.one_of(fractions, st.just("full"))


def nominal(attempt: int, base: float, cap: float) -> float:
    """min(cap, base·2^(n−1)), computed independently of the module, in exact fractions."""
    if base == 0:
        return 0.0
    if attempt > 2200:  # 2^2199 times the smallest positive float exceeds any float cap
        return cap
    return float(min(Fraction(cap), Fraction(base) * 2 ** (attempt - 1)))


# Backoff ----------------------------------------------------------------------------


def test_exact_delays_without_jitter() -> None:
    delays = [backoff_delay(n, base=60, cap=600, jitter=0) for n in range(1, 8)]
    assert delays == [60, 120, 240, 480, 600, 600, 600]


def test_the_default_policy_is_about_60_120_240_seconds() -> None:
    mid = lambda: 0.5  # noqa: E731 - the centre of the jitter range
    assert [backoff_delay(n, base=60, cap=600, jitter=0.2, random=mid) for n in (1, 2, 3)] == [
        60,
        120,
        240,
    ]


def test_huge_attempts_do_not_overflow() -> None:
    assert backoff_delay(10**9, base=60, cap=600, jitter=0) == 600
    assert backoff_delay(10**9, base=1e300, cap=1e308, jitter="full", random=lambda: 0.5) == 5e307


def test_fractions_of_a_second_are_allowed() -> None:
    assert backoff_delay(3, base=0.01, cap=1, jitter=0) == pytest.approx(0.04)


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempt_must_be_positive(attempt: int) -> None:
    with pytest.raises(ValueError):
        backoff_delay(attempt, base=60, cap=600, jitter=0)


@pytest.mark.parametrize("jitter", [-0.1, 1.5])
def test_jitter_must_be_a_fraction(jitter: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(1, base=60, cap=600, jitter=jitter)


@given(attempts, seconds, seconds, unit_random)
def test_no_jitter_is_exactly_the_capped_delay(
    attempt: int, base: float, cap: float, r: float
) -> None:
    delay = backoff_delay(attempt, base=base, cap=cap, jitter=0, random=lambda: r)
    assert delay == nominal(attempt, base, cap)
    assert delay <= cap


@given(attempts, seconds, seconds, fractions, unit_random)
def test_fractional_jitter_stays_around_the_capped_delay(
    attempt: int, base: float, cap: float, jitter: float, r: float
) -> None:
    d = nominal(attempt, base, cap)
    delay = backoff_delay(attempt, base=base, cap=cap, jitter=jitter, random=lambda: r)
    assert d * (1 - jitter) <= delay <= d * (1 + jitter)
    # The cap applies before the jitter: at most (1 + j) · cap.
    assert delay <= cap * (1 + jitter)


@given(attempts, seconds, seconds, unit_random)
def test_full_jitter_is_within_zero_and_the_capped_delay(
    attempt: int, base: float, cap: float, r: float
) -> None:
    delay = backoff_delay(attempt, base=base, cap=cap, jitter="full", random=lambda: r)
    assert 0 <= delay <= nominal(attempt, base, cap) <= cap


@given(attempts, seconds, seconds, jitters, unit_random)
def test_every_mode_is_finite_and_never_negative(
    attempt: int, base: float, cap: float, jitter: float | Literal["full"], r: float
) -> None:
    delay = backoff_delay(attempt, base=base, cap=cap, jitter=jitter, random=lambda: r)
    assert math.isfinite(delay)
    assert delay >= 0


@given(st.integers(min_value=1, max_value=200), seconds, seconds)
def test_without_jitter_delays_never_shrink(attempt: int, base: float, cap: float) -> None:
    first = backoff_delay(attempt, base=base, cap=cap, jitter=0)
    assert first <= backoff_delay(attempt + 1, base=base, cap=cap, jitter=0)


@given(
    attempts,
    seconds,
    seconds,
    jitters,
    unit_random,
    st.one_of(st.none(), st.floats(min_value=0, max_value=1e7, allow_nan=False)),
)
def test_retry_after_is_never_undercut_up_to_a_day(
    attempt: int,
    base: float,
    cap: float,
    jitter: float | Literal["full"],
    r: float,
    retry_after: float | None,
) -> None:
    backoff = backoff_delay(attempt, base=base, cap=cap, jitter=jitter, random=lambda: r)
    delay = retry_delay(
        attempt, base=base, cap=cap, jitter=jitter, retry_after=retry_after, random=lambda: r
    )
    assert delay >= backoff
    if retry_after is None:
        assert delay == backoff
    else:
        assert delay == max(backoff, min(retry_after, RETRY_AFTER_MAX))


def test_a_long_retry_after_wins_over_the_backoff() -> None:
    assert retry_delay(1, base=60, cap=600, jitter=0, retry_after=900) == 900
    assert retry_delay(1, base=60, cap=600, jitter=0, retry_after=5) == 60


def test_an_absurd_retry_after_is_taken_as_a_day() -> None:
    # 1e12 s would overflow a datetime: the row must stay schedulable.
    assert retry_delay(1, base=60, cap=600, jitter=0, retry_after=1e12) == 86_400


# The error-class table --------------------------------------------------------------

# Written out by hand from ../shared/whatsapp-cloud-api.md §4: a changed row in the
# module fails `test_the_table_is_exactly_the_expected_one` and its own row below.
EXPECTED_CLOUD: dict[int, ErrorKind] = {
    # throttles: rate limits, no attempt spent
    130429: R,  # the sender's throughput
    80007: R,  # the WABA's
    4: R,  # the app's
    131056: PAIR,  # one recipient from one sender
    # transient: "try again"
    131000: T,
    131016: T,
    1: T,
    2: T,
    133004: T,
    131057: T,
    2494100: T,
    # permanent
    131026: P,
    131047: P,
    131050: P,
    131021: P,
    131051: P,
    131052: P,
    131053: P,
    131008: P,
    131009: P,
    100: P,
    132000: P,
    132001: P,
    132005: P,
    132007: P,
    132012: P,
    132015: P,
    132016: P,
    130472: P,
    130497: P,
    131049: P,  # needs ≥ 24 h, beyond our 4 attempts
    # sender-level
    190: S,
    368: S,
    131031: S,
    131042: S,
    133010: S,
    131048: S,
    0: S,
    3: S,
    10: S,
    **{code: S for code in range(200, 300)},
}


def test_the_table_is_exactly_the_expected_one() -> None:
    assert dict(CLOUD_ERROR_KINDS) == EXPECTED_CLOUD


@pytest.mark.parametrize(("code", "kind"), sorted(CLOUD_ERROR_KINDS.items()))
def test_each_table_row(code: int, kind: ErrorKind) -> None:
    assert EXPECTED_CLOUD.get(code) == kind
    # The provider's own code decides, whatever the HTTP status says.
    for status in (None, 200, 400, 401, 403, 404, 429, 500, 503):
        assert classify(status, code) is kind, (status, code)


@pytest.mark.parametrize(("code", "kind"), sorted(EXPECTED_CLOUD.items()))
def test_each_expected_row_is_in_the_table(code: int, kind: ErrorKind) -> None:
    assert classify(400, code) is kind


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (None, T),  # connection error or timeout: no response at all
        (408, T),
        (429, R),  # a throttle: no attempt spent
        (500, T),
        (502, T),
        (503, T),
        (504, T),
        (599, T),
        (400, P),
        (401, P),
        (403, P),
        (404, P),
        (409, P),
        (413, P),
        (422, P),
        (302, P),  # a provider should never redirect: a misconfiguration, not a retry
    ],
)
def test_status_decides_when_there_is_no_code(status: int | None, kind: ErrorKind) -> None:
    assert classify(status, None) is kind


@pytest.mark.parametrize(
    ("status", "kind"), [(None, T), (400, P), (404, P), (429, R), (500, T), (503, T)]
)
def test_an_unknown_code_falls_back_to_the_status(status: int | None, kind: ErrorKind) -> None:
    assert 999_999 not in CLOUD_ERROR_KINDS
    assert classify(status, 999_999) is kind


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (409, SESSION_NOT_READY, T),
        (503, SESSION_NOT_READY, T),
        (400, SESSION_NOT_READY, T),
        (409, None, P),
        (409, "conflict", P),
        (503, None, T),
        (400, 131026, P),  # a relayed Cloud code is classified like the Cloud API
        (400, 130429, R),
        (429, 131056, PAIR),
        (429, None, R),
        (429, SESSION_NOT_READY, T),
        (500, 190, S),
        (None, None, T),
    ],
)
def test_gateway_classification(
    status: int | None, error: int | str | None, kind: ErrorKind
) -> None:
    assert classify_gateway(status, error) is kind
