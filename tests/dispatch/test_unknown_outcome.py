"""Unknown outcomes through a real `outbox dispatch`: a provider that read the whole
request and then hung up, or said nothing until the client gave up, may have sent the
message; a closed port never saw it. By default an unknown outcome is retried (at least
once: the provider saw both calls); OUTBOX_UNKNOWN_OUTCOME=fail makes it final (at most
once). Both HTTP providers; the cloud one has no idempotency key."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
import pytest

from tests.dispatch.conftest import PROVIDER_SECRET, DispatcherProcess, insert_messages
from tests.support import wait_for

Start = Callable[..., DispatcherProcess]

CLOSE, SILENT, ANSWER = "close", "silent", "answer"


@dataclass
class SocketCall:
    task_id: str
    mode: str


class SocketProvider:
    """A provider at the socket level. Each call's request is read whole (headers and
    Content-Length body), then the next of `modes` says what it gets: CLOSE (the socket is
    closed without a word), SILENT (nothing, until the client gives up and closes), or,
    once `modes` is spent, ANSWER (200 with a message id, in the shape of the provider
    called)."""

    def __init__(self, modes: list[str]) -> None:
        self.modes = list(modes)
        self.calls: list[SocketCall] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        with conn:
            request = self._read_request(conn)
            if request is None:
                return
            data = orjson.loads(request)
            task_id = data.get("biz_opaque_callback_data") or data["task_id"]
            with self._lock:
                mode = self.modes.pop(0) if self.modes else ANSWER
                self.calls.append(SocketCall(task_id, mode))
            if mode == CLOSE:
                return  # `with conn` closes it: no status line, no byte
            if mode == SILENT:
                while not self._stop.is_set() and self._recv(conn) != b"":
                    pass  # until the client closes its end
                return
            cloud = "biz_opaque_callback_data" in data
            reply = (
                {"messaging_product": "whatsapp", "messages": [{"id": f"wamid.{task_id}"}]}
                if cloud
                else {"id": f"prov-{task_id}"}
            )
            body = orjson.dumps(reply)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body
            )

    def _recv(self, conn: socket.socket) -> bytes | None:
        """Some bytes, b"" at the end of the stream, None when none came for a while."""
        try:
            return conn.recv(65536)
        except TimeoutError:
            return None
        except OSError:
            return b""

    def _read_request(self, conn: socket.socket) -> bytes | None:
        """The request's body once all of it arrived; None if the client went first."""
        data = b""
        while b"\r\n\r\n" not in data:
            if self._stop.is_set():
                return None
            chunk = self._recv(conn)
            if chunk == b"":
                return None
            data += chunk or b""
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            if self._stop.is_set():
                return None
            chunk = self._recv(conn)
            if chunk == b"":
                return None
            body += chunk or b""
        return body

    def calls_for(self, task_id: str) -> list[str]:
        with self._lock:
            return [call.mode for call in self.calls if call.task_id == task_id]


@pytest.fixture
def socket_provider() -> Iterator[Callable[[list[str]], SocketProvider]]:
    made: list[SocketProvider] = []

    def make(modes: list[str]) -> SocketProvider:
        made.append(SocketProvider(modes))
        return made[-1]

    yield make
    for server in made:
        server.close()


def provider_settings(provider: str, url: str) -> dict[str, str]:
    """start_dispatcher's overrides that call `provider` at `url` (loopback: plain http)."""
    if provider == "cloud":
        return {
            "provider": "cloud",
            "cloud_base_url": url,
            "cloud_phone_number_id": "1234567890",
            "cloud_token": PROVIDER_SECRET,  # the log must never show it
        }
    return {"provider": "http", "provider_url": f"{url}/send"}


# Short enough that a silent provider costs the test half a second an attempt.
TIMEOUTS = {"provider_timeout": "500ms", "lease_seconds": "3s"}


def attempts_of(conn: psycopg.Connection, task_id: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        """SELECT attempt, outcome, error, started_at, finished_at
           FROM outbox.attempts WHERE message_id = %s ORDER BY id""",
        [task_id],
    ).fetchall()


def row_of(conn: psycopg.Connection, task_id: str) -> tuple[Any, ...]:
    row = conn.execute(
        """SELECT status, attempts, last_error, provider_message_id
           FROM outbox.messages WHERE id = %s""",
        [task_id],
    ).fetchone()
    assert row is not None
    return tuple(row)


