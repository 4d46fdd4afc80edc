"""The feed's limits: resumes of any length, the client frame size, sockets per
user, concurrent replays, no compression, and what a closed socket leaves behind."""

from __future__ import annotations

import base64
import gc
import os
import socket
import uuid
import weakref
from collections.abc import Callable
from contextlib import ExitStack

import psycopg
import pytest

from outbox.feed.protocol import FeedWebSocketProtocol
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
from tests.support import ServerThread, wait_for

Token = Callable[..., str]


def ids_of(events: list[dict[str, object]]) -> list[object]:
    return [event["data"]["event_id"] for event in events]  # type: ignore[index]


def test_a_resume_four_queues_long_arrives_whole_and_in_order_with_the_live_events(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve(ws_queue_size=10)  # pages of 5
    write_events(sql_conn, 40)  # four queues' worth after since=0
    write_events(sql_conn, 5, user_id="user-2")
    with open_feed(server, token("user-1"), since=0) as feed:
        got = [next_event(feed)]
        for _ in range(5):  # live events while the replay is under way (or just done)
            write_events(sql_conn, 3)
            got += read_events(feed, 3)
        got += read_events(feed, 55 - len(got))
        last = write_events(sql_conn, 1)
        assert next_event(feed)["data"]["message_id"] == last[0]
    # Every one of user-1's events, in id order, none twice.
    assert ids_of(got) == event_ids(sql_conn, "user-1")[:-1]


def test_live_events_beyond_what_a_replay_holds_back_are_read_from_the_table(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    # Pages of one event (a slow replay) and two live events held back at most: the
    # bursts below overflow that while the replay runs, and it reads the table again.
    server = serve(ws_queue_size=2)
    write_events(sql_conn, 200)
    with open_feed(server, token("user-1"), since=0) as feed:
        got = [next_event(feed)]
        for _ in range(10):
            write_events(sql_conn, 5)
        got += read_events(feed, 249)
    assert ids_of(got) == event_ids(sql_conn, "user-1")


def test_a_frame_beyond_ws_max_frame_closes_the_socket_with_1009(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve()  # OUTBOX_WS_MAX_FRAME: 4096 bytes
    with open_feed(server, token("user-1")) as feed:
        feed.send("x" * 4000)  # within the limit: read and ignored
        feed.ping().wait(10)
        mine = write_events(sql_conn, 1)
        assert next_event(feed)["data"]["message_id"] == mine[0]
        feed.send("x" * 5000)
        code, _ = close_of(feed, timeout=5)
    assert code == 1009


def test_the_21st_feed_of_one_user_is_closed_with_1008_while_other_users_connect(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve()  # OUTBOX_WS_MAX_PER_USER: 20
    subscribers = feed_of(server).subscribers
    with ExitStack() as stack:
        feeds = [stack.enter_context(open_feed(server, token("user-1"))) for _ in range(20)]
        with open_feed(server, token("user-1")) as extra:
            code, reason = close_of(extra, timeout=5)
        assert code == 1008 and "20" in reason, (code, reason)
        other = stack.enter_context(open_feed(server, token("user-2")))
        admin = stack.enter_context(open_feed(server, token("root", admin=True)))
        theirs = write_events(sql_conn, 1, user_id="user-2")
        assert next_event(other)["data"]["message_id"] == theirs[0]
        assert next_event(admin)["data"]["message_id"] == theirs[0]
        # A feed that closes makes room for another.
        feeds.pop().close()
        wait_for(lambda: subscribers.count == 21, what="the closed feed unregistered")
        again = stack.enter_context(open_feed(server, token("user-1")))
        mine = write_events(sql_conn, 1)
        assert next_event(again)["data"]["message_id"] == mine[0]
        assert next_event(feeds[0])["data"]["message_id"] == mine[0]


def write_large_events(conn: psycopg.Connection, count: int, user_id: str) -> None:
    """Failed messages whose 64 KB error goes into their event: `count` of them fill the
    socket buffers (up to 4 MB here) before a client that does not read stalls a send."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with conn.transaction():
        conn.execute(
            """INSERT INTO outbox.messages
                   (id, user_id, "to", type, payload, request_hash, max_attempts, status,
                    attempts, last_error, finished_at)
               SELECT id, %s, '5511999999999', 'text', '{"body": "hi"}', '\\x00', 4, 'error',
                      4, repeat('e', 65536), now()
               FROM unnest(%s::uuid[]) AS id""",
            [user_id, ids],
        )
        conn.execute("SELECT outbox.write_events(%s::uuid[])", [ids])


def unread_feed(server: ServerThread, query: str) -> socket.socket:
    """A feed whose client never reads a byte (a raw socket with a small receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws/whatsapp/?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key}\r\n\r\n".encode()
    )
    return sock


def test_replays_beyond_ws_max_replays_wait_their_turn_then_complete(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve(ws_max_replays=1)
    subscribers = feed_of(server).subscribers
    write_large_events(sql_conn, 250, "user-1")  # 16 MB: more than the socket buffers
    theirs = write_events(sql_conn, 30, user_id="user-2")

    def states() -> list[str]:
        return sorted(session.state for session in list(subscribers))

    stalled = unread_feed(server, f"token={token('user-1')}&since=0")
    try:
        # Its replay takes the only slot and stalls: the client reads nothing.
        wait_for(lambda: states() == ["replaying"], what="the stalled replay")
        with open_feed(server, token("user-2"), since=0) as waiting:
            wait_for(lambda: states() == ["replaying", "waiting"], what="a replay waiting")
            theirs += write_events(sql_conn, 5, user_id="user-2")  # live, while it waits
            with pytest.raises(TimeoutError):
                waiting.recv(timeout=0)  # nothing sent to it yet
            stalled.close()  # the slot is given back: the waiting replay runs
            got = read_events(waiting, 35)
            later = write_events(sql_conn, 1, user_id="user-2")
            assert next_event(waiting)["data"]["message_id"] == later[0]
    finally:
        stalled.close()
    assert [event["data"]["message_id"] for event in got] == theirs


def test_the_feed_does_not_negotiate_compression(serve: Serve, token: Token) -> None:
    server = serve()
    with open_feed(server, token("user-1")) as feed:  # the client offers permessage-deflate
        offered = feed.request.headers.get("Sec-WebSocket-Extensions") if feed.request else None
        assert offered and "permessage-deflate" in offered
        assert feed.response is not None
        assert "Sec-WebSocket-Extensions" not in feed.response.headers


def test_a_closed_feed_is_freed_at_once_without_the_cyclic_collector(
    serve: Serve, token: Token
) -> None:
    server = serve()
    subscribers = feed_of(server).subscribers
    gc.disable()  # only reference counting frees what the closed socket leaves
    try:
        with open_feed(server, token("user-1")):
            wait_for(lambda: subscribers.count == 1, what="the feed registered")
            (protocol,) = [
                p
                for p in server.server.server_state.connections
                if isinstance(p, FeedWebSocketProtocol)
            ]
            parser = weakref.ref(protocol.conn)
            del protocol
        wait_for(lambda: parser() is None, what="the closed socket's protocol freed")
    finally:
        gc.enable()


def test_the_heap_is_trimmed_once_most_clients_have_left(serve: Serve, token: Token) -> None:
    server = serve()
    subscribers = feed_of(server).subscribers
    subscribers.release_after, subscribers.release_delay = 4, 0.05  # instead of 1,000 and 2 s
    with ExitStack() as stack:
        feeds = [stack.enter_context(open_feed(server, token(f"user-{i}"))) for i in range(6)]
        for feed in feeds[:3]:
            feed.close()
        wait_for(lambda: subscribers.count == 3, what="three feeds gone")
        assert subscribers.heap_trims == 0  # three gone: fewer than release_after
        feeds[3].close()
        wait_for(lambda: subscribers.heap_trims == 1, what="the heap trimmed")
