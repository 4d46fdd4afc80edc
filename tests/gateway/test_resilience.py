"""Resume under load, slow clients, a lost LISTEN connection: no gap and no duplicate."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import psycopg
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from outbox.feed import APPLICATION_NAME
from tests.dispatch.conftest import DispatcherProcess, Reply, ScriptedProvider, insert_messages
from tests.gateway.conftest import (
    Serve,
    event_ids,
    feed_of,
    next_event,
    open_feed,
    write_events,
    ws_url,
)
from tests.scrape import scrape, value
from tests.support import ServerThread, wait_for

Token = Callable[..., str]
Provider = tuple[ScriptedProvider, str]
Start = Callable[..., DispatcherProcess]


def slow_provider(provider: Provider, delay: float = 0.01) -> None:
    scripted, _ = provider
    scripted.script = lambda call, n: Reply(body={"id": f"prov-{call.task_id}"}, delay=delay)


def read_until_final(
    feed: ClientConnection, pending: set[str], received: list[dict[str, Any]], limit: int
) -> None:
    """Read up to `limit` events, dropping messages from `pending` as their final event comes."""
    for _ in range(limit):
        if not pending:
            return
        event = next_event(feed, timeout=30)
        received.append(event)
        if event["event"] == "message_sent":
            pending.discard(event["data"]["message_id"])


def test_resume_with_since_after_disconnects_during_a_burst(
    serve: Serve,
    provider: Provider,
    start_dispatcher: Start,
    token: Token,
    sql_conn: psycopg.Connection,
) -> None:
    slow_provider(provider)
    server = serve()
    start_dispatcher(provider_timeout="5s", dispatch_concurrency="8")
    received: list[dict[str, Any]] = []
    with open_feed(server, token("user-1")) as feed:
        ids = insert_messages(sql_conn, 500)
        sql_conn.execute("NOTIFY outbox_new")
        pending = set(ids)
        read_until_final(feed, pending, received, 120)
    # Disconnect and resume three times while the dispatcher keeps delivering.
    for chunk in (90, 150, 10_000):
        assert pending, "the burst ended before the resume: nothing was tested"
        since = received[-1]["data"]["event_id"]
        with open_feed(server, token("user-1"), since=since) as feed:
            read_until_final(feed, pending, received, chunk)
    assert not pending
    got = [event["data"]["event_id"] for event in received]
    assert len(got) == len(set(got)), "a duplicate at a switch"
    assert got == event_ids(sql_conn, "user-1"), "a gap at a switch"


def _unread_client(server: ServerThread, token: str) -> ClientConnection:
    """A client that never reads: a tiny receive buffer, a one-frame client queue."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    return connect(ws_url(server, token=token), sock=sock, max_queue=1, open_timeout=10)


def test_a_client_that_does_not_read_is_cut_off_with_1013_and_the_others_get_everything(
    serve: Serve, token: Token, sql_conn: psycopg.Connection
) -> None:
    server = serve(ws_queue_size=20)
    written: list[str] = []
    with (
        _unread_client(server, token("user-1")) as stalled,
        open_feed(server, token("user-1")) as normal,
        open_feed(server, token("root", admin=True)) as admin,
    ):
        # Write until the stalled one is cut: its socket buffers hold tens of thousands of
        # events before its queue fills (the feed's count of subscribers tells when).
        subscribers = feed_of(server).subscribers
        for _ in range(200):
            batch = write_events(sql_conn, 500)
            written += batch
            for feed in (normal, admin):
                assert [next_event(feed)["data"]["message_id"] for _ in batch] == batch
            if subscribers.count == 2:
                break
        got = []
        try:
            while True:
                got.append(next_event(stalled, timeout=10)["data"]["message_id"])
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            code, reason = closed.rcvd.code, closed.rcvd.reason
        # The others were never held up and still receive.
        last = write_events(sql_conn, 1)
        assert next_event(normal)["data"]["message_id"] == last[0]
    assert code == 1013 and "since" in reason, (code, reason)
    # What it did get is a prefix, in order: it resumes from its last event_id.
    assert 0 < len(got) < len(written) and got == written[: len(got)]
    # Counted once as a dropped slow client on serve's /metrics.
    samples = scrape(f"{server.url}/metrics")
    assert value(samples, "outbox_websocket_slow_clients_dropped_total") == 1


def test_killing_the_listen_connection_mid_burst_loses_nothing(
    serve: Serve,
    provider: Provider,
    start_dispatcher: Start,
    token: Token,
    sql_conn: psycopg.Connection,
) -> None:
    slow_provider(provider)
    server = serve()
    start_dispatcher(provider_timeout="5s", dispatch_concurrency="8")

    def listener_pids() -> list[int]:
        rows = sql_conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND datname = current_database()",
            [APPLICATION_NAME],
        ).fetchall()
        return [row[0] for row in rows]

    [first] = wait_for(listener_pids, what="the feed's LISTEN connection")
    received: list[dict[str, Any]] = []
    with open_feed(server, token("user-1")) as feed:
        ids = insert_messages(sql_conn, 500)
        sql_conn.execute("NOTIFY outbox_new")
        pending = set(ids)
        read_until_final(feed, pending, received, 100)
        sql_conn.execute("SELECT pg_terminate_backend(%s)", [first])
        read_until_final(feed, pending, received, 50)
        assert pending, "the burst ended before the listener came back: nothing was tested"
        wait_for(lambda: listener_pids() not in ([], [first]), what="a new LISTEN connection")
        read_until_final(feed, pending, received, 10_000)
    got = [event["data"]["event_id"] for event in received]
    assert got == event_ids(sql_conn, "user-1")
