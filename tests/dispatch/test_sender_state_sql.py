"""The senders' state as the SQL keeps it, without dispatchers: the claim statement
(`claim_messages`) and `outbox.complete_attempts` run directly on the test's database, as
a dispatcher runs them, with the outcomes a dispatcher writes (`Completion`). The breaker's
probe: one that was called but tells nothing of the account (a 5xx, a timeout) waits the
same period again; one handed back uncalled, or whose lease ran out, lets another message
probe at once; a resume by hand starts the doubling again. Two batches that touch the same
senders in reverse order commit, never a deadlock. A limited sender's rows are claimed
only for the call slots free now (`paced`)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from psycopg.rows import dict_row

from outbox.states import AttemptOutcome, MessageStatus
from outbox.store import QUERIES
from outbox.store.queue import Completion

PAUSE = 0.5  # OUTBOX_SENDER_PAUSE: the breaker's first period
PAUSE_MAX = 2.0  # OUTBOX_SENDER_PAUSE_MAX
LEASE = 30.0  # OUTBOX_LEASE_SECONDS of the claims
BURST = 0.2  # OUTBOX_SENDER_BURST's default
EXPIRED_TOKEN = "http 401: 190: Error validating access token: session expired"


def add_sender(conn: psycopg.Connection, sender_id: str, rate_limit: float | None = None) -> None:
    conn.execute(
        """INSERT INTO outbox.senders (id, provider, settings, users, rate_limit)
           VALUES (%s, 'fake', '{}', '{*}', %s)""",
        [sender_id, rate_limit],
    )


def add_due(
    conn: psycopg.Connection, sender: str, count: int, to: str = "5511999999999"
) -> list[uuid.UUID]:
    """`count` pending messages of `sender` to `to`, due an hour ago (due for a claim as of
    any time the tests use), oldest first in this order."""
    ids = [uuid.uuid4() for _ in range(count)]
    conn.execute(
        """INSERT INTO outbox.messages
               (id, user_id, "to", type, payload, request_hash, max_attempts,
                next_attempt_at, sender)
           SELECT id, 'user-1', %s, 'text', '{"body": "hi"}', '\\x00', 4,
                  now() - interval '1 hour' + n * interval '1 millisecond', %s
           FROM unnest(%s::uuid[]) WITH ORDINALITY AS u(id, n)""",
        [to, sender, ids],
    )
    return ids


def db_now(conn: psycopg.Connection) -> datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    moment: datetime = row[0]
    return moment


@dataclass
class Claim:
    rows: list[dict[str, Any]]  # the claimed rows: the fields of Claimed
    next_due_at: datetime | None

    def of(self, sender: str) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["sender"] == sender]


def claim(
    conn: psycopg.Connection,
    at: datetime | None = None,
    *,
    dispatcher: str = "d1",
    limit: int = 10,
    paced: int | None = None,
) -> Claim:
    """One claim as the dispatcher runs it, as of `at` (the database's clock when None)."""
    params = {
        "dispatcher": dispatcher,
        "limit": limit,
        "lease_seconds": LEASE,
        "now": at,
        "burst": BURST,
        "paced": limit if paced is None else paced,
        "cursors": "{}",
        "user_max": None,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(QUERIES["claim_messages"], params).fetchall()
    claimed = [row for row in rows if row["id"] is not None]
    [end] = [row for row in rows if row["id"] is None]
    return Claim(claimed, end["next_due_at"])


def complete(
    conn: psycopg.Connection, dispatcher: str, completions: list[Completion]
) -> set[uuid.UUID]:
    """The completer's statement: the ids it applied."""
    params = {"dispatcher": dispatcher, "outcomes": orjson.dumps(completions).decode()}
    return {row[0] for row in conn.execute(QUERIES["complete_attempts"], params)}


def ended(
    row: dict[str, Any],
    outcome: AttemptOutcome,
    status: MessageStatus = MessageStatus.PENDING,
    *,
    retry_in: float | None = 0.0,
    **fields: Any,
) -> Completion:
    """The completion of a claimed row (`row`: as `claim` returns it), due again
    `retry_in` seconds after it ended (None: keep its due time)."""
    now = datetime.now(UTC)
    return Completion(
        id=row["id"],
        attempt=row["attempt"],
        status=status,
        outcome=outcome,
        started_at=now,
        finished_at=now,
        next_attempt_at=None if retry_in is None else now + timedelta(seconds=retry_in),
        sender=row["sender"],
        claimed_at=row["claimed_at"],
        **fields,
    )


def sender_level(row: dict[str, Any]) -> Completion:
    """190, the access token expired: pending, refunded, the sender paused."""
    return ended(
        row,
        AttemptOutcome.SENDER,
        refund=1,
        error=EXPIRED_TOKEN,
        code="190",
        pause_base=PAUSE,
        pause_max=PAUSE_MAX,
    )


def transient(row: dict[str, Any]) -> Completion:
    """A 503 (or a timeout): the attempt spent, retried after a short backoff."""
    return ended(row, AttemptOutcome.TRANSIENT, retry_in=0.1, error="http 503")


def handed_back(row: dict[str, Any]) -> Completion:
    return ended(row, AttemptOutcome.INTERRUPTED, refund=1, error="sender paused")


def expired(row: dict[str, Any]) -> Completion:
    return ended(
        row, AttemptOutcome.EXPIRED, MessageStatus.ERROR, retry_in=None, refund=1, error="expired"
    )


def throttled(row: dict[str, Any], throttle: str, retry_in: float = 1.0) -> Completion:
    """130429 ("rate") or 131056 ("pair"): pending again, refunded."""
    return ended(
        row,
        AttemptOutcome.THROTTLED,
        retry_in=retry_in,
        refund=1,
        throttle=throttle,
        error=f"http 400: {130429 if throttle == 'rate' else 131056}",
    )


def state_of(conn: psycopg.Connection, sender: str) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            """SELECT paused, probe_at, pause_seconds, probe_id, probe_until
               FROM outbox.sender_state WHERE id = %s""",
            [sender],
        ).fetchone()
    assert row is not None, f"no state row for {sender}"
    return row


def paused_by_breaker(conn: psycopg.Connection, sender: str) -> datetime:
    """A first call of `sender` claimed and failed sender-level: it is paused for PAUSE.
    Returns when its probe may go."""
    first = claim(conn, limit=1).of(sender)
    assert len(first) == 1
    assert complete(conn, "d1", [sender_level(first[0])]) == {first[0]["id"]}
    state = state_of(conn, sender)
    assert state["paused"]["code"] == "190" and state["pause_seconds"] == PAUSE
    probe_at: datetime = state["probe_at"]
    return probe_at


def pause_periods(conn: psycopg.Connection, sender: str) -> list[float]:
    """Each `sender_paused` event's period (until − when it was written), in order."""
    rows = conn.execute(
        """SELECT extract(epoch FROM (data ->> 'until')::timestamptz
                                     - (data ->> 'timestamp')::timestamptz)::float8
           FROM outbox.events WHERE sender = %s AND event = 'sender_paused' ORDER BY id""",
        [sender],
    ).fetchall()
    return [row[0] for row in rows]


def attempts_of(conn: psycopg.Connection, sender: str) -> dict[str, int]:
    """outcome → how many attempts of the sender's messages were recorded so."""
    rows = conn.execute(
        """SELECT a.outcome, count(*) FROM outbox.attempts a
           JOIN outbox.messages m ON m.id = a.message_id WHERE m.sender = %s GROUP BY 1""",
        [sender],
    ).fetchall()
    return {outcome: n for outcome, n in rows}


def test_a_probe_that_ends_transient_waits_the_same_period_for_the_next(
    sql_conn: psycopg.Connection,
) -> None:
    """A probe called but answered 503 (or timed out) tells nothing of the account: the
    sender stays paused, the same period again (not doubled), and no other message probes
    meanwhile. Over 3 s of the database's own clock, claims every 10 ms: one probe per
    period, each spending one attempt."""
    add_sender(sql_conn, "a")
    add_due(sql_conn, "a", 20)
    paused_by_breaker(sql_conn, "a")

    probes: list[datetime] = []  # each probe's claim time
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        got = claim(sql_conn).of("a")
        assert len(got) <= 1, got
        if got:
            [probe] = got
            assert probe["probe"] and probe["paced"]
            probes.append(probe["claimed_at"])
            assert complete(sql_conn, "d1", [transient(probe)]) == {probe["id"]}
            state = state_of(sql_conn, "a")
            assert state["paused"] is not None and state["pause_seconds"] == PAUSE
            assert state["probe_id"] is None
            # Right away: nothing of that sender, and the claim says when the next may go.
            again = claim(sql_conn)
            assert again.of("a") == []
            assert again.next_due_at == state["probe_at"]
        time.sleep(0.01)  # the claims' pace: a dispatcher polling its wake-ups

    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(probes)]
    print(f"\ntransient probes: {len(probes)}, gaps (s): {[round(g, 3) for g in gaps]}")
    # The first period, then one probe each period: 5 in 3 s (a busy machine: fewer).
    assert 3 <= len(probes) <= 6, probes
    assert all(gap >= PAUSE for gap in gaps), gaps
    # Every pause the same period: the breaker's first, then one per transient probe.
    periods = pause_periods(sql_conn, "a")
    assert len(periods) == 1 + len(probes)
    assert periods == pytest.approx([PAUSE] * len(periods), abs=0.01)
    # One attempt spent per probe, each on another message (the oldest due).
    spent = sql_conn.execute(
        "SELECT attempts FROM outbox.messages WHERE sender = 'a' AND attempts > 0"
    ).fetchall()
    assert sorted(n for (n,) in spent) == [1] * len(probes)
    assert attempts_of(sql_conn, "a") == {"sender": 1, "transient": len(probes)}
    assert state_of(sql_conn, "a")["paused"]["since"] is not None