def events_of(conn: psycopg.Connection, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    rows = conn.execute(
        "SELECT event, data FROM outbox.events WHERE message_id = %s ORDER BY id", [task_id]
    ).fetchall()
    return [(event, data) for event, data in rows]


def log_lines(process: DispatcherProcess, task_id: str) -> list[dict[str, Any]]:
    lines = [line for line in process.log().splitlines() if line.startswith("{")]
    return [entry for line in lines if (entry := orjson.loads(line)).get("message_id") == task_id]


def status_is(conn: psycopg.Connection, task_id: str, status: str) -> bool:
    return row_of(conn, task_id)[0] == status


@pytest.mark.parametrize(
    ("mode", "which"),
    [(CLOSE, "cloud"), (SILENT, "http"), (SILENT, "cloud")],
)
def test_an_unknown_outcome_is_retried_by_default(
    sql_conn: psycopg.Connection,
    start_dispatcher: Start,
    socket_provider: Callable[[list[str]], SocketProvider],
    mode: str,
    which: str,
) -> None:
    server = socket_provider([mode])
    process = start_dispatcher(
        **provider_settings(which, server.url), **TIMEOUTS, retry_base_delay="200ms"
    )
    [task_id] = insert_messages(sql_conn, 1)
    wait_for(lambda: status_is(sql_conn, task_id, "sent"), timeout=30, what="sent")

    # At least once: the provider saw the call twice, the first maybe sent already.
    assert server.calls_for(task_id) == [mode, ANSWER]
    first, second = attempts_of(sql_conn, task_id)
    assert (first[0], first[1], second[0], second[1]) == (1, "unknown", 2, "sent")
    what = "RemoteProtocolError" if mode == CLOSE else "0.5s"  # a timeout: httpx's or ours
    assert first[2].startswith(f"{which}: ") and what in first[2], first[2]
    assert (second[3] - first[4]).total_seconds() >= 0.19  # pending for the backoff
    status, attempts, _, provider_id = row_of(sql_conn, task_id)
    wamid = f"wamid.{task_id}" if which == "cloud" else f"prov-{task_id}"
    assert (status, attempts, provider_id) == ("sent", 2, wamid)

    # The client heard it retried (pending, with its next attempt's time), then queued.
    [(retrying, data), (sent, queued)] = events_of(sql_conn, task_id)
    assert (retrying, data["status"], data["error"]) == ("message_retrying", "retrying", first[2])
    assert data["next_attempt_at"] is not None
    assert (sent, queued["status"]) == ("message_sent", "queued")

    wait_for(lambda: len(log_lines(process, task_id)) >= 4, what="the attempts' log lines")
    failed = [line for line in log_lines(process, task_id) if line["event"] != "attempt started"]
    assert [(line["event"], line["outcome"]) for line in failed] == [
        ("attempt failed, will retry", "unknown"),
        ("sent", "sent"),
    ]


@pytest.mark.parametrize(("mode", "which"), [(CLOSE, "http"), (SILENT, "cloud")])
def test_with_fail_an_unknown_outcome_is_final_at_once(
    sql_conn: psycopg.Connection,
    start_dispatcher: Start,
    socket_provider: Callable[[list[str]], SocketProvider],
    mode: str,
    which: str,
) -> None:
    server = socket_provider([mode])
    process = start_dispatcher(
        **provider_settings(which, server.url), **TIMEOUTS, unknown_outcome="fail"
    )
    [task_id] = insert_messages(sql_conn, 1)
    wait_for(lambda: status_is(sql_conn, task_id, "error"), timeout=30, what="error")

    # At most once: one call, whatever it did; the message is final.
    assert server.calls_for(task_id) == [mode]
    status, attempts, last_error, provider_id = row_of(sql_conn, task_id)
    assert (status, attempts, provider_id) == ("error", 1, None)
    assert last_error.startswith(f"unknown outcome: {which}: "), last_error
    [(attempt, outcome, error, *_)] = attempts_of(sql_conn, task_id)
    assert (attempt, outcome, error) == (1, "unknown", last_error)
    [(event, data)] = events_of(sql_conn, task_id)
    assert (event, data["status"], data["error"]) == ("message_sent", "failed", last_error)

    [line] = wait_for(
        lambda: [line for line in log_lines(process, task_id) if line["level"] == "error"],
        what="the final log line",
    )
    assert (line["event"], line["outcome"]) == (
        "unknown outcome: not retried (OUTBOX_UNKNOWN_OUTCOME=fail)",
        "unknown",
    )


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        return int(listener.getsockname()[1])


@pytest.mark.parametrize("which", ["cloud", "http"])
def test_a_closed_port_is_not_sent_so_transient_even_with_fail(
    sql_conn: psycopg.Connection, start_dispatcher: Start, which: str
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    start_dispatcher(**provider_settings(which, url), **TIMEOUTS, unknown_outcome="fail")
    [task_id] = insert_messages(sql_conn, 1, max_attempts=2)
    wait_for(lambda: status_is(sql_conn, task_id, "error"), timeout=30, what="error")
    # Refused before the request was written: never sent, so retried while attempts
    # remain, and final as a transient failure, not an unknown outcome.
    history = attempts_of(sql_conn, task_id)
    assert [(a[0], a[1]) for a in history] == [(1, "transient"), (2, "transient")]
    _, attempts, last_error, _ = row_of(sql_conn, task_id)
    assert attempts == 2
    assert last_error.startswith(f"{which}: ConnectError"), last_error
