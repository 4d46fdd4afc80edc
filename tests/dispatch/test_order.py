"""Order per conversation with real `outbox dispatch` processes and the scripted provider:
three dispatchers send 60 messages to one recipient, some failing for a while and one for
good, one after another in acceptance order (single requests and a batch), also when all
three are killed -9 mid-run and restarted (only the row in flight goes twice); messages
with `ordered: false` go in parallel; a `high` message waits for an earlier `low` one of
its conversation; an admin's retry goes ahead of the later messages not yet sent. And, in
SQL alone: the claim parks a row behind a live earlier message, the finalisation of that
one releases it, and outbox.release_stranded releases only what nothing else would.

Messages are accepted through the store's insert statement (insert_new_messages), as the
API does: a plain INSERT would skip the order check it sets."""

from __future__ import annotations

import hashlib
import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import uuid_utils
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from outbox.store import QUERIES
from tests.dispatch.conftest import (
    CLAIM_PARAMS,
    Call,
    DispatcherProcess,
    Reply,
    ScriptedProvider,
    statuses,
)
from tests.support import ServerThread, wait_for

Start = Callable[..., DispatcherProcess]
Script = Callable[[Call, int], Reply]
Auth = Callable[..., dict[str, str]]

TO = "5511987650001"
OK = Reply(body={"id": "prov-ok"})
TRANSIENT = Reply(status=503)
PERMANENT = Reply(status=400, body={"error": {"code": 131026, "message": "undeliverable"}})


class TimedProvider(ScriptedProvider):
    """The scripted provider, also recording when each call ended (its reply made, by the
    provider's clock, as `Call.at`) and the status it answered."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: dict[tuple[str, int], float] = {}
        self.status: dict[tuple[str, int], int] = {}
        self.app = Starlette(routes=[Route("/{name}", self._timed, methods=["POST"])])

    async def _timed(self, request: Request) -> Response:
        data = await request.json()  # read once: _send has it again at no cost
        key = (data["task_id"], data["attempt"])
        status = 0  # no answer (the call was cut)
        try:
            response = await self._send(request)
            status = response.status_code
            return response
        finally:
            with self._lock:
                self.ended[key], self.status[key] = time.time(), status

    def intervals(self, task_id: str) -> list[tuple[float, float, int]]:
        """(start, end, status) of each call of `task_id` that has ended, by start."""
        with self._lock:
            calls = [c for c in self.calls if c.task_id == task_id]
            return sorted(
                (c.at, self.ended[key], self.status[key])
                for c in calls
                if (key := (c.task_id, c.attempt)) in self.ended
            )

    def successes(self) -> list[str]:
        """The task ids of the calls answered 2xx, in the order they arrived."""
        with self._lock:
            return [
                c.task_id
                for c in sorted(self.calls, key=lambda c: c.at)
                if 200 <= self.status.get((c.task_id, c.attempt), 0) < 300
            ]


Provider = tuple[TimedProvider, str]


@pytest.fixture
def provider() -> Iterator[Provider]:
    """This module's provider: the conftest's, with the end of each call (the dispatchers'
    fixtures take it by this name)."""
    timed = TimedProvider()
    with ServerThread(timed.app) as server:
        yield timed, f"{server.url}/send"


@dataclass
class Message:
    """One message as the API accepts it (insert_new_messages' JSON document)."""

    to: str = TO
    user_id: str = "user-1"
    sender: str = "default"
    priority: int = 1  # 0 high, 1 normal, 2 low
    ordered: bool = True
    send_at: str | None = None
    max_attempts: int = 8
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or str(uuid_utils.uuid7())

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "client_message_id": None,
            "to": self.to,
            "type": "text",
            "payload": {"body": "hi", "preview_url": False},
            "request_hash": hashlib.sha256(self.id.encode()).hexdigest(),
            "max_attempts": self.max_attempts,
            "send_at": self.send_at,
            "expires_at": None,
            "sender": self.sender,
            "priority": self.priority,
            "ordered": self.ordered,
        }


def accept(conn: psycopg.Connection, messages: Sequence[Message]) -> list[str]:
    """One request's messages, accepted in one statement as the API inserts them (array
    order is acceptance order); their ids."""
    conn.execute(
        QUERIES["insert_new_messages"],
        {"messages": orjson.dumps([m.document() for m in messages]).decode()},
    )
    return [m.id for m in messages]


def accept_one(conn: psycopg.Connection, **fields: Any) -> str:
    [task_id] = accept(conn, [Message(**fields)])
    return task_id


