"""Sender events on the feed: `sender_paused` and `sender_resumed` reach the admins and the
users allowed to send from that sender (everyone for `*`), live and on a `?since=` replay,
in id order among the message events. Senders are made through the admin API of a real
server (with OUTBOX_SECRET_KEY), paused and resumed there."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.fernet import Fernet
from websockets.sync.client import ClientConnection

from tests.gateway.conftest import Serve, feed_of, next_event, open_feed, read_events, write_events
from tests.support import ServerThread, wait_for

Token = Callable[..., str]

SENDERS = "/api/v1/whatsapp/senders"
KEY = Fernet.generate_key().decode()
WIRE_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def server(serve: Serve) -> ServerThread:
    return serve(secret_key=KEY)


@pytest.fixture
def admin_http(server: ServerThread, token: Token) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {token('root', admin=True)}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        yield http


def put_sender(http: httpx.Client, server: ServerThread, sender_id: str, users: list[str]) -> None:
    """Store a sender and wait until the server's directory knows it with these users."""
    body = {"provider": "fake", "settings": {"latency_ms": 0}, "users": users}
    response = http.put(f"{SENDERS}/{sender_id}", json=body)
    assert response.status_code in (200, 201), response.text
    directory = feed_of(server).senders
    assert directory is not None

    def known() -> bool:
        sender = directory.get(sender_id)
        return sender is not None and sender.config.users == users

    wait_for(known, what=f"the directory knowing {sender_id} for {users}")


def pause(http: httpx.Client, sender_id: str, reason: str = "maintenance") -> None:
    response = http.post(f"{SENDERS}/{sender_id}/pause", json={"reason": reason})
    assert response.status_code == 200, response.text


def resume(http: httpx.Client, sender_id: str) -> None:
    response = http.post(f"{SENDERS}/{sender_id}/resume")
    assert response.status_code == 200, response.text


def open_feeds(
    server: ServerThread, stack: ExitStack, tokens: dict[str, str], since: int | None = None
) -> dict[str, ClientConnection]:
    """One socket per token, each registered with the feed before this returns (a live
    event written afterwards is handed to all of them)."""
    subscribers = feed_of(server).subscribers
    before = subscribers.count
    feeds = {
        name: stack.enter_context(open_feed(server, tok, since=since))
        for name, tok in tokens.items()
    }
    wait_for(lambda: subscribers.count == before + len(feeds), what="the feeds registered")
    return feeds


