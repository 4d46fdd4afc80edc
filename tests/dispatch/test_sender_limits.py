"""Senders' limits with real `outbox dispatch` processes and the scripted provider: a
sender's rate holds across dispatchers (no one-second window of provider arrivals above
rate × (1 + burst) + 1) while an unlimited sender beside it goes at once; throttles
(130429, HTTP 429) spend no attempt, halve the sender's effective rate, which grows back
to the limit, and end a message `error` "throttled" past OUTBOX_MAX_THROTTLES; a pair
throttle (131056) holds one recipient's messages only; a limited sender with a backlog
does not make its dispatcher spin. The figures each test measured are printed (`-s`)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import orjson
import psutil
import psycopg
import pytest
from cryptography.fernet import Fernet

from outbox.senders import Keyring
from outbox.store import QUERIES
from tests.dispatch.conftest import (
    Call,
    DispatcherProcess,
    Reply,
    ScriptedProvider,
    insert_messages,
    statuses,
)
from tests.e2e.conftest import free_port
from tests.scrape import scrape, value
from tests.support import wait_for

Provider = tuple[ScriptedProvider, str]
Start = Callable[..., DispatcherProcess]

KEY = Fernet.generate_key().decode()
GATEWAY_SECRET = "secret-of-the-limited-gateway-5d2a"
BURST = 0.2  # OUTBOX_SENDER_BURST's default
THROUGHPUT = {"error": {"code": 130429, "message": "(#130429) Rate limit hit"}}
PAIR = {"error": {"code": 131056, "message": "(#131056) Pair rate limit hit"}}
RATE = """SELECT extract(epoch FROM now())::float8,
                 outbox.sender_rate(rate_limit, learned_limit, decreased_rate, decreased_at,
                                    now()),
                 learned_limit
          FROM outbox.sender_state WHERE id = %s"""

# The test's own record of each claim: when (the claim's now(), which it writes in
# updated_at) a row went from pending to in_flight. In the test's database only.
LOG_CLAIMS = """
CREATE TABLE public.claims (sender text, at float8);
CREATE FUNCTION public.log_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.claims VALUES (NEW.sender, extract(epoch FROM NEW.updated_at));
    RETURN NULL;
END $$;
CREATE TRIGGER log_claim AFTER UPDATE ON outbox.messages FOR EACH ROW
    WHEN (OLD.status = 'pending' AND NEW.status = 'in_flight')
    EXECUTE FUNCTION public.log_claim();
