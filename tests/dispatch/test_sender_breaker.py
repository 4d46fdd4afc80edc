"""The breaker of each sender, as real `outbox dispatch` processes share it through
PostgreSQL: a sender-level error (Cloud code 190: the access token expired) pauses that
sender only, its messages pending and unattempted, with a `sender_paused` event on the
feed; past each pause period exactly one message goes as the probe, its failure pausing
the sender again for twice as long (up to OUTBOX_SENDER_PAUSE_MAX), its success resuming
it (`sender_resumed`) and sending the rest, a probe answered 503 or timed out waiting the
same period again. A pause by hand is never probed; the sender `default` has the same
breaker; a gateway's `session_not_ready` stays a retry of one message."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from cryptography.fernet import Fernet
from websockets.sync.client import ClientConnection

from tests.dispatch.conftest import (
    Call,
    DispatcherProcess,
    Reply,
    ScriptedProvider,
    insert_messages,
)
from tests.gateway.conftest import Serve, feed_of, next_event, open_feed, serve  # noqa: F401
from tests.support import ServerThread, wait_for

Provider = tuple[ScriptedProvider, str]
Start = Callable[..., DispatcherProcess]
Token = Callable[..., str]

SENDERS = "/api/v1/whatsapp/senders"
KEY = Fernet.generate_key().decode()
EXPIRED = Reply(
    status=401,
    body={"error": {"code": 190, "message": "Error validating access token: session expired"}},
)
PAUSE = 0.5  # OUTBOX_SENDER_PAUSE: the breaker's first period, doubled by each failed probe
PAUSE_MAX = 2.0  # OUTBOX_SENDER_PAUSE_MAX
# The breaker's settings, given to every dispatcher of these tests.
BREAKER = {"secret_key": KEY, "sender_pause": f"{PAUSE}s", "sender_pause_max": f"{PAUSE_MAX}s"}
# How late a probe may start after its pause period ends: the claims wake for it then
# (their next_due_at); measured 5-40 ms, up to 0.25 s when the dispatcher that takes it
# builds that sender's HTTP client first. Loose, for a busy machine.
PROBE_LATE = 1.0


@pytest.fixture
def server(serve: Serve) -> ServerThread:  # noqa: F811
    """A real API server (the admin routes, the feed) with the credentials' key."""
    return serve(secret_key=KEY)


@pytest.fixture
def admin(server: ServerThread, token: Token) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {token('root', admin=True)}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        yield http


def put_senders(admin: httpx.Client, provider: Provider, *sender_ids: str) -> None:
    """`http` senders, each at its own path of the scripted provider (`/a` for `a`)."""
    base = provider[1].rsplit("/", 1)[0]
    for sender_id in sender_ids:
        body = {
            "provider": "http",
            "settings": {"url": f"{base}/{sender_id}", "secret": f"secret-of-{sender_id}-5d2b"},
            "users": ["*"],
        }
        answer = admin.put(f"{SENDERS}/{sender_id}", json=body)
        assert answer.status_code in (200, 201), answer.text


class Failing:
    """The scripted provider's answers: 190 at the paths in `broken`, sent elsewhere."""

    def __init__(self, *broken: str) -> None:
        self.broken = set(broken)
        self._lock = threading.Lock()

    def heal(self, path: str) -> float:
        """Answer `path` with success from now on; returns when (time.time())."""
        with self._lock:
            self.broken.discard(path)
            return time.time()

    def __call__(self, call: Call, n: int) -> Reply:
        with self._lock:
            if call.path in self.broken:
                return EXPIRED
        return Reply(body={"id": f"prov-{call.task_id}"})


def calls_at(scripted: ScriptedProvider, path: str) -> list[Call]:
    with scripted._lock:
        return [call for call in scripted.calls if call.path == path]


def counts(conn: psycopg.Connection, sender: str) -> dict[tuple[str, int], int]:
    """(status, attempts) → how many of the sender's messages."""
    rows = conn.execute(
        "SELECT status, attempts, count(*) FROM outbox.messages WHERE sender = %s GROUP BY 1, 2",
        [sender],
    ).fetchall()
    return {(status, attempts): n for status, attempts, n in rows}