def last_event_id(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT COALESCE(max(id), 0) FROM outbox.events").fetchone()
    assert row is not None
    return int(row[0])


def shape_of_paused(event: dict[str, Any], sender_id: str, reason: str) -> None:
    assert list(event) == ["event", "data", "version"]
    assert event["event"] == "sender_paused" and event["version"] == "v1"
    data = event["data"]
    assert list(data)[:5] == ["sender", "reason", "code", "timestamp", "event_id"]
    assert WIRE_TIME.match(data["timestamp"]), data["timestamp"]
    assert WIRE_TIME.match(data["since"]), data["since"]
    assert isinstance(data["event_id"], int) and data["event_id"] > 0
    assert data == {
        "sender": sender_id,
        "reason": reason,
        "code": None,  # paused by hand: no provider code
        "timestamp": data["timestamp"],
        "event_id": data["event_id"],
        "since": data["since"],
        "until": None,
        "manual": True,
    }


def shape_of_resumed(event: dict[str, Any], sender_id: str, paused: dict[str, Any]) -> None:
    assert list(event) == ["event", "data", "version"]
    assert event["event"] == "sender_resumed" and event["version"] == "v1"
    data = event["data"]
    assert list(data)[:5] == ["sender", "reason", "code", "timestamp", "event_id"]
    assert WIRE_TIME.match(data["timestamp"]), data["timestamp"]
    assert data == {
        "sender": sender_id,
        "reason": None,
        "code": None,
        "timestamp": data["timestamp"],
        "event_id": data["event_id"],
        "paused_since": paused["data"]["since"],
    }
    assert data["event_id"] > paused["data"]["event_id"]


def test_pause_and_resume_reach_the_admins_and_the_senders_users_not_the_others(
    server: ServerThread, admin_http: httpx.Client, token: Token, sql_conn: psycopg.Connection
) -> None:
    put_sender(admin_http, server, "acme", ["alice"])
    with ExitStack() as stack:
        feeds = open_feeds(
            server,
            stack,
            {"admin": token("root", admin=True), "alice": token("alice"), "bob": token("bob")},
        )
        pause(admin_http, "acme")
        resume(admin_http, "acme")
        seen = {name: read_events(feeds[name], 2) for name in ("admin", "alice")}
        # Bob's own event, written after both: the first thing bob hears.
        (bobs,) = write_events(sql_conn, 1, user_id="bob")
        first_of_bob = next_event(feeds["bob"])
    for paused, resumed in seen.values():
        shape_of_paused(paused, "acme", "maintenance")
        shape_of_resumed(resumed, "acme", paused)
    assert seen["admin"] == seen["alice"]  # the same text for everyone
    assert first_of_bob["event"] == "message_sent"
    assert first_of_bob["data"]["message_id"] == bobs
    assert first_of_bob["data"]["event_id"] > seen["alice"][1]["data"]["event_id"]


def test_a_sender_for_everyone_reaches_every_feed(
    server: ServerThread, admin_http: httpx.Client, token: Token
) -> None:
    put_sender(admin_http, server, "shared", ["*"])
    with ExitStack() as stack:
        tokens = {"admin": token("root", admin=True), "alice": token("alice")}
        tokens |= {"bob": token("bob"), "bob-again": token("bob")}
        feeds = open_feeds(server, stack, tokens)
        pause(admin_http, "shared", "the account is under review")
        resume(admin_http, "shared")
        seen = {name: read_events(feed, 2) for name, feed in feeds.items()}
    for paused, resumed in seen.values():
        shape_of_paused(paused, "shared", "the account is under review")
        shape_of_resumed(resumed, "shared", paused)
    assert len({str(events) for events in seen.values()}) == 1


def test_since_replays_a_users_senders_events_among_its_own_in_id_order(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    # Pages of 2 (half a queue): the replay crosses pages of both kinds of event.
    server = serve(secret_key=KEY, ws_queue_size=4)
    headers = {"Authorization": f"Bearer {token('root', admin=True)}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        put_sender(http, server, "acme", ["alice"])
        write_events(sql_conn, 1, user_id="alice")
        write_events(sql_conn, 1, user_id="bob")
        since = last_event_id(sql_conn)
        pause(http, "acme")
        (alice_1,) = write_events(sql_conn, 1, user_id="alice")
        (bob_1,) = write_events(sql_conn, 1, user_id="bob")
        resume(http, "acme")
        alice_2, alice_3 = write_events(sql_conn, 2, user_id="alice")
    stored = sql_conn.execute(
        "SELECT id, event, COALESCE(message_id::text, sender) FROM outbox.events"
        " WHERE id > %s ORDER BY id",
        [since],
    ).fetchall()
    order = [(event, subject) for _, event, subject in stored]
    assert order == [
        ("sender_paused", "acme"),
        ("message_sent", alice_1),
        ("message_sent", bob_1),
        ("sender_resumed", "acme"),
        ("message_sent", alice_2),
        ("message_sent", alice_3),
    ]
    ids = [row[0] for row in stored]

    def subject(event: dict[str, Any]) -> tuple[int, str, str]:
        data = event["data"]
        return data["event_id"], event["event"], data.get("message_id") or data["sender"]

    with ExitStack() as stack:
        feeds = open_feeds(
            server,
            stack,
            {"admin": token("root", admin=True), "alice": token("alice"), "bob": token("bob")},
            since=since,
        )
        admin = [subject(e) for e in read_events(feeds["admin"], 6)]
        alice = [subject(e) for e in read_events(feeds["alice"], 5)]
        bob_replayed = next_event(feeds["bob"])
        # Then live: bob's next is his own new event, not a sender event held back.
        (bob_2,) = write_events(sql_conn, 1, user_id="bob")
        bob_live = next_event(feeds["bob"])
    assert admin == [(i, e, s) for i, (e, s) in zip(ids, order, strict=True)]
    assert alice == [admin[0], admin[1], admin[3], admin[4], admin[5]]
    assert [subject(bob_replayed), subject(bob_live)[1:]] == [
        admin[2],
        ("message_sent", bob_2),
    ]


def test_a_sender_the_directory_does_not_know_is_for_the_admins_only(
    server: ServerThread, admin_http: httpx.Client, token: Token, sql_conn: psycopg.Connection
) -> None:
    """A sender deleted since its event was written: only admins hear of it, live or on
    a replay; and a replay follows the senders' users as they are now."""
    put_sender(admin_http, server, "acme", ["*"])
    since = last_event_id(sql_conn)
    with ExitStack() as stack:
        feeds = open_feeds(
            server, stack, {"admin": token("root", admin=True), "alice": token("alice")}
        )
        sql_conn.execute(
            "SELECT outbox.write_sender_event('gone', 'sender_paused',"
            ' \'{"reason": "r", "code": "131031"}\')'
        )
        ghost = next_event(feeds["admin"])
        (alices,) = write_events(sql_conn, 1, user_id="alice")
        assert next_event(feeds["alice"])["data"]["message_id"] == alices
        assert next_event(feeds["admin"])["data"]["message_id"] == alices
    assert ghost["event"] == "sender_paused"
    assert ghost["data"] == {
        "sender": "gone",
        "reason": "r",
        "code": "131031",
        "timestamp": ghost["data"]["timestamp"],
        "event_id": ghost["data"]["event_id"],
    }
    pause(admin_http, "acme")
    # acme now for bob alone: alice's replay leaves its pause out, bob's has it.
    put_sender(admin_http, server, "acme", ["bob"])
    with ExitStack() as stack:
        feeds = open_feeds(
            server, stack, {"alice": token("alice"), "bob": token("bob")}, since=since
        )
        assert next_event(feeds["bob"])["event"] == "sender_paused"
        assert next_event(feeds["alice"])["data"]["message_id"] == alices
        (alice_next,) = write_events(sql_conn, 1, user_id="alice")
        assert next_event(feeds["alice"])["data"]["message_id"] == alice_next


def test_a_breakers_pause_of_default_reaches_every_feed_with_its_code(
    server: ServerThread, token: Token, sql_conn: psycopg.Connection
) -> None:
    """`default` (the environment's, for everyone) can be paused too: by its breaker,
    as a sender-level outcome writes it, with the provider's code and when it may be
    probed; and resumed."""
    with ExitStack() as stack:
        feeds = open_feeds(
            server, stack, {"admin": token("root", admin=True), "alice": token("alice")}
        )
        sql_conn.execute(
            "SELECT outbox.pause_sender('default', 'http 401: 190: token expired', '190',"
            " now() + interval '60 seconds', false)"
        )
        sql_conn.execute("SELECT outbox.resume_sender('default')")
        seen = {name: read_events(feed, 2) for name, feed in feeds.items()}
    for paused, resumed in seen.values():
        assert paused["event"] == "sender_paused"
        data = paused["data"]
        assert (data["sender"], data["reason"], data["code"], data["manual"]) == (
            "default",
            "http 401: 190: token expired",
            "190",
            False,
        )
        assert WIRE_TIME.match(data["until"]) and data["until"] > data["since"]
        shape_of_resumed(resumed, "default", paused)
    assert seen["admin"] == seen["alice"]