"""


def figure(test: str, **figures: Any) -> None:
    """One line of what a test measured, for the bench notes (shown with -s)."""
    print(f"\nFIGURES {test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def base_of(provider: Provider) -> str:
    return provider[1].rsplit("/", 1)[0]


def store_sender(
    conn: psycopg.Connection, provider: Provider, sender_id: str, rate_limit: float | None
) -> None:
    """An `http` sender called at its own path of the scripted provider (`/<id>`)."""
    conn.execute(
        """INSERT INTO outbox.senders
               (id, provider, settings, secrets, secret_fields, rate_limit, users)
           VALUES (%s, 'http', %s, %s, '{secret}', %s, '{*}')""",
        [
            sender_id,
            orjson.dumps({"url": f"{base_of(provider)}/{sender_id}"}).decode(),
            Keyring(KEY).encrypt({"secret": GATEWAY_SECRET}),
            rate_limit,
        ],
    )


def insert_to(conn: psycopg.Connection, sender: str, recipients: list[str]) -> list[str]:
    """One text message to each recipient, in this order, all due now."""
    ids = [str(uuid.uuid4()) for _ in recipients]
    conn.execute(
        """INSERT INTO outbox.messages
               (id, user_id, "to", type, payload, request_hash, max_attempts,
                next_attempt_at, sender)
           SELECT id, 'user-1', recipient, 'text', '{"body": "hi", "preview_url": false}',
                  '\\x00', 4, now(), %s
           FROM unnest(%s::uuid[], %s::text[]) WITH ORDINALITY AS u(id, recipient, n)
           ORDER BY n""",
        [sender, ids, recipients],
    )
    return ids


def arrivals(scripted: ScriptedProvider, sender_id: str) -> list[float]:
    return sorted(call.at for call in list(scripted.calls) if call.path == f"/{sender_id}")


def max_window(times: list[float], width: float = 1.0, after: float | None = None) -> int:
    """The most of `times` (sorted) in any window [t, t + width) (a sliding window: each
    time starts one, which is where the most can be); only windows from `after` on."""
    most, end = 0, 0
    for start, at in enumerate(times):
        while end < len(times) and times[end] < at + width:
            end += 1
        if after is None or at >= after:
            most = max(most, end - start)
    return most


def per_second(times: list[float], origin: float) -> list[int]:
    """Arrivals in each whole second after `origin`."""
    counts: list[int] = []
    for at in times:
        second = int(at - origin)
        counts.extend([0] * (second + 1 - len(counts)))
        counts[second] += 1
    return counts


def claimed_at(conn: psycopg.Connection, sender: str) -> list[float]:
    """When each row of `sender` was claimed (the claim's clock), from LOG_CLAIMS."""
    return [
        row[0]
        for row in conn.execute(
            "SELECT at FROM public.claims WHERE sender = %s ORDER BY at", [sender]
        )
    ]


def call_starts(conn: psycopg.Connection, sender: str) -> list[float]:
    """When each attempt of `sender` started (the dispatcher's clock, before its call)."""
    return [
        row[0]
        for row in conn.execute(
            """SELECT extract(epoch FROM a.started_at)::float8 FROM outbox.attempts a
               JOIN outbox.messages m ON m.id = a.message_id
               WHERE m.sender = %s ORDER BY 1""",
            [sender],
        )
    ]


def recipient(call: Call) -> str:
    to: str = orjson.loads(call.body)["to"]
    return to


def message_rows(conn: psycopg.Connection, sender: str) -> list[tuple[str, str, int, int]]:
    """(id, status, attempts, throttles) of each message of `sender`."""
    return [
        (str(row[0]), row[1], row[2], row[3])
        for row in conn.execute(
            "SELECT id, status, attempts, throttles FROM outbox.messages WHERE sender = %s",
            [sender],
        )
    ]


class RateSampler:
    """A sender's effective rate read every 0.1 s on a connection of its own, as the claim
    computes it: (the database's now() as epoch seconds, rate, learned_limit)."""

    def __init__(self, database_url: str, sender_id: str) -> None:
        self.samples: list[tuple[float, float | None, float | None]] = []
        self._url = database_url
        self._sender = sender_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(RATE, [self._sender]).fetchone()
                if row is not None:
                    self.samples.append((row[0], row[1], row[2]))
                self._stop.wait(0.1)

    def __enter__(self) -> RateSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def latest(self) -> float | None:
        return self.samples[-1][1] if self.samples else None


@pytest.fixture
def dispatch(start_dispatcher: Start) -> Iterator[Callable[..., DispatcherProcess]]:
    """start_dispatcher with the key that decrypts the stored senders' credentials, and
    time for the scripted provider to answer a burst on a busy machine (a call timed out
    would spend an attempt: these tests count them)."""
    yield lambda **overrides: start_dispatcher(
        **{"secret_key": KEY, "provider_timeout": "8s", **overrides}
    )


def test_a_limited_sender_keeps_to_its_rate_across_two_dispatchers_and_holds_back_no_other(
    sql_conn: psycopg.Connection, provider: Provider, dispatch: Start
) -> None:
    scripted, _ = provider
    store_sender(sql_conn, provider, "lim", 20)
    store_sender(sql_conn, provider, "free", None)
    sql_conn.execute(LOG_CLAIMS)
    dispatch()
    dispatch()
    with sql_conn.transaction():  # due together
        insert_messages(sql_conn, 200, sender="lim")
        insert_messages(sql_conn, 200, sender="free")
    wait_for(
        lambda: statuses(sql_conn) == {"sent": 400},
        timeout=30,
        what=f"400 sent (now {statuses(sql_conn)})",
    )

    limited, free = arrivals(scripted, "lim"), arrivals(scripted, "free")
    assert len(limited) == 200 and len(free) == 200  # one call each: nothing throttled
    claims = claimed_at(sql_conn, "lim")
    started = call_starts(sql_conn, "lim")
    start = min(limited[0], free[0])
    # Once the unlimited sender's burst is served (its calls saturate both dispatchers
    # and the provider, which delays some calls claimed within the limit: they bunch).
    served = free[-1] + 0.5
    span = limited[-1] - limited[0]
    figure(
        "two dispatchers, 20/s",
        max_1s_claims=max_window(claims),
        max_1s_call_starts=max_window(started),
        max_1s_arrivals=max_window(limited),
        max_1s_arrivals_after_burst=max_window(limited, after=served),
        span_s=round(span, 3),
        achieved_rate=round((len(limited) - 1) / span, 2),
        free_done_after_s=round(free[-1] - start, 3),
        limited_done_after_s=round(limited[-1] - start, 3),
        arrivals_per_s=per_second(limited, limited[0]),
        starts_per_s=per_second(started, started[0]),
    )
    bound = 20 * (1 + BURST) + 1
    # The cluster's claims keep to the bucket: 4 at once, then 20/s.
    assert len(claims) == 200 and max_window(claims) <= bound, per_second(claims, claims[0])
    # The provider sees them a moment after their claim, a moment that varies on a busy
    # machine: a few more in a second at most.
    assert max_window(limited, after=served) <= bound + 5, per_second(limited, limited[0])
    # During the burst: late by well under a second, never a second's worth more.
    assert max_window(limited) <= bound + 20, per_second(limited, limited[0])
    assert span >= 8, span  # 200 at 20/s, a full bucket (4) first: 9.8 s
    # The unlimited sender went at once, long before the limited one was done.
    assert free[-1] - start < 3, free[-1] - start
    assert limited[-1] - free[-1] > 5
    # Both dispatchers sent the limited sender's messages: the limit is the cluster's.
    by: dict[str, int] = dict(
        sql_conn.execute(
            """SELECT a.dispatcher, count(*) FROM outbox.attempts a
               JOIN outbox.messages m ON m.id = a.message_id
               WHERE m.sender = 'lim' GROUP BY 1"""
        ).fetchall()
    )
    figure("two dispatchers, 20/s", attempts_by_dispatcher=by)
    assert sorted(by) == ["d1", "d2"], by


def test_a_throughput_throttle_spends_no_attempt_and_the_rate_drops_then_climbs_back(
    sql_conn: psycopg.Connection, provider: Provider, dispatch: Start, database_url: str
) -> None:
    scripted, _ = provider
    store_sender(sql_conn, provider, "thr", 20)
    first: list[float] = []

    def script(call: Call, n: int) -> Reply:
        if not first:
            first.append(call.at)  # the first call starts the 2 s of throttles
        if call.at - first[0] < 2:
            return Reply(status=400, body=THROUGHPUT)
        return Reply(body={"id": f"prov-{call.task_id}"})

    scripted.script = script
    dispatch()
    with RateSampler(database_url, "thr") as sampler:
        ids = insert_messages(sql_conn, 100, sender="thr")
        wait_for(
            lambda: statuses(sql_conn) == {"sent": 100},
            timeout=40,
            what=f"100 sent (now {statuses(sql_conn)})",
        )
        wait_for(lambda: sampler.latest() == 20, timeout=15, what="the rate back at 20/s")
    rows = message_rows(sql_conn, "thr")
    assert sorted(row[0] for row in rows) == sorted(ids)
    assert all(status == "sent" and attempts == 1 for _, status, attempts, _ in rows), rows
    throttled = [row for row in rows if row[3] > 0]
    assert throttled, "no message was throttled"
    calls = list(scripted.calls)
    assert len(calls) == 100 + sum(row[3] for row in rows)  # each throttle one more call
    assert all(call.attempt == 1 for call in calls)  # the attempt is never spent
    outcomes: dict[str, int] = dict(
        sql_conn.execute(
            """SELECT a.outcome, count(*) FROM outbox.attempts a
               JOIN outbox.messages m ON m.id = a.message_id WHERE m.sender = 'thr'
               GROUP BY 1"""
        ).fetchall()
    )
    assert outcomes == {"sent": 100, "throttled": sum(row[3] for row in rows)}, outcomes

    # The effective rate: 20, down below it once throttled, back up to 20 at +2/s.
    origin = calls[0].at
    samples = [(at - origin, rate) for at, rate, _ in sampler.samples]
    assert samples[0][1] == 20
    lowest_at, lowest = min(
        ((at, rate) for at, rate in samples if rate is not None), key=lambda s: s[1]
    )
    back_at = next(at for at, rate in samples if at > lowest_at and rate == 20)
    healed = origin + 2
    after = [at for at in arrivals(scripted, "thr") if at >= healed]
    figure(
        "130429 for 2 s at 20/s",
        throttles=sum(row[3] for row in rows),
        messages_throttled=len(throttled),
        lowest_rate=round(lowest, 3),
        lowest_at_s=round(lowest_at, 2),
        back_to_20_at_s=round(back_at, 2),
        trajectory=[(round(at, 1), round(rate or 0, 2)) for at, rate in samples[::5]],
        arrivals_per_s_after_heal=per_second(after, healed),
        max_1s_window=max_window(arrivals(scripted, "thr")),
    )
    assert lowest <= 10  # halved at least once
    # +10 % of the limit per second: from the lowest to the limit takes (20 - lowest) / 2 s.
    climb = (20 - lowest) / 2
    assert climb * 0.8 - 0.3 <= back_at - lowest_at <= climb + 2, (lowest, lowest_at, back_at)
    # The provider saw the drop: the second after the throttles ended is well below 20/s.
    assert per_second(after, healed)[0] < 12, per_second(after, healed)
    assert max_window(arrivals(scripted, "thr")) <= 20 * (1 + BURST) + 1


def test_an_unlimited_sender_throttled_gets_a_limit_at_its_measured_rate(
    sql_conn: psycopg.Connection, provider: Provider, dispatch: Start, database_url: str
) -> None:
    scripted, _ = provider
    store_sender(sql_conn, provider, "free", None)
    throttling: list[float] = []

    def script(call: Call, n: int) -> Reply:
        # 150 calls answered, then 130429 for half a second.
        if len(scripted.calls) > 150 and (not throttling or call.at - throttling[0] < 0.5):
            throttling.append(call.at)
            return Reply(status=400, body=THROUGHPUT)
        return Reply(body={"id": f"prov-{call.task_id}"})

    scripted.script = script
    dispatch()
    with RateSampler(database_url, "free") as sampler:
        insert_messages(sql_conn, 300, sender="free")
        wait_for(
            lambda: statuses(sql_conn) == {"sent": 300},
            timeout=40,
            what=f"300 sent (now {statuses(sql_conn)})",
        )
    rows = message_rows(sql_conn, "free")
    assert all(status == "sent" and attempts == 1 for _, status, attempts, _ in rows)
    assert any(row[3] > 0 for row in rows)
    learned = [(at, rate, limit) for at, rate, limit in sampler.samples if limit is not None]
    assert learned, "no learned limit"
    _, first_rate, limit = learned[0]
    assert first_rate is not None
    origin = throttling[0]
    after = [at for at in arrivals(scripted, "free") if at >= origin]
    figure(
        "unlimited sender throttled",
        learned_limit=limit,
        first_rate=round(first_rate, 2),
        lowest_rate=round(min(rate for _, rate, _ in learned if rate is not None), 2),
        throttled_calls=len(throttling),
        throttles=sum(row[3] for row in rows),
        trajectory=[(round(at - origin, 1), rate and round(rate, 2)) for at, rate, _ in learned],
        arrivals_per_s_from_throttle=per_second(after, origin),
    )
    # Its rate measured then (150 calls within the last 2 s: 75/s or so), and halved.
    assert limit >= 10, limit
    assert first_rate <= limit / 2 + 0.1 * limit, (first_rate, limit)
    state = sql_conn.execute(RATE, ["free"]).fetchone()
    assert state is not None and state[2] == limit  # kept (lifted only at 10 × it)


def test_a_provider_that_always_answers_429_ends_the_message_throttled_with_no_attempt_spent(
    sql_conn: psycopg.Connection, provider: Provider, dispatch: Start
) -> None:
    scripted, _ = provider
    store_sender(sql_conn, provider, "busy", 100)
    # Longer than the 1 s a throttle waits without Retry-After: honoured, it shows.
    scripted.script = lambda call, n: Reply(status=429, headers={"Retry-After": "1.5"})
    dispatcher = dispatch(max_throttles="3")
    [task_id] = insert_messages(sql_conn, 1, sender="busy")
    wait_for(
        lambda: statuses(sql_conn) == {"error": 1},
        timeout=20,
        what=f"the message ended (now {statuses(sql_conn)})",
    )
    row = sql_conn.execute(
        "SELECT status, attempts, throttles, last_error, history FROM outbox.message_view"
        " WHERE id = %s",
        [task_id],
    ).fetchone()
    assert row is not None
    status, attempts, throttles, last_error, history = row
    assert (status, attempts, last_error) == ("error", 0, "throttled")
    assert throttles == 4  # three throttles waited out, the fourth ends it
    assert [entry["outcome"] for entry in history] == ["throttled"] * 4
    assert [entry["attempt"] for entry in history] == [1] * 4
    assert [entry["error"] for entry in history] == ["http 429"] * 3 + ["throttled"]
    calls = scripted.calls_for(task_id)
    assert len(calls) == 4 and all(call.attempt == 1 for call in calls)

    # Each try came after the Retry-After (1.5 s), not the 1 s default.
    attempts_rows = sql_conn.execute(
        """SELECT extract(epoch FROM started_at)::float8, extract(epoch FROM finished_at)::float8
           FROM outbox.attempts WHERE message_id = %s ORDER BY id""",
        [task_id],
    ).fetchall()
    gaps = [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(attempts_rows)]
    figure("always 429, Retry-After 1.5", gaps_s=[round(gap, 3) for gap in gaps])
    assert all(1.45 <= gap < 3.5 for gap in gaps), gaps

    def events() -> list[dict[str, Any]]:
        log = dispatcher.log().splitlines()
        return [orjson.loads(line) for line in log if line.startswith("{")]

    # The log reaches its file a moment after the outcome reaches the database.
    wait_for(
        lambda: any(line["event"] == "throttled too often: not sent" for line in events()),
        what="the dispatcher's line for the message ended",
    )
    lines = events()
    waits = [line.get("retry_in") for line in lines if line["event"] == "throttled"]
    assert waits == [1.5, 1.5, 1.5], waits
    [ended] = [line for line in lines if line["event"] == "throttled too often: not sent"]
    assert ended["level"] == "error" and ended["throttles"] == 4


def test_a_pair_throttle_holds_only_that_recipients_messages(
    sql_conn: psycopg.Connection, provider: Provider, dispatch: Start
) -> None:
    scripted, _ = provider
    store_sender(sql_conn, provider, "pair", 10)  # 10/s: the messages go over 3 s
    held, others = "5511900000001", ("5511900000002", "5511900000003")
    throttled_from: list[float] = []

    def script(call: Call, n: int) -> Reply:
        # The held recipient's calls for half a second from its first are refused.
        if recipient(call) == held and (not throttled_from or call.at - throttled_from[0] < 0.5):
            throttled_from.append(call.at)
            return Reply(status=400, body=PAIR)
        return Reply(body={"id": f"prov-{call.task_id}"})

    scripted.script = script
    dispatch(pair_delay="2s")
    ids = insert_to(sql_conn, "pair", [held, *others] * 10)  # the held recipient's first
    wait_for(
        lambda: statuses(sql_conn) == {"sent": 30},
        timeout=30,
        what=f"30 sent (now {statuses(sql_conn)})",
    )
    rows = message_rows(sql_conn, "pair")
    assert sorted(row[0] for row in rows) == sorted(ids)
    assert all(attempts == 1 for _, _, attempts, _ in rows)  # no attempt spent
    calls = list(scripted.calls)
    throttled = [call for call in calls if call.at in throttled_from]
    last_throttle = max(call.at for call in throttled)
    sent_held = sorted(
        call.at for call in calls if recipient(call) == held and call not in throttled
    )
    sent_others = sorted(call.at for call in calls if recipient(call) != held)
    meanwhile = [at for at in sent_others if last_throttle < at < last_throttle + 2]
    figure(
        "131056, OUTBOX_PAIR_DELAY 2s",
        throttled_calls=len(throttled),
        held_first_sent_after_s=round(sent_held[0] - last_throttle, 3),
        others_sent_meanwhile=len(meanwhile),
        others_done_after_s=round(sent_others[-1] - throttled[0].at, 3),
    )
    # The held recipient's messages waited the pair delay; the others went meanwhile.
    assert sent_held[0] - last_throttle >= 1.9, sent_held[0] - last_throttle
    assert len(sent_held) == 10
    assert len(meanwhile) >= 10, meanwhile
    # No rate throttle: the sender's rate was never lowered.
    row = sql_conn.execute(RATE, ["pair"]).fetchone()
    assert row is not None and row[1] == 10
    assert sql_conn.execute(
        "SELECT decreased_at FROM outbox.sender_state WHERE id = 'pair'"
    ).fetchone() == (None,)


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """user + system CPU seconds of each process still there."""
    times: dict[int, float] = {}
    for pid in pids:
        try:
            cpu = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        times[pid] = cpu.user + cpu.system
    return times


def backends(conn: psycopg.Connection) -> list[int]:
    """The server processes of this database's other sessions (the dispatcher's)."""
    return [
        row[0]
        for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
    ]


def test_a_limited_sender_with_a_backlog_does_not_make_its_dispatcher_spin(
    sql_conn: psycopg.Connection, provider: Provider, dispatch: Start
) -> None:
    scripted, _ = provider
    store_sender(sql_conn, provider, "slow", 20)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    dispatcher = dispatch(metrics_port=str(port), poll_interval="1s")  # the default poll
    insert_messages(sql_conn, 2000, sender="slow")
    wait_for(lambda: len(scripted.calls) >= 20, what="calls at the sender's rate")

    def claims() -> float:
        return value(scrape(url), "outbox_claim_batch_messages_count")

    pids = backends(sql_conn)
    local_pg = bool(cpu_seconds(pids))  # the server's processes are on this host
    calls0, claims0, wall0 = len(scripted.calls), claims(), time.monotonic()
    cpu0 = cpu_seconds([dispatcher.proc.pid])[dispatcher.proc.pid]
    pg0 = cpu_seconds(pids)
    # A window of 100 calls: 5 s at 20/s.
    wait_for(lambda: len(scripted.calls) >= calls0 + 100, timeout=15, what="100 more calls")
    wall = time.monotonic() - wall0
    cpu = cpu_seconds([dispatcher.proc.pid])[dispatcher.proc.pid] - cpu0
    pg1 = cpu_seconds(backends(sql_conn))
    pg = sum(t - pg0.get(pid, 0.0) for pid, t in pg1.items())
    claimed = claims() - claims0
    calls = len(scripted.calls) - calls0
    figure(
        "20/s sender, 2,000 due, 1 dispatcher",
        window_s=round(wall, 3),
        calls_per_s=round(calls / wall, 2),
        claims_per_s=round(claimed / wall, 2),
        dispatcher_cpu_pct=round(100 * cpu / wall, 2),
        postgres_cpu_pct=round(100 * pg / wall, 2) if local_pg else "n/a",
    )
    assert calls / wall <= 20 * (1 + BURST) + 1
    assert claimed / wall < 60, claimed / wall
    assert cpu / wall < 0.3, cpu / wall
    if local_pg:
        assert pg / wall < 0.3, pg / wall


def test_a_claim_with_an_older_clock_takes_no_refill_twice(sql_conn: psycopg.Connection) -> None:
    """Two dispatchers' claims serialize on the sender's state in the order they reach its
    lock, not in the order of their clocks (each statement's now()): one that began first
    and locked second must not move the bucket's refill time back, which would hand the
    time between them out again."""
    sql_conn.execute(
        """INSERT INTO outbox.senders (id, provider, settings, users, rate_limit)
           VALUES ('lim', 'fake', '{}', '{*}', 20)"""
    )
    sql_conn.execute(
        """INSERT INTO outbox.messages
               (id, user_id, "to", type, payload, request_hash, max_attempts,
                next_attempt_at, sender)
           SELECT gen_random_uuid(), 'user-1', '5511999999999', 'text', '{"body": "hi"}',
                  '\\x00', 4, now() - interval '1 hour', 'lim'
           FROM generate_series(1, 50)"""
    )
    row = sql_conn.execute("SELECT now()").fetchone()
    assert row is not None
    start = row[0]

    def claim(after: float, limit: int = 50) -> int:
        params = {
            "dispatcher": "d-1",
            "limit": limit,
            "lease_seconds": 30,
            "now": start + timedelta(seconds=after),
            "burst": BURST,
            "paced": 1000,
            "cursors": "{}",
            "user_max": None,
        }
        rows = sql_conn.execute(QUERIES["claim_messages"], params).fetchall()
        return sum(1 for row in rows if row[0] is not None)

    assert claim(0) == 4  # a full bucket: 0.2 s of 20/s
    assert claim(1.0, limit=1) == 1  # full again; 3 left as of 1.0
    assert claim(0.7) == 3  # an older clock: what is left, no refill
    assert claim(1.0) == 0  # nothing more as of 1.0: the 3 were taken
    assert claim(1.1) == 2  # 0.1 s more: 2 tokens
