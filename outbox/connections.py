"""uvicorn's HTTP protocol plus the two limits it lacks: a deadline for the request head and
a cap on the connections a process holds open.

An idle socket costs a client nothing and the server a file descriptor: without a deadline
a peer that sends nothing, or half a head, holds one for good, and once `ulimit -n` is
reached every accept and every new database or provider connection fails. At the cap a new
connection takes the place of the oldest one still waiting for its head (idle sockets cannot
lock clients out); when every connection is busy it gets our JSON 503 instead. Either way
the descriptors the process needs for itself stay free.
"""

from __future__ import annotations

import asyncio
import http
import resource
from typing import ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from outbox.errors import RETRY_AFTER_SECONDS
from outbox.log import get_logger
from outbox.settings import Settings

log = get_logger("outbox.connections")

# Descriptors left beside the connections: the LISTEN connection, the log stream, stdio,
# the event loop's own, the metrics port (the pools and provider calls are counted apart).
RESERVED_DESCRIPTORS = 100
# A refused connection lingers this long at most, reading what the client sends, so that
# closing it sends FIN after the 503 rather than a reset that could discard the answer.
# At most MAX_LINGERING at once, the oldest closed first: a flood beyond the cap must not
# take the descriptors kept in reserve, and a client that sends nothing loses no answer.
REFUSAL_LINGER = 1.0
MAX_LINGERING = RESERVED_DESCRIPTORS // 2
# One warning line per interval, however many connections are refused or evicted.
OVERFLOW_LOG_INTERVAL = 10.0

_REFUSAL_BODY = orjson.dumps(
    {"error": {"code": "unavailable", "message": "too many open connections; retry later"}}
)
_REFUSAL_HEAD = (
    f"HTTP/1.1 503 {http.HTTPStatus(503).phrase}\r\n"
    "content-type: application/json\r\n"
    f"content-length: {len(_REFUSAL_BODY)}\r\n"
    f"retry-after: {RETRY_AFTER_SECONDS}\r\n"
    "connection: close\r\n"
).encode()


def default_max_connections(settings: Settings, soft_limit: int | None = None) -> int | None:
    """The soft descriptor limit minus what the process opens besides its connections:
    two pools (`outbox dev` runs the dispatcher's beside the API's), the provider calls,
    RESERVED_DESCRIPTORS; at least half the limit. None when descriptors are unlimited."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return None
    reserved = 2 * settings.db_pool_size + settings.dispatch_concurrency + RESERVED_DESCRIPTORS
    return max(soft_limit - reserved, soft_limit // 2)


class _Overflow:
    """One server's state at its cap: the connections that could make room, the refused
    ones lingering, and counts for the log."""

    def __init__(self) -> None:
        # Connections waiting for a request head, oldest first: the first to make room.
        self.waiting: dict[GuardedHttpProtocol, None] = {}
        self.lingering: dict[asyncio.BaseTransport, None] = {}  # oldest first
        self.refused = 0
        self.evicted = 0
        self.next_log = 0.0

    def make_room(self, now: float, open_connections: int, cap: int | None) -> bool:
        """Close the oldest connection waiting for a head (none serving a response);
        False when every connection is busy: the new one is refused."""
        room = False
        for victim in self.waiting:
            cycle = victim.cycle
            if cycle is None or cycle.response_complete:
                del self.waiting[victim]
                victim.transport.close()
                room = True
                break
        if room:
            self.evicted += 1
        else:
            self.refused += 1
        if now >= self.next_log:
            log.warning(
                "connection cap reached",
                evicted=self.evicted,
                refused=self.refused,
                open=open_connections,
                max_connections=cap,
            )
            self.refused = self.evicted = 0
            self.next_log = now + OVERFLOW_LOG_INTERVAL
        return room

    def linger(self, transport: asyncio.BaseTransport) -> None:
        if len(self.lingering) >= MAX_LINGERING:
            oldest = next(iter(self.lingering))
            del self.lingering[oldest]
            oldest.close()
        self.lingering[transport] = None


class _Refusal(asyncio.Protocol):
    """A connection beyond the cap: the 503, then close once the client is done (or soon)."""

    def __init__(self, head: bytes, overflow: _Overflow, loop: asyncio.AbstractEventLoop) -> None:
        self.head = head
        self.overflow = overflow
        self.loop = loop
        self.transport: asyncio.BaseTransport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        transport.write(self.head + _REFUSAL_BODY)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.transport = transport
        self.overflow.linger(transport)
        self.timer = self.loop.call_later(REFUSAL_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not served; reading it keeps the close clean

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.overflow.lingering.pop(self.transport, None)


class GuardedHttpProtocol(HttpToolsProtocol):
    """httptools' protocol, with a head deadline and a connection cap (see http_protocol).

    The deadline runs from the connection's start for its first request, and from the
    first byte of each later one: between requests uvicorn's keep-alive timeout closes an
    idle connection. WebSocket connections count towards the cap (uvicorn tracks them in
    the same set): each holds a descriptor like any other.
    """

    header_timeout: ClassVar[float] = 10.0
    max_connections: ClassVar[int | None] = None
    overflow: ClassVar[_Overflow]

    # A request only sets and clears the deadline; the one timer of the connection looks at
    # it when it fires (a timer armed and cancelled per request: 2.4 µs; this: ~0.5 µs).
    _head_deadline: float | None = None
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        cap = self.max_connections
        at_cap = cap is not None and len(self.connections) >= cap
        if at_cap and not self.overflow.make_room(self.loop.time(), len(self.connections), cap):
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_deadline is None:  # a later request on a kept-alive connection
            self._await_head()

    def on_headers_complete(self) -> None:
        self._head_deadline = None
        self.overflow.waiting.pop(self, None)
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        self._stop_waiting()  # the WebSocket protocol takes over; let this one go now
        super().handle_websocket_upgrade()

    def _await_head(self) -> None:
        self._head_deadline = self.loop.time() + self.header_timeout
        self.overflow.waiting[self] = None
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._check_head)

    def _check_head(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return  # heads complete; the next request's first byte arms the timer again
        now = self.loop.time()
        if now < deadline:
            self._head_timer = self.loop.call_later(deadline - now, self._check_head)
        elif self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head waits behind our own slow response: not the client's fault.
            self._await_head()
        else:
            self.transport.close()

    def _stop_waiting(self) -> None:
        self.overflow.waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, transport: asyncio.Transport) -> None:
        head = [_REFUSAL_HEAD]
        for name, value in self.server_state.default_headers:  # date, server
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        refusal = _Refusal(b"".join(head), self.overflow, self.loop)
        transport.set_protocol(refusal)
        refusal.connection_made(transport)


def http_protocol(settings: Settings) -> type[GuardedHttpProtocol]:
    """The protocol class for one uvicorn server on `settings` (uvicorn.Config(http=…))."""
    cap = settings.max_connections or default_max_connections(settings)

    class Protocol(GuardedHttpProtocol):
        header_timeout = settings.http_header_timeout
        max_connections = cap
        overflow = _Overflow()

    return Protocol
