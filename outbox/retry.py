"""Retry policy (jittered exponential backoff) and the one error-class table.

Backoff: the delay before retry n (attempt n just failed, n ≥ 1) is
`d = min(cap, base · 2^(n−1))`; jitter then applies *around the capped value*,
as the contract says ("±20 % around min(cap, base·2^(n−1))"), so with jitter
`j` a delay lies in `[d·(1−j), d·(1+j)]` and may exceed `cap` by up to `j·cap`.
`"full"` jitter is uniform in `[0, d]` (Celery's `retry_jitter`), `0` is exactly
`d`. A provider's `Retry-After` is a floor: we never retry sooner.

Error classes (`classify`): the provider's own error code decides first (the
Cloud API's `error.code`, looked up in `CLOUD_ERROR_KINDS`); the HTTP status
decides only when there is no code or the code is not in the table:
no response at all (a connection error before the request was written), 408 and 5xx are
transient, 429 a throttle; any other status (other 4xx, and 1xx/3xx, which a provider should
never answer) is permanent. A request that may have reached the provider without an answer
(a write or read error or timeout, the connection closed, the call's deadline) is `unknown`
(`providers.base.transport_error`): retried as transient, or final per
OUTBOX_UNKNOWN_OUTCOME=fail.

Convention for the generic `http` provider (self-hosted gateways that keep a
WhatsApp session per user): a gateway whose session is not ready (still
pairing, reconnecting) answers with a JSON body whose error is
`"session_not_ready"`, either `{"error": "session_not_ready"}` or
`{"error": {"code": "session_not_ready", "message": "..."}}`, with any status
(409 or 503 recommended). That is transient whatever the status: see
`classify_gateway`. A gateway that relays Cloud API failures may put the
numeric Cloud code in `error.code`; it is then classified like the Cloud API.
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Callable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final, Literal


class ErrorKind(StrEnum):
    TRANSIENT = "transient"  # retry after the backoff
    PERMANENT = "permanent"  # final at once: retrying cannot help
    SENDER = "sender"  # the account cannot send at all: pause, spend no attempt
    # The provider's rate limits: spend no attempt, go again after Retry-After (else 1 s).
    THROTTLED = "throttled"  # the sender's throughput: its rate is halved
    PAIR_THROTTLED = "pair_throttled"  # too many to one recipient: only theirs wait
    # No answer after the request may have reached the provider: sent or not, none can say.
    UNKNOWN = "unknown"  # retried as transient, or final (OUTBOX_UNKNOWN_OUTCOME=fail)


# Past 2**2200 every positive float base (even the smallest subnormal, 2**-1074)
# overflows, so larger exponents need not be computed.
_MAX_EXPONENT: Final = 2200


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    jitter: float | Literal["full"],
    random: Callable[[], float] = _random.random,
) -> float:
    """Seconds to wait before retrying after failed attempt `attempt` (≥ 1).

    Pure: the only randomness comes from `random` (uniform in [0, 1)).
    """
    if attempt < 1:
        raise ValueError("attempt must be at least 1")
    if base < 0 or cap < 0:
        raise ValueError("base and cap must not be negative")
    try:  # ldexp is an exact base·2^k; it raises rather than return inf
        raw = math.ldexp(base, min(attempt - 1, _MAX_EXPONENT))
    except OverflowError:
        raw = math.inf
    delay = min(cap, raw)
    if jitter == "full":
        return min(delay, delay * random())
    if not 0 <= jitter <= 1:
        raise ValueError("jitter must be 'full' or a fraction in [0, 1]")
    if jitter == 0:
        return delay
    low, high = delay * (1 - jitter), delay * (1 + jitter)
    # Clamped so that float rounding can never step outside the documented bounds.
    return min(high, max(low, low + (high - low) * random()))


RETRY_AFTER_MAX = 86_400.0  # seconds


def retry_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    jitter: float | Literal["full"],
    retry_after: float | None,
    random: Callable[[], float] = _random.random,
) -> float:
    """The backoff, but never sooner than the provider's `Retry-After` (up to a day: a
    longer one is taken as a day, and a row stays schedulable whatever a reply says)."""
    delay = backoff_delay(attempt, base=base, cap=cap, jitter=jitter, random=random)
    if retry_after is None:
        return delay
    return max(delay, min(retry_after, RETRY_AFTER_MAX))


_T, _P, _S = ErrorKind.TRANSIENT, ErrorKind.PERMANENT, ErrorKind.SENDER
_R, _PAIR = ErrorKind.THROTTLED, ErrorKind.PAIR_THROTTLED

# WhatsApp Business Cloud API error codes (../shared/whatsapp-cloud-api.md §4).
CLOUD_ERROR_KINDS: Final[Mapping[int, ErrorKind]] = MappingProxyType(
    {
        # Throttles: rate limits (no attempt spent; the sender's rate adapts).
        130429: _R,  # throughput rate limit per phone number
        80007: _R,  # WABA rate limit
        4: _R,  # too many API calls (app)
        131056: _PAIR,  # pair rate limit (same business/recipient pair)
        # Transient: "try again" codes.
        131000: _T,  # something went wrong
        131016: _T,  # service unavailable
        1: _T,  # API unknown
        2: _T,  # API service: downtime or overload
        133004: _T,  # server temporarily unavailable
        131057: _T,  # account in maintenance mode (throughput upgrade)
        2494100: _T,  # account in maintenance mode
        # Permanent: this message can never be delivered as it is.
        131026: _P,  # message undeliverable (not on WhatsApp, old client)
        131047: _P,  # re-engagement: outside the 24 h window, send a template
        131050: _P,  # user stopped marketing messages ("do not retry")
        131021: _P,  # recipient cannot be sender
        131051: _P,  # unsupported message type
        131052: _P,  # media download error
        131053: _P,  # media upload error (bad media, URL 404)
        131008: _P,  # required parameter missing
        131009: _P,  # parameter value not valid
        100: _P,  # invalid parameter
        132000: _P,  # template parameter count mismatch
        132001: _P,  # template does not exist / not approved
        132005: _P,  # template hydrated text too long
        132007: _P,  # template format character policy violated
        132012: _P,  # template parameter format mismatch
        132015: _P,  # template paused
        132016: _P,  # template disabled
        130472: _P,  # user's number is part of an experiment
        130497: _P,  # account restricted from messaging this country
        # Meta asks to wait at least 24 h before resending; our retries end
        # within 4 attempts and a 600 s cap, so retrying would only waste them.
        131049: _P,  # per-user marketing limit ("healthy ecosystem")
        # Sender-level: the account cannot send at all; operator action needed.
        190: _S,  # access token expired
        368: _S,  # temporarily blocked for policy violations
        131031: _S,  # business account locked
        131042: _S,  # eligibility payment issue
        133010: _S,  # business phone number not registered
        131048: _S,  # spam rate limit: retrying would worsen the quality rating
        0: _S,  # auth exception
        3: _S,  # API method capability
        10: _S,  # permission denied
        **dict.fromkeys(range(200, 300), _S),  # API permission errors
    }
)

# What a self-hosted gateway may answer in `error` / `error.code` (see the docstring).
SESSION_NOT_READY: Final = "session_not_ready"


def classify(http_status: int | None, provider_code: int | None) -> ErrorKind:
    """The class of a failed call: the provider's code first, else the HTTP status.

    `http_status` is None when there was no response (connection error, timeout).
    """
    if provider_code is not None:
        kind = CLOUD_ERROR_KINDS.get(provider_code)
        if kind is not None:
            return kind
    if http_status == 429:
        return ErrorKind.THROTTLED
    if http_status is None or http_status == 408 or http_status >= 500:
        return ErrorKind.TRANSIENT
    return ErrorKind.PERMANENT


def classify_gateway(http_status: int | None, error: int | str | None) -> ErrorKind:
    """`classify` for the generic http provider, whose error may be a word or a code."""
    if error == SESSION_NOT_READY:
        return ErrorKind.TRANSIENT
    return classify(http_status, error if isinstance(error, int) else None)


class Backoff:
    """Doubling waits between tries of a step that needs the database or a connection
    (a reconnect, a write retried): `first`, then twice as long each time up to `cap`,
    back to `first` after a success. No jitter: each process has one such loop per role,
    not a crowd of clients retrying in step."""

    __slots__ = ("_cap", "_first", "_next")

    def __init__(self, first: float, cap: float) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def next_delay(self) -> float:
        """The wait before the next try; the one after it doubles."""
        delay = self._next
        self._next = min(delay * 2, self._cap)
        return delay

    def reset(self) -> None:
        self._next = self._first