def row(conn: psycopg.Connection, task_id: str) -> tuple[str, bool, bool]:
    """(status, held, check_order) of a message."""
    found = conn.execute(
        "SELECT status, held, check_order FROM outbox.messages WHERE id = %s", [task_id]
    ).fetchone()
    assert found is not None
    return found[0], found[1], found[2]


def in_acceptance_order(conn: psycopg.Connection) -> list[str]:
    """Every message's id by its place in its conversation (order_at, seq)."""
    return [
        str(r[0]) for r in conn.execute("SELECT id FROM outbox.messages ORDER BY order_at, seq")
    ]


def assert_one_after_another(scripted: TimedProvider, order: list[str]) -> None:
    """No call of a message starts before every call of the message before it ended."""
    for earlier, later in itertools.pairwise(order):
        ends = [end for _, end, _ in scripted.intervals(earlier)]
        starts = [start for start, _, _ in scripted.intervals(later)]
        assert ends and starts, (earlier, later)
        assert min(starts) >= max(ends), (
            f"{later} called {max(ends) - min(starts):.3f}s before {earlier}'s last call ended"
        )


def failing_script(transient: dict[str, int], permanent: set[str], delay: float) -> Script:
    """Each call takes `delay`; the tasks of `transient` fail that many calls (503) first,
    those of `permanent` every call (400)."""

    def script(call: Call, n: int) -> Reply:
        if call.task_id in permanent:
            reply = PERMANENT
        elif n < transient.get(call.task_id, 0):
            reply = TRANSIENT
        else:
            reply = Reply(body={"id": f"prov-{call.task_id}"})
        return Reply(reply.status, reply.body, reply.headers, delay)

    return script


def start_together(start: Start, count: int, **overrides: str) -> list[DispatcherProcess]:
    """`count` dispatchers started at once, ready."""
    processes = [start(ready=False, **overrides) for _ in range(count)]
    for process in processes:
        process.wait_ready()
    return processes


QUICK_RETRIES = {"retry_base_delay": "50ms", "retry_max_delay": "200ms"}


def sixty_to_one_recipient() -> tuple[list[Message], dict[str, int], Script]:
    """60 messages to TO; how many calls a few of them fail (one or two each), in each
    part of the run accept_sixty makes of them; and a script that fails those, and the
    31st for good."""
    messages = [Message() for _ in range(60)]
    ids = [m.id for m in messages]
    transient = {ids[i]: 1 + i % 2 for i in (3, 11, 24, 33, 41, 52, 59)}
    return messages, transient, failing_script(transient, {ids[30]}, delay=0.02)


def accept_sixty(conn: psycopg.Connection, messages: list[Message]) -> None:
    """20 single requests one after another, a batch of 20, 20 single requests more."""
    for message in messages[:20]:
        accept(conn, [message])
    accept(conn, messages[20:40])
    for message in messages[40:]:
        accept(conn, [message])


def assert_delivered_in_order(
    conn: psycopg.Connection, scripted: TimedProvider, ids: list[str], recovered: set[str]
) -> None:
    """Every message final (the 31st `error`, for good), in acceptance order: successes in
    that order, each message's calls after the last call of the one before. Only a row of
    `recovered` may have gone out twice: its successes follow each other."""
    assert in_acceptance_order(conn) == ids  # the batch in its array order
    assert row(conn, ids[30])[0] == "error"
    successes = scripted.successes()
    assert [task_id for task_id, _ in itertools.groupby(successes)] == ids[:30] + ids[31:]
    twice = {task_id for task_id in successes if successes.count(task_id) > 1}
    assert twice <= recovered
    assert_one_after_another(scripted, ids)


