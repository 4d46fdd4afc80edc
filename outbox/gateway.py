"""The live status feed: one LISTEN per process, events read once, fanned out per user.

`Gateway` follows `outbox.events` (woken by `NOTIFY outbox_events`, whose payload is the
highest new id) and hands each event, serialised once, to the bounded queue of every
client allowed to see it. Each WebSocket has its own sender task, so a slow client
never delays the others: when its queue is full it is closed with 1013 and resumes
with `?since=<event_id>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.websockets import WebSocket, WebSocketState

from outbox import notifier
from outbox.auth import AuthError, Principal, TokenVerifier, bearer_token
from outbox.log import get_logger
from outbox.metrics import ApiMetrics
from outbox.settings import Settings
from outbox.store import EventRow, Store

log = get_logger("outbox.gateway")

CHANNEL = "outbox_events"
APPLICATION_NAME = "outbox-gateway"  # names the LISTEN connection in pg_stat_activity
WIRE_VERSION = "v1"
# The order of `data` on the wire: the v1 fields first, the additive ones after.
DATA_ORDER = (
    "message_id",
    "status",
    "to",
    "timestamp",
    "error",
    "event_id",
    "client_message_id",
    "provider_message_id",
    "attempt",
    "next_attempt_at",
)
MAX_PAGE = 500
RETRY_MIN = 0.1
RETRY_MAX = 10.0
SHUTDOWN_WAIT = 5.0
MAX_EVENT_ID = 2**63 - 1

# Close codes (RFC 6455 and the 4000–4999 private range).
GOING_AWAY = 1001
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
BAD_REQUEST = 4400
UNAUTHORIZED = 4401
GONE = 4410


def wire_message(event_id: int, event: str, data: dict[str, Any]) -> str:
    """The v1 wire message of one event (computed once per event, not per client)."""
    full = {**data, "event_id": event_id}
    ordered = {key: full.pop(key) for key in DATA_ORDER if key in full}
    ordered.update(full)
    return orjson.dumps({"event": event, "data": ordered, "version": WIRE_VERSION}).decode()


# What Client.offer did with an event (counted per page for the metrics).
SKIPPED, QUEUED, DROPPED = 0, 1, 2


@dataclass(eq=False)
class Client:
    """One connected socket: whose events it gets, and its bounded queue."""

    principal: Principal
    queue: asyncio.Queue[str]
    last_id: int  # highest event id handed to the queue: anything at or below is skipped
    buffer: deque[tuple[int, str]] | None = None  # live events held back while replaying
    closed: asyncio.Future[tuple[int, str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def offer(self, event_id: int, text: str) -> int:
        """Hand over a live event without ever waiting (fan-out must not block).
        Returns QUEUED, SKIPPED or DROPPED (this event cut the client off: too slow)."""
        if event_id <= self.last_id or self.closed.done():
            return SKIPPED
        if self.buffer is not None:
            if len(self.buffer) >= self.queue.maxsize:
                self.cut(TRY_AGAIN_LATER, "too slow: reconnect with ?since=<last event_id>")
                return DROPPED
            self.buffer.append((event_id, text))
            return QUEUED
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.cut(TRY_AGAIN_LATER, "too slow: reconnect with ?since=<last event_id>")
            return DROPPED
        self.last_id = event_id
        return QUEUED

    def cut(self, code: int, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result((code, reason))


class Gateway:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        verifier: TokenVerifier,
        metrics: ApiMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or ApiMetrics()
        self.store = store
        self.verifier = verifier
        self.queue_size = settings.ws_queue_size
        # A page never exceeds half a queue, so a client that keeps up never overflows
        # on one page's fan-out (senders run between pages, while the next one is read).
        self.page_size = max(1, min(MAX_PAGE, self.queue_size // 2))
        self.last_seen: int | None = None  # None until the first read of the table
        self._by_user: dict[str, set[Client]] = {}
        self._admins: set[Client] = set()
        self._wake = asyncio.Event()
        self._reading = False  # a read of the table is running: notifications wake it
        self._positioned = asyncio.Event()  # set once last_seen is known
        self.listening = False  # the LISTEN connection is up (it has been, at least once)
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._stopping = False

    # Lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        conninfo = make_conninfo(
            self.settings.listen_database_url, application_name=APPLICATION_NAME
        )
        self._tasks = [
            asyncio.create_task(
                notifier.listen(conninfo, CHANNEL, self._on_notify, on_connect=self._on_listening),
                name="gateway-listen",
            ),
            asyncio.create_task(self._follow(), name="gateway-follow"),
        ]
        self._wake.set()  # find the starting position now, not at the first notification

    async def going_away(self) -> None:
        """Close every socket with 1001 and give the handlers a moment to send it."""
        self._stopping = True
        for client in self._clients():
            client.cut(GOING_AWAY, "server shutting down")
        handlers = [task for task in self._handlers if not task.done()]
        if handlers:
            await asyncio.wait(handlers, timeout=SHUTDOWN_WAIT)

    async def stop(self) -> None:
        await self.going_away()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # Following the table ---------------------------------------------------------------

    def _on_listening(self) -> None:
        # Connected (again): what was committed while away had no notification, so look.
        self.listening = True
        self._wake.set()

    def _on_notify(self, payload: str) -> None:
        # The payload is the highest new id, and every id up to it is committed (event ids
        # become visible in id order): nothing to do when it has been read already.
        if self.last_seen is not None and payload.isdigit():
            newest = int(payload)
            if newest <= self.last_seen:
                return
            if not self._reading and not self.client_count:
                # Nobody to hand them to: a client that connects from now on starts
                # after them (a resuming one replays from the table), so skip the read.
                self.last_seen = newest
                return
        self._wake.set()

    async def _follow(self) -> None:
        delay = RETRY_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._catch_up()
            except Exception as exc:  # the one reader must outlive any failure: retry
                log.warning("reading events failed", error=str(exc).strip(), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                self._wake.set()
            else:
                delay = RETRY_MIN

    async def _catch_up(self) -> None:
        self._reading = True
        try:
            await self._read_new_events()
        finally:
            self._reading = False

    async def _read_new_events(self) -> None:
        if self.last_seen is None:
            # First contact: live clients start from here (resuming ones replay).
            self.last_seen = await self.store.max_event_id() or 0
            self._positioned.set()
        while True:
            rows = await self.store.events_after(self.last_seen, self.page_size)
            tally = [0, 0, 0]  # by offer result: counted once per page, not per event
            for row in rows:
                self._fan_out(row, tally)
            if rows:
                self.last_seen = rows[-1].id
            if tally[QUEUED]:
                self.metrics.events_fanned_out.inc(tally[QUEUED])
            if tally[DROPPED]:
                self.metrics.slow_clients_dropped.inc(tally[DROPPED])
            if len(rows) < self.page_size:
                return

    def _fan_out(self, row: EventRow, tally: list[int]) -> None:
        users = self._by_user.get(row.user_id)
        if not users and not self._admins:
            return
        text = wire_message(row.id, row.event, row.data)
        for client in users or ():
            tally[client.offer(row.id, text)] += 1
        for client in self._admins:
            tally[client.offer(row.id, text)] += 1

    # Clients ---------------------------------------------------------------------------

    def _clients(self) -> Iterable[Client]:
        yield from self._admins
        for users in self._by_user.values():
            yield from users

    @property
    def client_count(self) -> int:
        return len(self._admins) + sum(len(users) for users in self._by_user.values())

    def _register(self, client: Client) -> None:
        if client.principal.is_admin:
            self._admins.add(client)
        else:
            self._by_user.setdefault(client.principal.user_id, set()).add(client)

    def _unregister(self, client: Client) -> None:
        self._admins.discard(client)
        users = self._by_user.get(client.principal.user_id)
        if users is not None:
            users.discard(client)
            if not users:
                del self._by_user[client.principal.user_id]

    def authenticate(self, websocket: WebSocket) -> Principal:
        token = websocket.query_params.get("token")
        if not token:
            token = bearer_token(websocket.headers.get("authorization"))
        return self.verifier.authenticate(token)

    async def handle(self, websocket: WebSocket) -> None:
        """One socket, from the handshake to its close."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(websocket)
        finally:
            self._handlers.discard(task)

    async def _handle(self, websocket: WebSocket) -> None:
        # Accept first, then close: browsers see the close code and reason, not a bare 403.
        await websocket.accept()
        if self._stopping:
            await close(websocket, GOING_AWAY, "server shutting down")
            return
        try:
            principal = self.authenticate(websocket)
        except AuthError as exc:
            await close(websocket, UNAUTHORIZED, str(exc))
            return
        try:
            since = parse_since(websocket.query_params.get("since"))
        except ValueError as exc:
            await close(websocket, BAD_REQUEST, str(exc))
            return
        # A client is registered only once the reader has a position: before that, events
        # committed meanwhile could fall between the replay and the live stream.
        try:
            await asyncio.wait_for(self._positioned.wait(), self.settings.db_pool_timeout)
        except TimeoutError:
            await close(websocket, TRY_AGAIN_LATER, "database unavailable: try again later")
            return
        client = Client(
            principal=principal,
            queue=asyncio.Queue(self.queue_size),
            last_id=since if since is not None else (self.last_seen or 0),
            # Registered (buffering) before the replay reads the table: no gap at the switch.
            buffer=deque() if since is not None else None,
        )
        self._register(client)
        self.metrics.websocket_clients.inc()
        expiry = None
        if principal.expires_at is not None:
            delay = principal.expires_at + self.settings.jwt_leeway - time.time()
            expiry = asyncio.get_running_loop().call_later(
                max(0.0, delay), client.cut, UNAUTHORIZED, "token expired"
            )
        sender = asyncio.create_task(self._send(websocket, client, since))
        receiver = asyncio.create_task(_drain(websocket))
        try:
            waiting: set[asyncio.Future[Any]] = {sender, receiver, client.closed}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._unregister(client)
            self.metrics.websocket_clients.dec()
            if expiry is not None:
                expiry.cancel()
            for task in (sender, receiver):
                task.cancel()
            for task in (sender, receiver):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if client.closed.done():
            code, reason = client.closed.result()
            await close(websocket, code, reason)
        elif not receiver.done() and sender.done() and not sender.cancelled():
            error = sender.exception()
            if error is not None:
                log.error("websocket sender failed", error=repr(error))
                await close(websocket, INTERNAL_ERROR, "internal error")

    async def _send(self, websocket: WebSocket, client: Client, since: int | None) -> None:
        if since is not None:
            try:
                await self._replay(client, since)
            except (psycopg.Error, PoolTimeout) as exc:
                log.warning("replay failed", error=str(exc).strip())
                client.cut(TRY_AGAIN_LATER, "database unavailable: retry with ?since=")
                return
            if client.closed.done():
                return
        while True:
            await websocket.send_text(await client.queue.get())

    async def _replay(self, client: Client, since: int) -> None:
        """Stored events after `since`, then the buffered live ones past the last replayed."""
        oldest = await self.store.oldest_event_id()
        if oldest is not None and since < oldest - 1:
            client.cut(GONE, f"events after {since} were purged: oldest kept is {oldest}")
            return
        user_id = None if client.principal.is_admin else client.principal.user_id
        while not client.closed.done():
            rows = await self.store.events_after(client.last_id, self.page_size, user_id)
            for row in rows:
                # Waiting here is fine: this is the client's own task and its own pace.
                await client.queue.put(wire_message(row.id, row.event, row.data))
                client.last_id = row.id
            if len(rows) < self.page_size:
                break
        # Still buffering while the held-back events go in (at the client's pace); the
        # switch to live is one synchronous step once the buffer is empty.
        while client.buffer and not client.closed.done():
            event_id, text = client.buffer.popleft()
            if event_id > client.last_id:
                await client.queue.put(text)
                client.last_id = event_id
        client.buffer = None


def parse_since(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_EVENT_ID:
        raise ValueError("since must be an event id (a non-negative integer)")
    return int(raw)


async def _drain(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, until it disconnects."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


def _clip(reason: str) -> str:
    # A close frame's reason is at most 123 bytes of UTF-8.
    return reason.encode()[:123].decode(errors="ignore")


async def close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state == WebSocketState.DISCONNECTED:
        return
    # The peer may be gone already; there is no one left to tell.
    with contextlib.suppress(Exception):
        await websocket.close(code, _clip(reason))


async def websocket_endpoint(websocket: WebSocket) -> None:
    gateway: Gateway = websocket.app.state.gateway
    await gateway.handle(websocket)


async def going_away(app: Any) -> None:
    """Before the server closes connections (with 1012): close the feed's with 1001."""
    state = getattr(app, "state", None)
    gateway = getattr(state, "gateway", None) if isinstance(app, Starlette) else None
    if isinstance(gateway, Gateway):
        await gateway.going_away()