@pytest.mark.parametrize("end", [handed_back, expired], ids=["interrupted", "expired"])
def test_a_probe_never_called_lets_another_message_probe_at_once(
    sql_conn: psycopg.Connection, end: Callable[[dict[str, Any]], Completion]
) -> None:
    """The probe handed back uncalled (its dispatcher stopping) or expired before its
    call: the next claim takes another probe, with no wait."""
    add_sender(sql_conn, "a")
    add_due(sql_conn, "a", 5)
    probe_at = paused_by_breaker(sql_conn, "a")
    at = probe_at + timedelta(milliseconds=10)

    [probe] = claim(sql_conn, at).of("a")
    assert probe["probe"]
    assert state_of(sql_conn, "a")["probe_id"] == probe["id"]
    assert claim(sql_conn, at).of("a") == []  # one probe out at a time
    assert complete(sql_conn, "d1", [end(probe)]) == {probe["id"]}
    state = state_of(sql_conn, "a")
    assert (state["probe_id"], state["probe_until"]) == (None, None)
    assert state["probe_at"] == probe_at and state["pause_seconds"] == PAUSE  # unchanged

    [second] = claim(sql_conn, at).of("a")  # as of the same moment
    assert second["probe"] and second["id"] != probe["id"]
    assert state_of(sql_conn, "a")["probe_id"] == second["id"]
    assert len(pause_periods(sql_conn, "a")) == 1  # no new pause


