"""The feed end to end: real uvicorn, real `outbox dispatch`, the `websockets` client."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from websockets.typing import Subprotocol

from tests.dispatch.conftest import DispatcherProcess, Reply, ScriptedProvider, wait_all
from tests.gateway.conftest import (
    Serve,
    close_of,
    event_ids,
    feed_of,
    next_event,
    open_feed,
    read_events,
    write_events,
)
from tests.support import wait_for

Token = Callable[..., str]
Provider = tuple[ScriptedProvider, str]
Start = Callable[..., DispatcherProcess]

WIRE_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TEXT = {"to": "5511999999999", "type": "text", "text": "hello"}


def post(server_url: str, token: str, body: dict[str, Any], path: str = "/send/") -> Any:
    response = httpx.post(
        f"{server_url}/api/v1/whatsapp{path}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return response.json()


# uvicorn's two implementations on the `websockets` library (the legacy one is deprecated).
@pytest.mark.filterwarnings("ignore::uvicorn.config.UvicornDeprecationWarning")
@pytest.mark.parametrize("ws", ["websockets-sansio", "websockets"])
def test_post_then_event_with_the_task_id_and_the_exact_v1_shape(
    ws: str, serve: Serve, start_dispatcher: Start, token: Token
) -> None:
    server = serve(ws=ws)
    start_dispatcher(provider_timeout="5s")
    with open_feed(server, token("user-1")) as feed:
        accepted = post(server.url, token("user-1"), {**TEXT, "client_message_id": "c-1"})
        event = next_event(feed)
        while event["event"] == "message_retrying":  # only when the provider was slow
            event = next_event(feed)
    task_id = accepted["task_id"]
    assert list(event) == ["event", "data", "version"]
    assert event["event"] == "message_sent" and event["version"] == "v1"
    data = event["data"]
    assert list(data)[:5] == ["message_id", "status", "to", "timestamp", "error"]
    assert WIRE_TIME.match(data["timestamp"]), data["timestamp"]
    assert isinstance(data["event_id"], int) and data["event_id"] > 0
    assert data == {
        "message_id": task_id,
        "status": "queued",
        "to": "5511999999999",
        "timestamp": data["timestamp"],
        "error": None,
        "event_id": data["event_id"],
        "client_message_id": "c-1",
        "provider_message_id": f"prov-{task_id}",
        "attempt": data["attempt"],
        "sender": "default",
        "priority": "normal",
    }


def test_a_failing_message_yields_retrying_events_then_failed_with_the_error(
    serve: Serve,
    provider: Provider,
    start_dispatcher: Start,
    token: Token,
    sql_conn: psycopg.Connection,
) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(status=503, body={"error": "upstream down"})
    server = serve(max_attempts=3)
    start_dispatcher(provider_timeout="5s")
    with open_feed(server, token("user-1")) as feed:
        task_id = post(server.url, token("user-1"), TEXT)["task_id"]
        events = read_events(feed, 3)
    assert [(e["event"], e["data"]["status"], e["data"]["attempt"]) for e in events] == [
        ("message_retrying", "retrying", 1),
        ("message_retrying", "retrying", 2),
        ("message_sent", "failed", 3),
    ]
    assert {e["data"]["message_id"] for e in events} == {task_id}
    for retrying in events[:2]:
        assert retrying["data"]["error"]
        assert WIRE_TIME.match(retrying["data"]["next_attempt_at"])
    [(last_error,)] = sql_conn.execute(
        "SELECT last_error FROM outbox.messages WHERE id = %s", [task_id]
    ).fetchall()
    assert events[2]["data"]["error"] == last_error and "503" in last_error
    assert "next_attempt_at" not in events[2]["data"]
    ids = [e["data"]["event_id"] for e in events]
    assert ids == sorted(ids) == event_ids(sql_conn)


def test_each_user_sees_exactly_its_own_events_and_an_admin_sees_all(
    serve: Serve, start_dispatcher: Start, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve()
    start_dispatcher(provider_timeout="5s")
    sent: dict[str, set[str]] = {}
    with (
        open_feed(server, token("user-a")) as feed_a,
        open_feed(server, token("user-b")) as feed_b,
        open_feed(server, token("root", admin=True)) as feed_admin,
    ):
        for user in ("user-a", "user-b"):
            batch = {"messages": [{**TEXT, "text": f"{user} {i}"} for i in range(100)]}
            accepted = post(server.url, token(user), batch, "/send/batch")
            sent[user] = {item["task_id"] for item in accepted["messages"]}
        # A provider call that times out under load adds a retrying event: compare with
        # the events stored once everything is sent, not with a count fixed in advance.
        wait_all(sql_conn, "sent", 200)
        expected = {user: event_ids(sql_conn, user) for user in sent}
        seen = {
            "user-a": read_events(feed_a, len(expected["user-a"])),
            "user-b": read_events(feed_b, len(expected["user-b"])),
            "admin": read_events(feed_admin, len(event_ids(sql_conn))),
        }
        # Nothing else was waiting ahead of a later event: each one's next event is its own.
        sentinels = {user: write_events(sql_conn, 1, user_id=user)[0] for user in sent}
        assert next_event(feed_a)["data"]["message_id"] == sentinels["user-a"]
        assert next_event(feed_b)["data"]["message_id"] == sentinels["user-b"]
        assert next_event(feed_admin)["data"]["message_id"] == sentinels["user-a"]
    for user in ("user-a", "user-b"):
        assert [e["data"]["event_id"] for e in seen[user]] == expected[user]
        assert {e["data"]["message_id"] for e in seen[user]} == sent[user]
    assert {e["data"]["message_id"] for e in seen["admin"]} == sent["user-a"] | sent["user-b"]
    admin_ids = [e["data"]["event_id"] for e in seen["admin"]]
    assert admin_ids == sorted(expected["user-a"] + expected["user-b"])


def test_both_paths_and_a_bearer_header(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve()
    headers = {"Authorization": f"Bearer {token('user-1')}"}
    with (
        open_feed(server, None, additional_headers=headers) as with_slash,
        open_feed(server, token("user-1"), path="/ws/whatsapp") as without_slash,
    ):
        [task_id] = write_events(sql_conn, 1)
        assert next_event(with_slash)["data"]["message_id"] == task_id
        assert next_event(without_slash)["data"]["message_id"] == task_id


def test_the_token_as_a_subprotocol_keeps_it_out_of_the_url(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve()
    offered = [Subprotocol("outbox"), Subprotocol(f"bearer.{token('user-1')}")]
    with open_feed(server, None, subprotocols=offered) as feed:
        assert feed.subprotocol == "outbox"  # selected, so browsers accept the handshake
        [task_id] = write_events(sql_conn, 1)
        assert next_event(feed)["data"]["message_id"] == task_id
    forged = [Subprotocol("outbox"), Subprotocol(f"bearer.{token('user-1')[:-4]}AAAA")]
    with open_feed(server, None, subprotocols=forged) as feed:
        assert close_of(feed) == (4401, "token signature invalid")


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda token: None, "missing Authorization header"),
        (lambda token: "not-a-jwt", "malformed token"),
        (lambda token: token("user-1")[:-4] + "AAAA", "token signature invalid"),
        (lambda token: token("user-1", ttl=-30), "token expired"),
    ],
    ids=["missing", "malformed", "bad-signature", "expired"],
)
def test_a_missing_bad_or_expired_token_closes_with_4401_and_a_reason(
    serve: Serve, token: Token, make_token: Callable[[Token], str | None], reason: str
) -> None:
    server = serve()
    with open_feed(server, make_token(token)) as feed:
        code, why = close_of(feed)
    assert code == 4401 and reason in why


def test_a_token_that_expires_while_connected_closes_at_expiry_with_4401(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve()
    # `exp` is in whole seconds: 15 s leaves a loaded machine time to connect and hear
    # one event first (5 s once ran out in CI with a browser test on the other core, 10 s
    # with a second test run beside it).
    with open_feed(server, token("user-1", ttl=15)) as feed:
        [task_id] = write_events(sql_conn, 1)
        assert next_event(feed)["data"]["message_id"] == task_id
        assert close_of(feed, timeout=30) == (4401, "token expired")


@pytest.mark.parametrize("since", ["abc", "-1", "1.5", "²", str(2**63)])
def test_a_bad_since_closes_with_4400(serve: Serve, token: Token, since: str) -> None:
    server = serve()
    with open_feed(server, token("user-1"), since=since) as feed:
        code, reason = close_of(feed)
    assert code == 4400 and "since" in reason


def test_a_cancel_is_announced_as_message_cancelled(serve: Serve, token: Token) -> None:
    server = serve()
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    with open_feed(server, token("user-1")) as feed:
        task_id = post(
            server.url, token("user-1"), {**TEXT, "send_at": tomorrow, "client_message_id": "c-9"}
        )["task_id"]
        response = httpx.delete(
            f"{server.url}/api/v1/whatsapp/messages/{task_id}",
            headers={"Authorization": f"Bearer {token('user-1')}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        event = next_event(feed)
    assert event["event"] == "message_cancelled" and event["version"] == "v1"
    data = event["data"]
    assert WIRE_TIME.match(data["timestamp"]), data["timestamp"]
    assert data == {
        "message_id": task_id,
        "status": "cancelled",
        "to": "5511999999999",
        "timestamp": data["timestamp"],
        "error": None,
        "event_id": data["event_id"],
        "client_message_id": "c-9",
        "provider_message_id": None,
        "attempt": 0,
        "sender": "default",
        "priority": "normal",
    }


def test_since_replays_only_that_users_events_then_continues_live(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve()
    mine = write_events(sql_conn, 3, user_id="user-1")
    write_events(sql_conn, 2, user_id="user-2")
    mine += write_events(sql_conn, 2, user_id="user-1")
    first = event_ids(sql_conn, "user-1")[0]
    with open_feed(server, token("user-1"), since=first) as feed:
        replayed = read_events(feed, 4)
        live = write_events(sql_conn, 1, user_id="user-1")
        assert next_event(feed)["data"]["message_id"] == live[0]
    assert [e["data"]["message_id"] for e in replayed] == mine[1:]
    with open_feed(server, token("root", admin=True), since=0) as feed:
        assert len(read_events(feed, 8)) == 8


def test_a_purged_since_closes_with_4410_and_a_since_beyond_the_newest_waits(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve()
    write_events(sql_conn, 5)
    ids = event_ids(sql_conn)
    sql_conn.execute("DELETE FROM outbox.events WHERE id <= %s", [ids[2]])  # a purge
    with open_feed(server, token("user-1"), since=ids[0]) as feed:
        code, reason = close_of(feed)
    assert code == 4410 and "purged" in reason
    with open_feed(server, token("user-1"), since=ids[2]) as feed:  # nothing lost: replays
        assert [e["data"]["event_id"] for e in read_events(feed, 2)] == ids[3:]
    # Every event purged: the sequence still tells what was there.
    sql_conn.execute("DELETE FROM outbox.events")
    with open_feed(server, token("user-1"), since=ids[3]) as feed:
        assert close_of(feed)[0] == 4410
    with (
        open_feed(server, token("user-1"), since=ids[4]) as caught_up,
        open_feed(server, token("user-1"), since=ids[4] + 1) as ahead,
    ):
        new = write_events(sql_conn, 2)
        assert [e["data"]["message_id"] for e in read_events(caught_up, 2)] == new
        # An id beyond the newest waits for the events after it.
        assert next_event(ahead)["data"]["message_id"] == new[1]


def test_an_event_id_taken_but_never_committed_does_not_make_a_resume_look_purged(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    """Every event purged, then an id taken by a writer that rolled back (or has not
    committed yet): a client resuming from the newest event it saw lost nothing."""
    server = serve()
    write_events(sql_conn, 2)
    newest = event_ids(sql_conn)[-1]
    sql_conn.execute("DELETE FROM outbox.events")
    with sql_conn.transaction(force_rollback=True):
        write_events(sql_conn, 1)  # its id is taken for good
    with open_feed(server, token("user-1"), since=newest) as feed:
        (new,) = write_events(sql_conn, 1)
        assert next_event(feed)["data"]["message_id"] == new
    with open_feed(server, token("user-1"), since=newest - 1) as feed:
        assert close_of(feed)[0] == 4410  # the purged one is still told apart


def test_a_rolled_back_completion_produces_no_event(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve()
    ids = write_events(sql_conn, 2, status="in_flight")
    sql_conn.execute(
        "UPDATE outbox.messages SET locked_by = 'd1', locked_until = now() + interval '1 minute'"
    )
    sql_conn.execute("DELETE FROM outbox.events")
    outcome = {
        "attempt": 1,
        "status": "sent",
        "outcome": "sent",
        "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:01Z",
        "provider_message_id": "p",
        "refund": 0,
    }
    with open_feed(server, token("user-1")) as feed:
        with sql_conn.transaction(force_rollback=True):
            applied = sql_conn.execute(
                "SELECT outbox.complete_attempts(%s::json, 'd1')",
                [orjson.dumps([{**outcome, "id": ids[0]}]).decode()],
            ).fetchall()
            assert len(applied) == 1 and len(event_ids(sql_conn)) == 1
        assert event_ids(sql_conn) == []
        sql_conn.execute(
            "SELECT outbox.complete_attempts(%s::json, 'd1')",
            [orjson.dumps([{**outcome, "id": ids[1]}]).decode()],
        )
        event = next_event(feed)
    # The first event the client hears of is the committed one, never the rolled-back one.
    assert event["data"]["message_id"] == ids[1]
    assert event_ids(sql_conn) == [event["data"]["event_id"]]


def test_with_no_client_connected_the_feed_follows_without_reading_the_table(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve()
    follower = feed_of(server)
    # Listening, positioned, and done with the reads of start-up (its LISTEN connection
    # opening makes it look once more for what it might have missed).
    wait_for(
        lambda: follower.listening and follower.last_seen is not None and follower.idle,
        what="the feed listening, positioned and idle",
    )
    (written_at,) = sql_conn.execute("SELECT clock_timestamp()").fetchone()
    write_events(sql_conn, 3)
    newest = event_ids(sql_conn)[-1]
    wait_for(lambda: follower.last_seen == newest, what="the feed following the notifications")
    # The notification's id was enough: no backend of this database has read a page of
    # events since they were written (its last statement would show it).
    reads = sql_conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND query LIKE %s AND query_start > %s",
        ["%FROM outbox.events%WHERE id > $1%", written_at],
    ).fetchone()
    assert reads == (0,)
    # A client that connects now starts after those events, and hears the next ones.
    with open_feed(server, token("user-1")) as feed:
        later = write_events(sql_conn, 2)
        assert [e["data"]["message_id"] for e in read_events(feed, 2)] == later