def sender_events(conn: psycopg.Connection, sender: str) -> list[dict[str, Any]]:
    """The sender's own events (`sender_paused`, `sender_resumed`) in order: kind, data
    (with its event_id, as the feed has it) and when written (time.time())."""
    rows = conn.execute(
        """SELECT event, data || jsonb_build_object('event_id', id),
                  extract(epoch FROM created_at)::float8
           FROM outbox.events
           WHERE sender = %s AND event IN ('sender_paused', 'sender_resumed') ORDER BY id""",
        [sender],
    ).fetchall()
    return [{"event": event, "data": data, "at": at} for event, data, at in rows]


def state_of(conn: psycopg.Connection, sender: str) -> dict[str, Any]:
    row = conn.execute(
        "SELECT paused, pause_seconds, probe_id FROM outbox.sender_state WHERE id = %s", [sender]
    ).fetchone()
    assert row is not None, f"no state row for {sender}"
    return {"paused": row[0], "pause_seconds": row[1], "probe_id": row[2]}


def epoch(wire: str) -> float:
    return datetime.fromisoformat(wire.replace("Z", "+00:00")).timestamp()


def next_sender_event(feed: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    """The feed's next sender event (an admin hears every message's events too)."""
    deadline = time.monotonic() + timeout
    while True:
        event = next_event(feed, max(0.01, deadline - time.monotonic()))
        if event["event"].startswith("sender_"):
            return event


def log_lines(process: DispatcherProcess, event: str) -> list[dict[str, Any]]:
    lines = [line for line in process.log().splitlines() if line.startswith("{")]
    return [entry for line in lines if (entry := orjson.loads(line))["event"] == event]


def pauses_and_resume(
    conn: psycopg.Connection, sender: str
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The sender's `sender_paused` events in order, and its `sender_resumed` after them
    (or None)."""
    events = sender_events(conn, sender)
    kinds = [event["event"] for event in events]
    if "sender_resumed" not in kinds:
        return events, None
    assert kinds.index("sender_resumed") == len(kinds) - 1, kinds  # once, last
    return events[:-1], events[-1]


def check_probes(
    calls: list[Call], pauses: list[dict[str, Any]], resumed: dict[str, Any]
) -> list[float]:
    """Exactly one call per pause period, none before its end: returns how late each
    probe started after its period ended (seconds)."""
    lates: list[float] = []
    for k, pause in enumerate(pauses):
        until = epoch(pause["data"]["until"])
        ends = pauses[k + 1]["at"] if k + 1 < len(pauses) else resumed["at"]
        # The first pause: the calls already out when it was written still end meanwhile.
        begins = pause["at"] + (0.2 if k == 0 else 0.0)
        early = [c.at - until for c in calls if begins < c.at < until - 0.01]
        assert early == [], f"period {k}: calls before its end, by {early}"
        probes = [c for c in calls if until - 0.01 <= c.at <= ends]
        assert len(probes) == 1, f"period {k}: {len(probes)} probes (one expected)"
        lates.append(probes[0].at - until)
    assert all(late < PROBE_LATE for late in lates), lates
    return lates


def test_a_sender_level_error_pauses_that_sender_for_the_cluster_probed_once_per_period(
    sql_conn: psycopg.Connection,
    provider: Provider,
    start_dispatcher: Start,
    server: ServerThread,
    admin: httpx.Client,
    token: Token,
) -> None:
    scripted, _ = provider
    failing = Failing("/a")
    scripted.script = failing
    put_senders(admin, provider, "a", "b")
    dispatchers = [start_dispatcher(**BREAKER) for _ in range(3)]

    with open_feed(server, token("root", admin=True)) as feed:
        subscribers = feed_of(server).subscribers
        wait_for(lambda: subscribers.count == 1, what="the feed registered")
        a_ids = insert_messages(sql_conn, 50, sender="a")
        insert_messages(sql_conn, 50, sender="b")
        sql_conn.execute("NOTIFY outbox_new")

        # B goes on; A's messages wait, pending, no attempt spent; its pause on the feed.
        wait_for(
            lambda: counts(sql_conn, "b") == {("sent", 1): 50},
            what=f"B's 50 sent (now {counts(sql_conn, 'b')})",
        )
        wait_for(
            lambda: counts(sql_conn, "a") == {("pending", 0): 50},
            what=f"A's 50 pending, unattempted (now {counts(sql_conn, 'a')})",
        )
        first = next_sender_event(feed)
        assert first["event"] == "sender_paused", first
        data = first["data"]
        assert data["sender"] == "a" and data["code"] == "190" and data["manual"] is False
        assert data["reason"] == "http 401: 190: Error validating access token: session expired"
        assert epoch(data["until"]) - epoch(data["since"]) == pytest.approx(PAUSE, abs=0.01)

        # While the provider keeps failing, a probe per period, each failure pausing A
        # again for twice as long, up to the max: 0.5 s, 1 s, 2 s, 2 s.
        wait_for(
            lambda: len(pauses_and_resume(sql_conn, "a")[0]) == 5,
            timeout=PAUSE + 2 * PAUSE + 2 * PAUSE_MAX + 10,
            what="four failed probes",
        )
        healed_at = failing.heal("/a")
        wait_for(
            lambda: counts(sql_conn, "a") == {("sent", 1): 50},
            timeout=PAUSE_MAX + 15,
            what=f"A's 50 sent once healed (now {counts(sql_conn, 'a')})",
        )
        pauses, resumed = pauses_and_resume(sql_conn, "a")
        assert resumed is not None
        # The feed told the same story: the pauses then the resume, in order.
        heard = [first] + [next_sender_event(feed) for _ in range(len(pauses))]
    assert [(e["event"], e["data"]["event_id"]) for e in heard] == [
        (e["event"], e["data"]["event_id"]) for e in [*pauses, resumed]
    ]
    assert resumed["data"]["paused_since"] == data["since"]

    periods = [epoch(p["data"]["until"]) - epoch(p["data"]["timestamp"]) for p in pauses]
    expected = [min(PAUSE * 2**k, PAUSE_MAX) for k in range(len(pauses))]
    assert periods == pytest.approx(expected, abs=0.01)
    assert all(p["data"]["since"] == data["since"] for p in pauses)  # one pause throughout
    assert len(pauses) == 5  # no pause after the heal

    calls = calls_at(scripted, "/a")
    lates = check_probes(calls, pauses, resumed)
    print(f"\nprobes started after each period's end (s): {[round(x, 3) for x in lates]}")
    # The failed probes before the heal, the one that succeeded after it; then every
    # other message of A, each called once.
    probe_times = sorted(c.at for c in calls if c.at >= epoch(pauses[0]["data"]["until"]) - 0.01)
    assert all(at < healed_at for at in probe_times[:4]) and probe_times[4] > healed_at
    [healed_probe] = [c for c in calls if healed_at < c.at <= resumed["at"]]
    after = sorted(c.task_id for c in calls if c.at > resumed["at"])
    assert after == sorted(set(a_ids) - {healed_probe.task_id})
    # Every call of A was its message's attempt 1: a sender-level failure spends none.
    assert {c.attempt for c in calls} == {1}
    state = state_of(sql_conn, "a")
    assert state == {"paused": None, "pause_seconds": None, "probe_id": None}

    # One error line per pause and process: the first in each dispatcher that called A
    # before the pause (the calls that were out with it say it at info), and each failed
    # probe's.
    first_callers = sql_conn.execute(
        """SELECT count(DISTINCT a.dispatcher) FROM outbox.attempts a
           JOIN outbox.messages m ON m.id = a.message_id
           WHERE m.sender = 'a' AND a.outcome = 'sender' AND a.started_at < %s::timestamptz""",
        [pauses[0]["data"]["until"]],
    ).fetchone()
    assert first_callers is not None and first_callers[0] >= 1
    pausing = [line for d in dispatchers for line in log_lines(d, "sender cannot send: pausing it")]
    errors = [line for line in pausing if line["level"] == "error"]
    assert len(errors) == first_callers[0] + len(pauses) - 1, [
        (e["timestamp"], e["message_id"]) for e in errors
    ]
    assert len(pausing) == len(calls) - 50  # every failed call logged once


def attempts_of(conn: psycopg.Connection, sender: str) -> dict[str, int]:
    """outcome → how many attempts of the sender's messages were recorded so."""
    rows = conn.execute(
        """SELECT a.outcome, count(*) FROM outbox.attempts a
           JOIN outbox.messages m ON m.id = a.message_id WHERE m.sender = %s GROUP BY 1""",
        [sender],
    ).fetchall()
    return {outcome: n for outcome, n in rows}


def pause_by_hand(admin: httpx.Client, sender_id: str) -> None:
    answer = admin.post(f"{SENDERS}/{sender_id}/pause", json={"reason": "by hand"})
    assert answer.status_code == 200, answer.text


def test_a_pause_by_hand_is_never_probed(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start, admin: httpx.Client
) -> None:
    """A sender paused by hand waits for its resume, while one paused by its breaker is
    probed in the same time; a pause by hand replaces the breaker's, probes and all."""
    scripted, _ = provider
    scripted.script = Failing("/c")
    put_senders(admin, provider, "a", "c")
    pause_by_hand(admin, "a")
    for _ in range(2):
        start_dispatcher(**BREAKER)
    a_ids = insert_messages(sql_conn, 20, sender="a")
    insert_messages(sql_conn, 20, sender="c")
    sql_conn.execute("NOTIFY outbox_new")

    # C: paused by its breaker, probed twice (0.5 s, then 1 s later) and paused for 2 s.
    wait_for(
        lambda: len(pauses_and_resume(sql_conn, "c")[0]) == 3,
        timeout=PAUSE + 2 * PAUSE + 10,
        what="C's breaker paused it, then two failed probes",
    )
    # Meanwhile A, paused by hand from the start: never called, never even claimed (a
    # claim would have recorded its hand-back), no probe planned.
    assert calls_at(scripted, "/a") == []
    assert counts(sql_conn, "a") == {("pending", 0): 20}
    assert attempts_of(sql_conn, "a") == {}
    assert sql_conn.execute(
        "SELECT paused ->> 'manual', probe_at, probe_id FROM outbox.sender_state WHERE id = 'a'"
    ).fetchone() == ("true", None, None)

    # C paused by hand now: its breaker's next probe never goes.
    pauses, _ = pauses_and_resume(sql_conn, "c")
    next_probe = epoch(pauses[-1]["data"]["until"])
    pause_by_hand(admin, "c")
    by_hand = pauses_and_resume(sql_conn, "c")[0][-1]
    assert by_hand["data"]["manual"] is True and by_hand["data"]["until"] is None
    assert by_hand["data"]["since"] == pauses[0]["data"]["since"]  # the same pause
    called_c = len(calls_at(scripted, "/c"))

    answer = admin.post(f"{SENDERS}/a/resume")
    assert answer.status_code == 200, answer.text
    wait_for(
        lambda: counts(sql_conn, "a") == {("sent", 1): 20},
        what=f"A's 20 sent once resumed (now {counts(sql_conn, 'a')})",
    )
    assert sorted(c.task_id for c in calls_at(scripted, "/a")) == sorted(a_ids)
    assert [e["event"] for e in sender_events(sql_conn, "a")] == [
        "sender_paused",
        "sender_resumed",
    ]
    # Past the time C's probe would have gone: none did.
    wait_for(lambda: time.time() > next_probe + PROBE_LATE, timeout=PAUSE_MAX + 5)
    assert len(calls_at(scripted, "/c")) == called_c
    assert counts(sql_conn, "c") == {("pending", 0): 20}
    assert len(pauses_and_resume(sql_conn, "c")[0]) == 4  # its breaker's three, by hand


def test_the_environments_sender_default_has_the_same_breaker(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    """`default` (OUTBOX_PROVIDER's) hitting 190: paused in its state row, probed once per
    period, resumed by the probe that succeeds; one error line per pause in its log."""
    scripted, _ = provider
    failing = Failing("/send")
    scripted.script = failing
    dispatcher = start_dispatcher(**BREAKER)
    ids = insert_messages(sql_conn, 30)
    sql_conn.execute("NOTIFY outbox_new")

    wait_for(
        lambda: (state_of(sql_conn, "default")["paused"] or {}).get("code") == "190",
        what="default paused by its breaker",
    )
    wait_for(
        lambda: counts(sql_conn, "default") == {("pending", 0): 30},
        what=f"the 30 pending, unattempted (now {counts(sql_conn, 'default')})",
    )
    wait_for(
        lambda: len(pauses_and_resume(sql_conn, "default")[0]) == 2,
        timeout=PAUSE + 10,
        what="one failed probe",
    )
    healed_at = failing.heal("/send")
    wait_for(
        lambda: counts(sql_conn, "default") == {("sent", 1): 30},
        timeout=2 * PAUSE + 10,
        what=f"the 30 sent once healed (now {counts(sql_conn, 'default')})",
    )
    pauses, resumed = pauses_and_resume(sql_conn, "default")
    assert resumed is not None and len(pauses) == 2
    assert [p["data"]["code"] for p in pauses] == ["190", "190"]
    calls = calls_at(scripted, "/send")
    lates = check_probes(calls, pauses, resumed)
    print(f"\ndefault's probes started after each period's end (s): {[round(x, 3) for x in lates]}")
    assert max(c.at for c in calls if c.at < resumed["at"]) > healed_at  # the healed probe
    assert {c.task_id for c in calls} == set(ids) and {c.attempt for c in calls} == {1}
    assert state_of(sql_conn, "default") == {
        "paused": None,
        "pause_seconds": None,
        "probe_id": None,
    }

    # One error line per pause (the first, and the failed probe), not one per message:
    # the other calls that failed with the first say it at info.
    pausing = log_lines(dispatcher, "sender cannot send: pausing it")
    failed = len(calls) - 30
    assert len(pausing) == failed
    assert sum(line["level"] == "error" for line in pausing) == 2
    assert {(line["sender"], line["code"]) for line in pausing} == {("default", 190)}


def test_a_gateways_session_not_ready_stays_a_retry_of_the_message(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    """{"error": "session_not_ready"} is transient per message: retried after the backoff,
    its attempt spent, the sender never paused."""
    scripted, _ = provider
    not_ready = Reply(status=503, body={"error": "session_not_ready"})
    scripted.script = lambda call, n: not_ready if n == 0 else Reply(body={"id": "prov"})
    start_dispatcher(**BREAKER)
    insert_messages(sql_conn, 10)
    sql_conn.execute("NOTIFY outbox_new")
    wait_for(
        lambda: counts(sql_conn, "default") == {("sent", 2): 10},
        what=f"the 10 sent at their second attempt (now {counts(sql_conn, 'default')})",
    )
    assert attempts_of(sql_conn, "default") == {"transient": 10, "sent": 10}
    assert state_of(sql_conn, "default")["paused"] is None
    assert sender_events(sql_conn, "default") == []


def test_a_probe_answered_503_or_timing_out_waits_the_same_period_for_the_next(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start, admin: httpx.Client
) -> None:
    """After 190, the provider answers A's probes with a 503 or not at all (timed out): a
    probe called that tells nothing of the account waits the same period again, neither
    doubled nor cut short by another message probing at once. Two dispatchers, 3 s: one
    call per period reaches A, each a message's first attempt."""
    scripted, _ = provider
    first: list[float] = []
    probes: list[Call] = []

    def script(call: Call, n: int) -> Reply:
        if not first:
            first.append(call.at)
        # The first calls, out together, and any straggler before the first probe may go
        # (the pause ends PAUSE after the first 190's outcome at the earliest): 190.
        if call.at - first[0] < PAUSE:
            return EXPIRED
        probes.append(call)
        if len(probes) % 2:
            return Reply(status=503, body={"error": "upstream unavailable"})
        return Reply(delay=1.0)  # past OUTBOX_PROVIDER_TIMEOUT: timed out

    scripted.script = script
    put_senders(admin, provider, "a")
    dispatchers = [start_dispatcher(False, **BREAKER, provider_timeout="300ms") for _ in range(2)]
    for dispatcher in dispatchers:
        dispatcher.wait_ready()
    insert_messages(sql_conn, 20, sender="a")
    sql_conn.execute("NOTIFY outbox_new")
    wait_for(lambda: first, what="A's first call")
    wait_for(lambda: time.time() > first[0] + 3.5, timeout=10, what="3.5 s of A's breaker")

    pauses, resumed = pauses_and_resume(sql_conn, "a")
    assert resumed is None
    starts = [call.at for call in probes]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    print(f"\n503/timeout probes: {len(probes)}, gaps (s): {[round(g, 3) for g in gaps]}")
    # The first pause, then a probe each period (the timed-out ones 0.3 s longer).
    assert 2 <= len(probes) <= 6, starts
    assert all(gap >= PAUSE - 0.05 for gap in gaps), gaps
    assert len(pauses) >= len(probes)  # each probe's end paused A again (the last may not yet)
    periods = [epoch(p["data"]["until"]) - epoch(p["data"]["timestamp"]) for p in pauses]
    assert periods == pytest.approx([PAUSE] * len(pauses), abs=0.01)  # never doubled
    assert state_of(sql_conn, "a")["pause_seconds"] == PAUSE
    # One attempt per period: each probe another message's first.
    assert {call.attempt for call in probes} == {1}
    assert len({call.task_id for call in probes}) == len(probes)
    spent = sql_conn.execute(
        "SELECT sum(attempts) FROM outbox.messages WHERE sender = 'a'"
    ).fetchone()
    assert spent is not None and spent[0] <= len(probes)