def test_a_probe_whose_dispatcher_died_lets_another_probe_once_its_lease_ran_out(
    sql_conn: psycopg.Connection,
) -> None:
    """The probe's dispatcher died: no outcome ever comes. Its lease over, the reaper
    hands its row back to pending, and the next claim takes a new probe."""
    add_sender(sql_conn, "a")
    add_due(sql_conn, "a", 5)
    probe_at = paused_by_breaker(sql_conn, "a")
    at = probe_at + timedelta(milliseconds=10)

    [probe] = claim(sql_conn, at, dispatcher="d-dead").of("a")
    state = state_of(sql_conn, "a")
    assert state["probe_id"] == probe["id"]
    assert state["probe_until"] == at + timedelta(seconds=LEASE)
    # Within its lease, no other probe, whoever claims.
    within = at + timedelta(seconds=LEASE - 1)
    held = claim(sql_conn, within, dispatcher="d2")
    assert held.of("a") == [] and held.next_due_at == state["probe_until"]

    # The lease runs out: the reaper takes the row back.
    sql_conn.execute(
        "UPDATE outbox.messages SET locked_until = now() - interval '1 second' WHERE id = %s",
        [probe["id"]],
    )
    reaped = sql_conn.execute("SELECT outbox.reap_expired_leases(100)").fetchall()
    assert reaped == [(probe["id"],)]
    after = at + timedelta(seconds=LEASE + 0.01)
    [second] = claim(sql_conn, after, dispatcher="d2").of("a")
    assert second["probe"] and second["id"] != probe["id"]
    state = state_of(sql_conn, "a")
    assert state["probe_id"] == second["id"]
    assert state["probe_until"] == after + timedelta(seconds=LEASE)
    assert state["pause_seconds"] == PAUSE  # nothing failed: not doubled


