"""Connections of `serve`: a deadline for the request head, a cap on open connections.

Without them a socket that sent nothing, or half a head, stayed open for good, and
enough of them took every file descriptor of `serve`, so that every request failed.
"""

from __future__ import annotations

import asyncio
import json
import resource
import selectors
import socket
import time
from collections.abc import Callable

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.sync.client import connect as ws_connect

from outbox.connections import GuardedHttpProtocol, default_max_connections
from outbox.process import uvicorn_server
from outbox.settings import Settings
from tests.http.conftest import ServeProcess, ServeWith
from tests.support import wait_for

SEND = "/api/v1/whatsapp/send/"
MESSAGE = {"to": "5511999999999", "type": "text", "text": "hello"}
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"

Auth = Callable[..., dict[str, str]]


# Raw sockets ----------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole response (status, lower-case headers, body) read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before a whole response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before a whole body: {body!r}")
        body += chunk
    return int(status_line.split()[1]), headers, body


def seconds_until_closed(sock: socket.socket, *, limit: float) -> float:
    """Time until the server closes `sock` (what it sends meanwhile is dropped)."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        raise AssertionError(f"still open after {limit}s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


class IdleSockets:
    """`count` connections, every other one with half a head sent, none with a whole one;
    tracks which the server answered (a 503) and which it closed."""

    def __init__(self, port: int, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.open: set[socket.socket] = set()
        self.answered: set[socket.socket] = set()
        self.closed = 0
        for i in range(count):
            sock = connect(port)
            if i % 2:
                sock.sendall(HALF_HEAD)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.open.add(sock)

    def poll(self) -> int:
        """Read what arrived; the number of sockets the server neither answered nor closed."""
        for key, _ in self.selector.select(0):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if data:
                assert data.startswith(b"HTTP/1.1 503 "), data
                self.answered.add(sock)
            else:
                self.selector.unregister(sock)
                sock.close()
                self.open.discard(sock)
                self.closed += 1
        return len(self.open - self.answered)

    def close(self) -> None:
        for sock in self.open:
            self.selector.unregister(sock)
            sock.close()
        self.open.clear()
        self.selector.close()


def assert_refusal(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 503
    assert headers["retry-after"] == "5"
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "unavailable"


# The protocol uvicorn runs ---------------------------------------------------------------


def test_serve_pins_httptools_with_the_guards_whatever_uvicorn_would_pick() -> None:
    # uvicorn's "auto" falls back to h11 when httptools is missing: the guards would be gone.
    settings = Settings(http_header_timeout=3, max_connections=7)
    config = uvicorn_server(lambda *_: None, settings).config
    config.load()
    protocol = config.http_protocol_class
    assert issubclass(protocol, GuardedHttpProtocol)
    assert issubclass(protocol, HttpToolsProtocol)
    assert protocol.header_timeout == 3.0 and protocol.max_connections == 7
    assert uvicorn.Config(lambda *_: None, http="h11").http != config.http


def test_the_default_cap_leaves_room_below_the_descriptor_limit() -> None:
    settings = Settings()  # pool 10, dispatch concurrency 64: 2×10 + 64 + 100 kept apart
    assert default_max_connections(settings, 1024) == 1024 - 184
    assert default_max_connections(settings, 65536) == 65536 - 184
    assert default_max_connections(settings, 256) == 128  # never below half the limit
    assert default_max_connections(settings, resource.RLIM_INFINITY) is None


# The head's deadline --------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", HALF_HEAD], ids=["nothing", "half-head"])
def test_a_connection_without_a_whole_head_is_closed_at_the_deadline(
    serve_with: ServeWith, sent: bytes
) -> None:
    server = serve_with(http_header_timeout=0.5)
    with connect(server.port) as sock:
        sock.sendall(sent)
        elapsed = seconds_until_closed(sock, limit=5)
    assert 0.3 < elapsed < 5


def test_later_requests_on_a_kept_alive_connection_have_the_deadline_too(
    serve_with: ServeWith, auth: Auth
) -> None:
    server = serve_with(http_header_timeout=0.5)
    body = json.dumps(MESSAGE).encode()
    headers = "".join(f"{name}: {value}\r\n" for name, value in auth().items())
    post_head = (
        f"POST {SEND} HTTP/1.1\r\nHost: x\r\n{headers}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with connect(server.port) as sock:
        # Only the head has a deadline: a body slower than it is still read and answered
        # (the pause is the stimulus, twice the deadline).
        sock.sendall(post_head)
        time.sleep(1.0)
        sock.sendall(body)
        assert read_response(sock)[0] == 202
        # Whole heads on a connection that lives longer than the deadline: answered.
        for _ in range(3):
            sock.sendall(HEALTHZ)
            assert read_response(sock)[0] == 200
        # Half a head of a later request: closed well before the 5 s keep-alive timeout.
        sock.sendall(HALF_HEAD)
        elapsed = seconds_until_closed(sock, limit=4)
    assert 0.3 < elapsed < 4


async def _slow(request: Request) -> Response:
    await asyncio.sleep(1.0)
    return PlainTextResponse("slow")


def test_a_head_pipelined_behind_a_slow_response_waits_for_it(serve_with: ServeWith) -> None:
    # The next head's deadline passes while the server is still answering the first: the
    # answer arrives whole, and only then does the head's own deadline count.
    server = serve_with(Starlette(routes=[Route("/slow", _slow)]), http_header_timeout=0.3)
    with connect(server.port) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + HALF_HEAD)
        assert read_response(sock)[:3:2] == (200, b"slow")
        elapsed = seconds_until_closed(sock, limit=4)
    assert elapsed < 4


# The cap on open connections ------------------------------------------------------------


def test_at_the_cap_a_new_connection_takes_the_place_of_the_oldest_idle_one(
    serve_with: ServeWith,
) -> None:
    # Idle sockets at the cap must not lock clients out until their deadline.
    server = serve_with(max_connections=5)
    held = [connect(server.port) for _ in range(5)]
    try:
        held[1].sendall(HALF_HEAD)
        wait_for(lambda: server.open_connections == 5, what="5 connections open")
        with connect(server.port) as sixth:
            sixth.sendall(HEALTHZ)
            assert read_response(sixth)[0] == 200
        assert seconds_until_closed(held[0], limit=5) < 5  # the oldest made room
        with selectors.DefaultSelector() as selector:
            for sock in held[1:]:
                selector.register(sock, selectors.EVENT_READ)
            assert not selector.select(0)  # the others are untouched
    finally:
        for sock in held:
            sock.close()


def test_a_connection_beyond_a_cap_of_busy_ones_gets_a_json_503_and_service_resumes(
    serve_with: ServeWith, auth: Auth
) -> None:
    server = serve_with(max_connections=5)
    headers = "".join(f"{name}: {value}\r\n" for name, value in auth().items())
    # Five requests in progress: heads sent, bodies awaited.
    busy_head = (
        f"POST {SEND} HTTP/1.1\r\nHost: x\r\n{headers}"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    held = [connect(server.port) for _ in range(5)]
    try:
        for sock in held:
            sock.sendall(busy_head)
        wait_for(lambda: server.open_connections == 5, what="5 connections open")
        with connect(server.port) as sixth:
            sixth.sendall(HEALTHZ)
            assert_refusal(*read_response(sixth))
            seconds_until_closed(sixth, limit=5)
        held.pop().close()

        def healthy() -> bool:
            return httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200

        wait_for(healthy, what="a request answered once a connection closed")
    finally:
        for sock in held:
            sock.close()


def test_websockets_count_towards_the_cap(serve_with: ServeWith, token: Callable[..., str]) -> None:
    server = serve_with(max_connections=2)
    url = f"ws://127.0.0.1:{server.port}/ws/whatsapp/?token={token()}"
    with ws_connect(url, open_timeout=10), ws_connect(url, open_timeout=10):
        wait_for(lambda: server.open_connections == 2, what="2 feeds open")
        with connect(server.port) as third:
            third.sendall(HEALTHZ)
            assert_refusal(*read_response(third))
    wait_for(lambda: server.open_connections == 0, what="the feeds closed")
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


# Many idle sockets ----------------------------------------------------------------------


def normal_traffic(http: httpx.Client, auth: Auth) -> list[httpx.Response]:
    return [
        http.get("/healthz"),
        http.post(SEND, json=MESSAGE, headers=auth()),
    ]


def test_2000_idle_sockets_below_the_cap_neither_stop_requests_nor_stay(
    serve_with: ServeWith, auth: Auth
) -> None:
    # A deadline of 2 s: opening 2000 sockets takes ~0.5 s here, more on a busy machine.
    server = serve_with(http_header_timeout=2.0, max_connections=2500)
    started = time.monotonic()
    idle = IdleSockets(server.port, 2000)
    try:
        wait_for(lambda: server.open_connections >= 2000, what="2000 idle connections open")
        answers: list[httpx.Response] = []
        with httpx.Client(base_url=server.url, timeout=10) as http:
            while idle.poll() and time.monotonic() - started < 15:
                answers += normal_traffic(http, auth)
        assert not idle.open, f"{len(idle.open)} idle connections still open after 15 s"
    finally:
        idle.close()
    assert answers
    assert {response.status_code for response in answers} <= {200, 202}
    assert not idle.answered  # below the cap: nobody refused


def test_idle_sockets_beyond_the_descriptor_limit_leave_requests_answered(
    serve_process: Callable[..., ServeProcess], auth: Auth
) -> None:
    # 2000 idle sockets against `serve` limited to 1024 descriptors (its cap derived: 840).
    # Before: ~1000 held for good, the rest and some new connections reset.
    serve = serve_process(nofile=1024, OUTBOX_HTTP_HEADER_TIMEOUT="1s")
    started = time.monotonic()
    idle = IdleSockets(serve.port, 2000)
    answers: list[httpx.Response] = []
    failures: list[Exception] = []
    try:
        wait_for(lambda: idle.poll() <= 1100, what="the connections beyond the cap closed")
        # One connection per request: each new connection is what the limit used to stop.
        fresh = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=serve.url, timeout=5, limits=fresh) as http:
            while idle.poll() and time.monotonic() - started < 20:
                try:
                    answers += normal_traffic(http, auth)
                except httpx.TransportError as exc:
                    failures.append(exc)
            still_open = len(idle.open)
            after = normal_traffic(http, auth)
            ready = http.get("/readyz")
    finally:
        idle.close()
    assert not failures, f"{len(failures)} requests failed: {failures[:3]}"
    assert not still_open, f"{still_open} idle connections still open after 20 s"
    assert answers
    # Each new connection took the place of an idle one: none was refused.
    assert {response.status_code for response in answers + after} <= {200, 202}
    assert ready.status_code == 200
