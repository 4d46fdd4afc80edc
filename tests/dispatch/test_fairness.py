"""Priority and fairness with real `outbox dispatch` processes and the scripted provider,
on a stored sender limited to 100 messages a second: another user's message goes while
most of one user's 3,000-message backlog waits (round-robin between users); a `high`
message goes while most of 2,000 earlier `low` ones wait (strict priority); and
OUTBOX_USER_MAX_IN_FLIGHT caps each user's calls at once while another user's flow. The
figures each test measured are printed (`-s`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.dispatch.conftest import DispatcherProcess, Reply, statuses
from tests.dispatch.test_order import (
    Message,
    TimedProvider,
    accept,
    accept_one,
    row,
    start_together,
)
from tests.dispatch.test_sender_limits import KEY, figure, store_sender
from tests.support import ServerThread, wait_for

Provider = tuple[TimedProvider, str]
Start = Callable[..., DispatcherProcess]

RATE = 100  # the limited sender's messages per second


@pytest.fixture
def provider() -> Iterator[Provider]:
    """The scripted provider with each call's end (the dispatchers' fixtures take it by
    this name)."""
    timed = TimedProvider()
    with ServerThread(timed.app) as server:
        yield timed, f"{server.url}/send"


@pytest.fixture
def limited(sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start) -> str:
    """A sender limited to RATE a second, and two dispatchers that can decrypt it."""
    store_sender(sql_conn, provider, "lim", RATE)
    start_together(start_dispatcher, 2, secret_key=KEY, provider_timeout="8s")
    return "lim"


def counts(conn: psycopg.Connection, **where: object) -> dict[str, int]:
    """Messages by status among those whose columns have these values."""
    condition = " AND ".join(f"{column} = %s" for column in where) or "true"
    found = conn.execute(
        f"SELECT status, count(*) FROM outbox.messages WHERE {condition} GROUP BY 1",
        list(where.values()),
    ).fetchall()
    return {status: count for status, count in found}


def recipients(count: int, prefix: str) -> list[str]:
    """`count` recipients of their own: no conversation orders the messages."""
    return [f"5511{prefix}{n:05d}" for n in range(count)]


def test_one_users_backlog_holds_back_another_users_message_by_about_one_claim(
    sql_conn: psycopg.Connection, limited: str
) -> None:
    backlog = [Message(to=to, user_id="user-a", sender=limited) for to in recipients(3000, "9100")]
    accept(sql_conn, backlog)
    wait_for(
        lambda: counts(sql_conn, user_id="user-a").get("sent", 0) >= 50,
        timeout=20,
        what=f"user-a's first messages sent ({counts(sql_conn)})",
    )
    accepted = time.monotonic()
    other = accept_one(sql_conn, user_id="user-b", sender=limited, to="5511920000001")
    wait_for(lambda: row(sql_conn, other)[0] == "sent", timeout=20, what="user-b's message sent")
    took = time.monotonic() - accepted
    pending = counts(sql_conn, user_id="user-a").get("pending", 0)
    figure("user-b behind 3,000 of user-a", took_s=round(took, 3), a_pending=pending)
    # Without round-robin it would wait for all 3,000 (30 s at 100/s).
    assert pending > 1500  # most of the 3,000 (loose: a loaded VM starts dispatchers slowly)


def test_a_high_message_goes_before_most_of_an_earlier_low_backlog(
    sql_conn: psycopg.Connection, limited: str
) -> None:
    campaign = [Message(to=to, sender=limited, priority=2) for to in recipients(2000, "9200")]
    accept(sql_conn, campaign)
    wait_for(
        lambda: counts(sql_conn, priority=2).get("sent", 0) >= 50,
        timeout=20,
        what=f"the campaign's first messages sent ({counts(sql_conn)})",
    )
    accepted = time.monotonic()
    otp = accept_one(sql_conn, sender=limited, priority=0, to="5511920000002")
    wait_for(lambda: row(sql_conn, otp)[0] == "sent", timeout=20, what="the high message sent")
    took = time.monotonic() - accepted
    pending = counts(sql_conn, priority=2).get("pending", 0)
    figure("high behind 2,000 low", took_s=round(took, 3), low_pending=pending)
    assert pending > 1000  # most of them; without priority it would wait for them all (20 s)


def max_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most of these (start, end) intervals open at one time."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = open_now = 0
    for _, step in events:  # an end before a start at the same instant
        open_now += step
        most = max(most, open_now)
    return most


def test_user_max_in_flight_caps_each_users_calls_while_another_users_flow(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(body={"id": f"prov-{call.task_id}"}, delay=0.25)
    start_dispatcher(user_max_in_flight="2")
    by_user = {
        user: accept(sql_conn, [Message(to=to, user_id=user) for to in recipients(12, prefix)])
        for user, prefix in (("user-a", "9300"), ("user-b", "9400"))
    }
    wait_for(lambda: statuses(sql_conn) == {"sent": 24}, what=f"24 sent (now {statuses(sql_conn)})")

    calls = {
        user: [(start, end) for task_id in ids for start, end, _ in scripted.intervals(task_id)]
        for user, ids in by_user.items()
    }
    at_once = {user: max_at_once(intervals) for user, intervals in calls.items()}
    both = max_at_once(calls["user-a"] + calls["user-b"])
    figure("user max in flight 2", **at_once, both=both)
    assert all(len(intervals) == 12 for intervals in calls.values())
    assert max(at_once.values()) <= 2
    # user-b's calls went beside user-a's, not after them.
    assert both >= 3
    assert min(start for start, _ in calls["user-b"]) < max(end for _, end in calls["user-a"])