def test_a_resume_by_hand_starts_the_breakers_doubling_again(
    sql_conn: psycopg.Connection,
) -> None:
    """A failed probe doubles the period; a resume by hand (the admin route's statement)
    resets it: the next sender-level error pauses for OUTBOX_SENDER_PAUSE again."""
    add_sender(sql_conn, "a")
    add_due(sql_conn, "a", 5)
    probe_at = paused_by_breaker(sql_conn, "a")

    [probe] = claim(sql_conn, probe_at + timedelta(milliseconds=10)).of("a")
    assert probe["probe"]
    complete(sql_conn, "d1", [sender_level(probe)])
    assert state_of(sql_conn, "a")["pause_seconds"] == 2 * PAUSE  # the failed probe

    assert sql_conn.execute(QUERIES["resume_sender"], {"id": "a"}).fetchall() == [("a",)]
    state = state_of(sql_conn, "a")
    assert state["paused"] is None and state["pause_seconds"] is None

    rows = claim(sql_conn, limit=2).of("a")  # active: not a probe
    assert len(rows) == 2 and not any(row["probe"] for row in rows)
    complete(sql_conn, "d1", [sender_level(row) for row in rows])
    state = state_of(sql_conn, "a")
    assert state["pause_seconds"] == PAUSE, state
    assert pause_periods(sql_conn, "a") == pytest.approx([PAUSE, 2 * PAUSE, PAUSE], abs=0.01)
    assert claim(sql_conn).of("a") == []


# Widens the windows in which two batches would wait for each other: each update of a
# sender's state, and each pending row a pair throttle holds, takes 20 ms.
SLOW_UPDATES = """
CREATE FUNCTION public.slow_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(0.02);
    RETURN NEW;
END $$;
CREATE TRIGGER slow_state BEFORE UPDATE ON outbox.sender_state
    FOR EACH ROW EXECUTE FUNCTION public.slow_update();
CREATE TRIGGER slow_hold BEFORE UPDATE ON outbox.messages
    FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.status = 'pending')
    EXECUTE FUNCTION public.slow_update();
"""


def in_flight(
    conn: psycopg.Connection, dispatcher: str, sender: str, to: str = "5511999999999"
) -> dict[str, Any]:
    """A row of `sender` out with `dispatcher` (its attempt 1), as `claim` returns it."""
    [row_id] = add_due(conn, sender, 1, to)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            """UPDATE outbox.messages
               SET status = 'in_flight', attempts = 1, locked_by = %s,
                   locked_until = now() + interval '30 seconds', updated_at = now()
               WHERE id = %s
               RETURNING id, sender, attempts AS attempt, updated_at AS claimed_at""",
            [dispatcher, row_id],
        ).fetchone()
    assert row is not None
    return row


