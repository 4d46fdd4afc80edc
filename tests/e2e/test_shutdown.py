"""Stopping `outbox serve`, `dispatch` and `dev` as real processes: a port in use stops
them at once with one line; SIGTERM ends them with status 0 within
OUTBOX_SHUTDOWN_GRACE whatever they are doing (starting without a database, under
load, replaying a feed, with the database gone)."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from websockets.sync.client import connect

from tests.conftest import JWT_SECRET
from tests.dispatch.conftest import insert_messages, statuses
from tests.e2e.conftest import Process, clean_env, free_port
from tests.gateway.conftest import next_event, write_events
from tests.support import wait_for
from tests.tcp_proxy import TcpProxy

GRACE = 4.0  # OUTBOX_SHUTDOWN_GRACE of every process here
Start = type[Process]
Token = Callable[..., str]


def env_for(database_url: str, **overrides: str) -> dict[str, str]:
    return clean_env(
        **{
            "OUTBOX_DATABASE_URL": database_url,
            "OUTBOX_JWT_SECRET": JWT_SECRET,
            "OUTBOX_PORT": str(free_port()),
            "OUTBOX_LOG_FORMAT": "json",
            "OUTBOX_PROVIDER": "fake",
            "OUTBOX_METRICS_PORT": "0",
            "OUTBOX_SHUTDOWN_GRACE": f"{GRACE}s",
            **overrides,
        }
    )


def base_url(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['OUTBOX_PORT']}"


def running(process: Process) -> None:
    assert process.popen.poll() is None, "\n".join(process.stdout + process.stderr)


def answering(process: Process, url: str) -> Callable[[], bool]:
    def check() -> bool:
        running(process)
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def logged(process: Process, text: str) -> Callable[[], bool]:
    def check() -> bool:
        running(process)
        return any(text in line for line in process.stderr)

    return check


def terminate(*processes: Process) -> list[tuple[int | None, float]]:
    """SIGTERM to each at once; each one's exit status and seconds to exit (None: still
    running GRACE + 3 s later)."""
    started = time.monotonic()
    for process in processes:
        process.popen.send_signal(signal.SIGTERM)
    ended: dict[int, tuple[int | None, float]] = {}

    def all_ended() -> bool:
        for index, process in enumerate(processes):
            code = process.popen.poll()
            if index not in ended and code is not None:
                ended[index] = (code, time.monotonic() - started)
        return len(ended) == len(processes)

    with contextlib.suppress(AssertionError):
        wait_for(all_ended, timeout=GRACE + 3, interval=0.01)
    return [ended.get(index, (None, GRACE + 3)) for index in range(len(processes))]


def assert_stopped_within_grace(
    results: list[tuple[int | None, float]], *processes: Process
) -> None:
    for (code, seconds), process in zip(results, processes, strict=True):
        name = process.popen.args[-1]  # type: ignore[index]
        process.finish(timeout=10)  # the rest of its output
        log = "\n".join(process.stderr[-20:])
        assert code is not None, f"{name} still running {GRACE + 3}s after SIGTERM:\n{log}"
        assert code == 0, f"{name} exited {code}:\n{log}"
        assert seconds <= GRACE, f"{name} took {seconds:.2f}s to exit (grace {GRACE}s):\n{log}"
        forced = [line for line in process.stderr if "still running at the end" in line]
        assert forced == [], f"{name} had to be cancelled: {forced}"


# A port in use ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "dev"])
def test_a_port_in_use_stops_serve_and_dev_at_once_with_one_line(
    command: str,
    serve: tuple[Process, str],
    start: Start,
    database_url: str,
    tmp_path: Path,
) -> None:
    first, url = serve
    port = url.rsplit(":", 1)[1]
    env = env_for(database_url, OUTBOX_PORT=port, OUTBOX_DEV_DATA_DIR=str(tmp_path))
    started = time.monotonic()
    second = start([command], env)
    code = second.finish(timeout=30)
    took = time.monotonic() - started
    assert code == 1, "\n".join(second.stdout + second.stderr)
    # One line naming the address, and no banner: the port answered, but not for it.
    assert second.stderr == [f"outbox: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert second.stdout == []
    assert took < 10, f"{took:.1f}s"  # the interpreter's start; nothing of ours ran
    assert answering(first, f"{url}/healthz")(), "the first instance serves on"


# SIGTERM during start-up --------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "dispatch"])
def test_sigterm_while_the_database_cannot_be_reached(command: str, start: Start) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/outbox"
    process = start([command], env_for(nowhere))
    # Trying: the pool's first connection failed (the dispatcher waits for one to claim).
    wait_for(logged(process, "error connecting in 'outbox'"), timeout=30, what="a first try")
    assert_stopped_within_grace(terminate(process), process)


def test_sigterm_while_dev_waits_for_a_database_that_does_not_answer(
    start: Start, tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(30)
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/outbox"
        process = start(["dev"], env_for(url, OUTBOX_DEV_DATA_DIR=str(tmp_path)))
        connection, _ = silent.accept()  # dev is migrating: it waits for an answer
        with connection:
            assert_stopped_within_grace(terminate(process), process)


# SIGTERM under load ---------------------------------------------------------------


def test_sigterm_under_load_with_calls_longer_than_the_grace(
    start: Start, database_url: str, sql_conn: psycopg.Connection, token: Token
) -> None:
    serve_env = env_for(database_url)
    url = base_url(serve_env)
    server = start(["serve"], serve_env)
    # Each call takes longer than the grace: they are all cut short and handed back.
    dispatcher = start(
        ["dispatch"],
        env_for(
            database_url,
            OUTBOX_FAKE_LATENCY_MS=str(int(GRACE * 1000) + 2000),
            OUTBOX_PROVIDER_TIMEOUT="10s",
            OUTBOX_LEASE_SECONDS="30s",
        ),
    )
    wait_for(answering(server, f"{url}/readyz"), timeout=30, what="serve ready")
    wait_for(logged(dispatcher, '"ready"'), timeout=30, what="dispatcher ready")
    insert_messages(sql_conn, 1000)
    sql_conn.execute("NOTIFY outbox_new")

    stop = threading.Event()
    accepted: list[int] = []

    def send() -> None:
        headers = {"Authorization": f"Bearer {token('user-1')}"}
        body = {"to": "5511999999999", "type": "text", "text": "hi"}
        with httpx.Client(base_url=url, headers=headers, timeout=5) as client:
            for _ in range(5000):
                if stop.is_set():
                    return
                try:
                    if client.post("/api/v1/whatsapp/send/", json=body).status_code == 202:
                        accepted.append(1)
                except httpx.HTTPError:
                    pass  # stopping

    senders = [threading.Thread(target=send, daemon=True) for _ in range(4)]
    for sender in senders:
        sender.start()
    try:
        wait_for(
            lambda: statuses(sql_conn).get("in_flight", 0) >= 64 and len(accepted) >= 50,
            timeout=30,
            what="calls in flight and requests accepted",
        )
        results = terminate(server, dispatcher)
    finally:
        stop.set()
        for sender in senders:
            sender.join(timeout=10)
    assert_stopped_within_grace(results, server, dispatcher)
    # Every row the dispatcher held was handed back before it exited.
    assert "in_flight" not in statuses(sql_conn), statuses(sql_conn)


# SIGTERM while a WebSocket replay runs ------------------------------------------------


def test_sigterm_while_feeds_replay_many_events(
    start: Start, database_url: str, sql_conn: psycopg.Connection, token: Token
) -> None:
    write_events(sql_conn, 10_000)
    env = env_for(database_url, OUTBOX_WS_QUEUE_SIZE="100")
    server = start(["serve"], env)
    wait_for(answering(server, f"{base_url(env)}/readyz"), timeout=30, what="serve ready")
    feed = f"ws://127.0.0.1:{env['OUTBOX_PORT']}/ws/whatsapp/?since=0&token={token('user-1')}"
    # Clients that read a little and then stop reading: their replays wait on them.
    clients = [connect(feed, max_queue=1, open_timeout=10, close_timeout=1) for _ in range(3)]
    try:
        for client in clients:
            next_event(client)
        results = terminate(server)
    finally:
        for client in clients:
            client.close()
    assert_stopped_within_grace(results, server)


# SIGTERM while the database is away ---------------------------------------------------


@pytest.mark.parametrize("outage", ["reset", "silent"])
def test_sigterm_while_the_database_is_away(
    outage: str, start: Start, database_url: str, sql_conn: psycopg.Connection, tmp_path: Path
) -> None:
    """`reset`: the server went down (connections reset, new ones refused); `silent`: its
    host stopped answering (nothing refused, nothing answered: queries hang)."""
    target = conninfo_to_dict(database_url)
    host, port = str(target.get("host") or "127.0.0.1"), int(target.get("port") or 5432)
    with TcpProxy(port, host) as dev_link, TcpProxy(port, host) as dispatch_link:
        options = {"OUTBOX_FAKE_LATENCY_MS": "100", "OUTBOX_DEV_DATA_DIR": str(tmp_path)}
        dev = start(["dev"], env_for(dev_link.url(database_url), **options))
        dispatcher = start(["dispatch"], env_for(dispatch_link.url(database_url), **options))
        pairs = ((dev, dev_link), (dispatcher, dispatch_link))
        for process, _ in pairs:
            wait_for(logged(process, '"ready"'), timeout=30, what="dispatchers ready")
        insert_messages(sql_conn, 3000)
        sql_conn.execute("NOTIFY outbox_new")
        wait_for(lambda: statuses(sql_conn).get("sent", 0) >= 100, timeout=30, what="sending")
        for _, link in pairs:
            if outage == "reset":
                link.cut()
            else:
                link.stall()
        # Each waits on the database now: outcomes of calls that ended, claims.
        for process, link in pairs:
            if outage == "reset":
                waiting = logged(process, "could not record outcomes, retrying")
            else:
                waiting = lambda link=link: link.dropped > 0  # noqa: E731
            wait_for(waiting, timeout=30, what="a process waiting on the database")
        results = terminate(dev, dispatcher)
    assert_stopped_within_grace(results, dev, dispatcher)
    if outage == "reset":  # what they gave up on, and said so
        for process in (dev, dispatcher):
            assert any("shutdown grace over before every outcome" in x for x in process.stderr)
