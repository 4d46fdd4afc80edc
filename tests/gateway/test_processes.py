"""Two real `outbox serve` processes: each has its own LISTEN and delivers every event;
SIGTERM closes the feed with 1001."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest

from tests.conftest import JWT_SECRET
from tests.dispatch.conftest import DispatcherProcess, insert_messages, wait_all
from tests.e2e.conftest import Process, clean_env, free_port
from tests.gateway.conftest import close_of, event_ids, next_event, write_events
from tests.support import wait_for

Token = Callable[..., str]
Start = Callable[..., DispatcherProcess]


class Served:
    def __init__(self, process: Process, port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
def start_serve(database_url: str) -> Iterator[Callable[[], Served]]:
    started: list[Process] = []

    def start() -> Served:
        port = free_port()
        env = clean_env(
            OUTBOX_DATABASE_URL=database_url,
            OUTBOX_JWT_SECRET=JWT_SECRET,
            OUTBOX_PORT=str(port),
            OUTBOX_LOG_FORMAT="json",
        )
        process = Process(["serve"], env)
        started.append(process)

        def ready() -> bool:
            assert process.popen.poll() is None, "\n".join(process.stdout + process.stderr)
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=30, what="outbox serve ready")
        return Served(process, port)

    yield start
    for process in started:
        process.kill()


def test_two_serve_processes_both_deliver_every_event_and_sigterm_closes_with_1001(
    start_serve: Callable[[], Served],
    start_dispatcher: Start,
    token: Token,
    sql_conn: psycopg.Connection,
) -> None:
    from websockets.sync.client import connect

    servers = [start_serve(), start_serve()]
    start_dispatcher(provider_timeout="5s")
    feeds = [
        connect(f"ws://127.0.0.1:{s.port}/ws/whatsapp/?token={token('user-1')}", max_queue=None)
        for s in servers
    ]
    try:
        insert_messages(sql_conn, 200)
        sql_conn.execute("NOTIFY outbox_new")
        wait_all(sql_conn, "sent", 200)
        expected = event_ids(sql_conn, "user-1")
        for feed in feeds:
            assert [next_event(feed)["data"]["event_id"] for _ in expected] == expected
        servers[1].process.popen.send_signal(signal.SIGTERM)
        assert close_of(feeds[1]) == (1001, "server shutting down")
        assert servers[1].process.finish(timeout=30) == 0
        # The other one carries on.
        [task_id] = write_events(sql_conn, 1)
        assert next_event(feeds[0])["data"]["message_id"] == task_id
    finally:
        for feed in feeds:
            feed.close()