def complete_together(database_url: str, batches: dict[str, list[Completion]]) -> list[str]:
    """Each dispatcher's batch in a transaction of its own connection, all at once: each
    holds its own rows first (complete_attempts' first step), then all complete. Returns
    the errors (none expected)."""
    errors: list[str] = []
    ready = threading.Barrier(len(batches), timeout=10)

    def run(dispatcher: str, completions: list[Completion]) -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
                conn.execute(
                    "SELECT FROM outbox.messages WHERE id = ANY (%s) FOR UPDATE",
                    [[c.id for c in completions]],
                )
                ready.wait()
                applied = complete(conn, dispatcher, completions)
                assert applied == {c.id for c in completions}, applied
        except Exception as exc:  # collected: a thread's failure must fail the test
            errors.append(f"{dispatcher}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=item) for item in batches.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return errors


def test_two_batches_with_throttles_and_pauses_of_reversed_senders_never_deadlock(
    sql_conn: psycopg.Connection, database_url: str
) -> None:
    """Batch 1: A throttled, B sender-level; batch 2: B throttled, A sender-level, from two
    dispatchers at once: both commit, their news applied to both senders."""
    add_sender(sql_conn, "a", 100)
    add_sender(sql_conn, "b", 100)
    sql_conn.execute(SLOW_UPDATES)
    for _ in range(4):
        a1, b1 = in_flight(sql_conn, "d1", "a"), in_flight(sql_conn, "d1", "b")
        b2, a2 = in_flight(sql_conn, "d2", "b"), in_flight(sql_conn, "d2", "a")
        started = db_now(sql_conn)
        errors = complete_together(
            database_url,
            {
                "d1": [throttled(a1, "rate"), sender_level(b1)],
                "d2": [throttled(b2, "rate"), sender_level(a2)],
            },
        )
        assert errors == []
        for sender in ("a", "b"):
            # Both batches applied: throttled (its rate halved) and paused by its breaker.
            row = sql_conn.execute(
                "SELECT decreased_rate, decreased_at FROM outbox.sender_state WHERE id = %s",
                [sender],
            ).fetchone()
            assert row is not None and row[0] is not None and row[1] >= started, row
            assert state_of(sql_conn, sender)["pause_seconds"] == PAUSE
            sql_conn.execute(QUERIES["resume_sender"], {"id": sender})
        statuses = sql_conn.execute(
            "SELECT status, attempts FROM outbox.messages WHERE id = ANY (%s)",
            [[a1["id"], b1["id"], a2["id"], b2["id"]]],
        ).fetchall()
        assert statuses == [("pending", 0)] * 4  # each refunded, waiting


def test_two_batches_with_pair_throttles_on_the_same_recipients_never_deadlock(
    sql_conn: psycopg.Connection, database_url: str
) -> None:
    """131056 on the same two recipients of one sender in two dispatchers' batches at once
    (in reverse order): both commit, and the recipients' other pending rows wait."""
    add_sender(sql_conn, "c")
    sql_conn.execute(SLOW_UPDATES)
    r1, r2 = "5511900000001", "5511900000002"
    for _ in range(4):
        waiting = [*add_due(sql_conn, "c", 2, r1), *add_due(sql_conn, "c", 2, r2)]
        batch1 = [in_flight(sql_conn, "d1", "c", r1), in_flight(sql_conn, "d1", "c", r2)]
        batch2 = [in_flight(sql_conn, "d2", "c", r2), in_flight(sql_conn, "d2", "c", r1)]
        errors = complete_together(
            database_url,
            {
                "d1": [throttled(row, "pair", retry_in=6) for row in batch1],
                "d2": [throttled(row, "pair", retry_in=6) for row in batch2],
            },
        )
        assert errors == []
        # Held by whichever batch came first: due about 6 s from now, not an hour ago.
        held = sql_conn.execute(
            """SELECT count(*) FROM outbox.messages
               WHERE id = ANY (%s) AND status = 'pending'
                 AND next_attempt_at > now() + interval '5 seconds'""",
            [waiting],
        ).fetchone()
        assert held == (len(waiting),)
        # Out of the way of the next round's.
        sql_conn.execute("UPDATE outbox.messages SET status = 'cancelled' WHERE status = 'pending'")


def test_the_claims_paced_cap_limits_a_limited_sender_only(sql_conn: psycopg.Connection) -> None:
    """With 2 call slots free, a limited sender with 10 tokens and 10 due rows gets 2 rows;
    an unlimited sender in the same claim its whole share (a claim of 64 rows shares out
    to two senders: at least 32 rows each)."""
    add_sender(sql_conn, "lim", 50)  # a full bucket: 0.2 s of 50/s, 10 tokens
    add_sender(sql_conn, "free")
    add_due(sql_conn, "lim", 10)
    add_due(sql_conn, "free", 10)
    at = db_now(sql_conn)

    got = claim(sql_conn, at, limit=64, paced=2)
    assert len(got.of("lim")) == 2 and all(row["paced"] for row in got.of("lim"))
    assert len(got.of("free")) == 10 and not any(row["paced"] for row in got.of("free"))
    # The 2 took 2 tokens only: 8 left for the next claim at the same moment.
    assert len(claim(sql_conn, at, limit=64, paced=20).of("lim")) == 8
    # No slot free: nothing of the limited sender.
    add_due(sql_conn, "lim", 5)
    assert claim(sql_conn, at + timedelta(seconds=1), limit=64, paced=0).of("lim") == []
