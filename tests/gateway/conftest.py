"""Fixtures for the live status feed: real uvicorn servers, the `websockets` client, and
events written the way the dispatcher writes them (`outbox.write_events`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlencode

import orjson
import psycopg
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from outbox.api import create_app
from outbox.feed import Feed
from outbox.process import websocket_options
from outbox.services import lifespan_services
from outbox.settings import Settings

# The dispatcher fixtures (a scripted provider, real `outbox dispatch` processes).
from tests.dispatch.conftest import dispatcher_env, provider, start_dispatcher  # noqa: F401
from tests.support import ServerThread

Serve = Callable[..., ServerThread]


@pytest.fixture
def serve(settings: Settings) -> Iterator[Serve]:
    """`serve(ws_queue_size=10, ws="websockets")`: a real uvicorn on altered settings, with
    `outbox serve`'s WebSocket options (frame limit, no compression, its protocol) unless
    `ws` names another implementation."""
    with ExitStack() as stack:

        def start(ws: str | None = None, **overrides: Any) -> ServerThread:
            changed = Settings(**{**settings.model_dump(), **overrides})
            options = websocket_options(changed)
            if ws is not None:
                options["ws"] = ws
            return stack.enter_context(ServerThread(create_app(changed), **options))

        yield start


def feed_of(server: ServerThread) -> Feed:
    """The feed of a running server (in its app's lifespan state)."""
    services = lifespan_services(server.server.lifespan.state)
    assert services is not None, "the app has not started"
    return services.feed


def ws_url(server: ServerThread, path: str = "/ws/whatsapp/", **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"ws://127.0.0.1:{server.port}{path}" + (f"?{query}" if query else "")


def open_feed(
    server: ServerThread,
    token: str | None,
    *,
    since: int | str | None = None,
    path: str = "/ws/whatsapp/",
    **options: Any,
) -> ClientConnection:
    # An unbounded client buffer: a test that reads later must not look like a slow client.
    options.setdefault("max_queue", None)
    return connect(ws_url(server, path, token=token, since=since), open_timeout=10, **options)


def next_event(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    message = ws.recv(timeout=timeout)
    assert isinstance(message, str), "events are text frames"
    event: dict[str, Any] = orjson.loads(message)
    return event


def read_events(ws: ClientConnection, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    return [next_event(ws, timeout) for _ in range(count)]


def close_of(ws: ClientConnection, timeout: float = 10.0) -> tuple[int, str]:
    """Read until the server closes; return its close code and reason."""
    try:
        while True:
            ws.recv(timeout=timeout)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, f"closed without a close frame: {closed!r}"
        return closed.rcvd.code, closed.rcvd.reason


def write_events(
    conn: psycopg.Connection, count: int, *, user_id: str = "user-1", status: str = "sent"
) -> list[str]:
    """Messages that reach `status`, with their events, in one transaction (as the
    completer does); returns their ids in event order."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with conn.transaction():
        conn.execute(
            """INSERT INTO outbox.messages
                   (id, user_id, "to", type, payload, request_hash, max_attempts, status,
                    attempts, provider_message_id, finished_at)
               SELECT id, %s, '5511999999999', 'text', '{"body": "hi"}', '\\x00', 4, %s, 1,
                      'prov-' || id, now()
               FROM unnest(%s::uuid[]) AS id""",
            [user_id, status, ids],
        )
        conn.execute("SELECT outbox.write_events(%s::uuid[])", [ids])
    return ids


def event_ids(conn: psycopg.Connection, user_id: str | None = None) -> list[int]:
    """Every event's id, or only those of `user_id`'s messages (sender events belong to no
    user: their user_id is NULL)."""
    rows = conn.execute(
        "SELECT id FROM outbox.events WHERE %(u)s::text IS NULL OR user_id = %(u)s ORDER BY id",
        {"u": user_id},
    ).fetchall()
    return [row[0] for row in rows]