def test_sixty_messages_to_one_recipient_go_one_after_another_in_acceptance_order(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    messages, transient, scripted.script = sixty_to_one_recipient()
    start_together(start_dispatcher, 3, **QUICK_RETRIES)
    accept_sixty(sql_conn, messages)
    wait_for(
        lambda: statuses(sql_conn) == {"sent": 59, "error": 1},
        timeout=45,
        what=f"59 sent and 1 error (now {statuses(sql_conn)})",
    )

    ids = [m.id for m in messages]
    assert_delivered_in_order(sql_conn, scripted, ids, recovered=set())
    # Each failure was called again until it went, each success called once.
    for i, task_id in enumerate(ids):
        calls = [status for *_, status in scripted.intervals(task_id)]
        wanted = [400] if i == 30 else [503] * transient.get(task_id, 0) + [200]
        assert calls == wanted, (i, calls)
    # The three dispatchers took turns.
    dispatchers = sql_conn.execute("SELECT DISTINCT dispatcher FROM outbox.attempts").fetchall()
    assert len(dispatchers) >= 2, dispatchers


def test_order_holds_when_every_dispatcher_is_killed_mid_run_and_restarted(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    messages, _, scripted.script = sixty_to_one_recipient()
    # A short lease: the killed dispatchers' row comes back within seconds.
    short = {**QUICK_RETRIES, "lease_seconds": "2s", "provider_timeout": "1s"}
    first = start_together(start_dispatcher, 3, **short)
    accept_sixty(sql_conn, messages)

    def sent() -> int:
        return statuses(sql_conn).get("sent", 0)

    wait_for(lambda: sent() >= 20, timeout=30, what=f"20 sent (now {statuses(sql_conn)})")
    wait_for(lambda: scripted.in_flight > 0, what="a call in flight")
    for process in first:
        process.signal(signal.SIGKILL)
    for process in first:
        process.wait()
    at_kill = sent()
    start_together(start_dispatcher, 3, **short)
    wait_for(
        lambda: statuses(sql_conn) == {"sent": 59, "error": 1},
        timeout=45,
        what=f"59 sent and 1 error (now {statuses(sql_conn)})",
    )

    assert at_kill < 59, "the kill should come mid-run"
    # The row in flight at the kill came back when its lease ran out; no other row of
    # the conversation was in flight then.
    recovered = {
        str(r[0])
        for r in sql_conn.execute(
            "SELECT message_id FROM outbox.attempts WHERE outcome = 'lease_expired'"
        )
    }
    assert len(recovered) <= 1, recovered
    assert_delivered_in_order(sql_conn, scripted, [m.id for m in messages], recovered)


def test_unordered_messages_to_one_recipient_go_in_parallel(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(body={"id": f"prov-{call.task_id}"}, delay=0.3)
    start_dispatcher()
    ids = accept(sql_conn, [Message(ordered=False) for _ in range(10)])
    ids += [accept_one(sql_conn, ordered=False) for _ in range(10)]
    wait_for(lambda: statuses(sql_conn) == {"sent": 20}, what=f"20 sent (now {statuses(sql_conn)})")
    assert sorted(scripted.successes()) == sorted(ids)
    assert scripted.max_in_flight >= 3  # several calls of one recipient at once
    assert not any(row(sql_conn, task_id)[2] for task_id in ids)  # none was checked


def test_a_high_message_waits_for_an_earlier_low_one_of_its_conversation(
    sql_conn: psycopg.Connection, provider: Provider, start_dispatcher: Start
) -> None:
    scripted, _ = provider
    low = Message(priority=2)
    # The low one fails once: the high one is due, and first by priority, while it waits
    # for its retry.
    scripted.script = failing_script({low.id: 1}, set(), delay=0.02)
    start_dispatcher(retry_base_delay="500ms", retry_max_delay="500ms")
    accept(sql_conn, [low])
    wait_for(lambda: scripted.intervals(low.id), what="the low message's first call")
    high = accept_one(sql_conn, priority=0)
    wait_for(lambda: statuses(sql_conn) == {"sent": 2}, what=f"2 sent ({statuses(sql_conn)})")

    assert scripted.successes() == [low.id, high]
    assert [status for *_, status in scripted.intervals(low.id)] == [503, 200]
    assert_one_after_another(scripted, [low.id, high])


def test_an_admin_retry_goes_ahead_of_the_later_messages_not_yet_sent(
    client: httpx.Client,
    auth: Auth,
    sql_conn: psycopg.Connection,
    provider: Provider,
    start_dispatcher: Start,
) -> None:
    scripted, _ = provider
    first, second, third = Message(), Message(), Message()
    # The first fails for good; the second then goes, fails, and waits 2 s for its retry,
    # holding the third: the first, retried meanwhile, goes at once, before them both.
    refused = {first.id}

    def answer(call: Call, n: int) -> Reply:
        if call.task_id in refused:
            return PERMANENT
        if call.task_id == second.id and n == 0:
            return TRANSIENT
        return Reply(body={"id": f"prov-{call.task_id}"})

    scripted.script = answer
    start_dispatcher(retry_base_delay="2s", retry_max_delay="2s")
    accept(sql_conn, [first, second, third])
    wait_for(
        lambda: [s for *_, s in scripted.intervals(second.id)] == [503], what="second's failure"
    )
    assert row(sql_conn, first.id)[0] == "error"
    assert row(sql_conn, third.id)[0] == "pending"
    refused.clear()
    retried = client.post(
        f"/api/v1/whatsapp/messages/{first.id}/retry", headers=auth("ops", admin=True)
    )
    assert retried.status_code == 200, retried.text
    wait_for(lambda: statuses(sql_conn) == {"sent": 3}, what=f"3 sent ({statuses(sql_conn)})")

    assert scripted.successes() == [first.id, second.id, third.id]
    [_, (retry_start, retry_end, _)] = scripted.intervals(first.id)
    [(_, failed_at, _), (second_start, _, _)] = scripted.intervals(second.id)
    assert retry_start < failed_at + 2  # at once, not after the second's retry
    assert second_start >= retry_end
    assert_one_after_another(scripted, [second.id, third.id])


# The statements alone ----------------------------------------------------------------

CLAIM = {**CLAIM_PARAMS, "limit": 10}


def claim(conn: psycopg.Connection, now: str | None = None) -> list[str]:
    """One claim, committed, as of `now` (the database's clock when None): the ids it took."""
    rows = conn.execute(QUERIES["claim_messages"], {**CLAIM, "now": now}).fetchall()
    return [str(r[0]) for r in rows if r[0] is not None]


def finish(conn: psycopg.Connection, task_id: str, status: str = "sent") -> None:
    """An outcome as a dispatcher writes it: one UPDATE that leaves the row final."""
    conn.execute(
        """UPDATE outbox.messages
           SET status = %s, finished_at = now(), locked_by = NULL, locked_until = NULL
           WHERE id = %s""",
        [status, task_id],
    )


def test_the_claim_parks_a_row_behind_one_in_flight_and_its_finalisation_releases_it(
    sql_conn: psycopg.Connection,
) -> None:
    first = accept_one(sql_conn)
    assert row(sql_conn, first) == ("pending", False, False)  # nothing live before it
    assert claim(sql_conn) == [first]
    second = accept_one(sql_conn)
    assert row(sql_conn, second) == ("pending", False, True)  # the first is live
    assert claim(sql_conn) == []
    assert row(sql_conn, second) == ("pending", True, True)  # parked
    assert claim(sql_conn) == []  # parked rows are not looked at again

    finish(sql_conn, first)
    assert row(sql_conn, second) == ("pending", False, True)
    assert claim(sql_conn) == [second]

    # Two of a batch claimed together: the later one waits behind the earlier one.
    a, b = accept(sql_conn, [Message(to="5511987650002"), Message(to="5511987650002")])
    assert claim(sql_conn) == [a]
    assert row(sql_conn, b) == ("pending", True, True)
    finish(sql_conn, a, "error")  # an error lets the next one go as well
    assert claim(sql_conn) == [b]


def test_release_stranded_releases_a_parked_row_only_when_nothing_live_is_before_it(
    sql_conn: psycopg.Connection,
) -> None:
    alone = accept_one(sql_conn, to="5511987650011")
    early, late = accept(sql_conn, [Message(to="5511987650012"), Message(to="5511987650012")])
    other = accept_one(sql_conn, to="5511987650013")
    # Parked by hand, as a finalisation that saw another one live could leave them.
    sql_conn.execute(
        "UPDATE outbox.messages SET held = true WHERE id = ANY(%s)", [[alone, late, other]]
    )

    def stranded(after: tuple[str | None, str | None], limit: int) -> tuple[Any, ...]:
        found = sql_conn.execute(
            QUERIES["release_stranded"], {"sender": after[0], "to": after[1], "limit": limit}
        ).fetchone()
        assert found is not None
        return tuple(found)

    # One conversation a round: the first, then on from where it stopped, to the end.
    assert stranded((None, None), 1) == ("default", "5511987650011", 1)
    assert row(sql_conn, alone) == ("pending", False, False)
    assert stranded(("default", "5511987650011"), 1) == ("default", "5511987650012", 0)
    assert row(sql_conn, late)[1]  # the early one is live before it: it stays parked
    assert stranded(("default", "5511987650012"), 5) == (None, None, 1)
    assert row(sql_conn, other) == ("pending", False, False)
    assert stranded((None, None), 5) == (None, None, 0)
    assert row(sql_conn, late)[1]

    finish(sql_conn, early)  # the trigger's release, not the sweep's
    assert row(sql_conn, late) == ("pending", False, True)


def test_a_finalisation_racing_a_claim_never_strands_the_row_behind_it(
    sql_conn: psycopg.Connection, database_url: str
) -> None:
    first = accept_one(sql_conn)
    assert claim(sql_conn) == [first]
    second = accept_one(sql_conn)

    # The claim parks first (its transaction open): the finalisation of the earlier
    # message waits for it (the claim holds that row FOR SHARE), then releases the row.
    with psycopg.connect(database_url) as parking, psycopg.connect(database_url) as finishing:
        assert claim(parking) == []
        pid = finishing.info.backend_pid
        done = threading.Thread(target=finish, args=(finishing, first))
        done.start()
        wait_for(
            lambda: (
                sql_conn.execute(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", [pid]
                ).fetchone()
                == (True,)
            ),
            what="the finalisation waiting for the claim",
        )
        parking.commit()
        done.join(timeout=10)
        finishing.commit()
    assert row(sql_conn, first)[0] == "sent"
    assert row(sql_conn, second) == ("pending", False, True)
    assert claim(sql_conn) == [second]

    # The finalisation first (not committed yet): the claim leaves the row as it is, and
    # takes it once the finalisation has committed.
    third = accept_one(sql_conn)
    with psycopg.connect(database_url) as finishing:
        finish(finishing, second)
        assert claim(sql_conn) == []
        assert row(sql_conn, third) == ("pending", False, True)  # not parked
        finishing.commit()
    assert claim(sql_conn) == [third]


def test_an_admin_retry_holds_back_a_later_message_in_flight_then_failed(
    sql_conn: psycopg.Connection,
) -> None:
    first = accept_one(sql_conn)
    assert claim(sql_conn) == [first]
    finish(sql_conn, first, "error")
    second = accept_one(sql_conn)
    assert row(sql_conn, second) == ("pending", False, False)  # nothing live before it
    assert claim(sql_conn) == [second]

    # The first retried while the second is in flight; then the second's call fails, for
    # now: not sent yet, it waits for the first, which goes at once.
    retried = sql_conn.execute("SELECT id FROM outbox.retry_message(%s, 4)", [first]).fetchall()
    assert len(retried) == 1
    sql_conn.execute(
        """UPDATE outbox.messages
           SET status = 'pending', next_attempt_at = now(), locked_by = NULL,
               locked_until = NULL
           WHERE id = %s""",
        [second],
    )
    assert claim(sql_conn) == [first]
    assert row(sql_conn, second) == ("pending", True, True)
    finish(sql_conn, first)
    assert claim(sql_conn) == [second]


def test_a_scheduled_message_takes_its_place_at_its_due_time(
    sql_conn: psycopg.Connection,
) -> None:
    [(later, due)] = sql_conn.execute(
        "SELECT now() + interval '1 hour', now() + interval '2 hours'"
    ).fetchall()
    scheduled = accept_one(sql_conn, send_at=later.isoformat())
    # Accepted before its time: before it, not held back by it.
    sooner = accept_one(sql_conn)
    assert row(sql_conn, sooner) == ("pending", False, True)
    assert claim(sql_conn) == [sooner]
    # At its time, it waits for the one accepted before it, still in flight.
    assert claim(sql_conn, due.isoformat()) == []
    assert row(sql_conn, scheduled) == ("pending", True, True)
    finish(sql_conn, sooner)
    assert claim(sql_conn, due.isoformat()) == [scheduled]


def test_two_finalisations_at_once_strand_a_row_that_release_stranded_then_releases(
    sql_conn: psycopg.Connection, database_url: str
) -> None:
    # Two messages of one conversation in flight together: the second, then the first,
    # retried by an admin while the second was out. A third parked behind the second.
    first = accept_one(sql_conn)
    assert claim(sql_conn) == [first]
    finish(sql_conn, first, "error")
    second = accept_one(sql_conn)
    assert claim(sql_conn) == [second]
    third = accept_one(sql_conn)
    assert sql_conn.execute("SELECT id FROM outbox.retry_message(%s, 4)", [first]).fetchall()
    assert claim(sql_conn) == [first]
    assert row(sql_conn, third) == ("pending", True, True)

    # Both finalised at the same moment: each one's release sees the other still live.
    with psycopg.connect(database_url) as one, psycopg.connect(database_url) as other:
        finish(one, first)
        finish(other, second)
        one.commit()
        other.commit()
    assert row(sql_conn, third) == ("pending", True, True)  # stranded
    assert claim(sql_conn) == []

    found = sql_conn.execute(
        QUERIES["release_stranded"], {"sender": None, "to": None, "limit": 100}
    ).fetchone()
    assert found == (None, None, 1)
    assert claim(sql_conn) == [third]
