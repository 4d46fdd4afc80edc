"""The live status feed: one LISTEN per process, events read once, fanned out per user.

`Gateway` follows `outbox.events` (woken by `NOTIFY outbox_events`, whose payload is the
highest new id) and hands each event, serialised once, to every client allowed to see
it. A client that is sent something gets a sender task until its backlog is out, so a
slow client never delays the others: when its backlog reaches OUTBOX_WS_QUEUE_SIZE it is
closed with 1013 and resumes with `?since=<event_id>`. A resume replays the table in
pages, each sent before the next is read, at most OUTBOX_WS_MAX_REPLAYS at once.

An idle socket costs what is needed to notice its end and nothing more (thousands are
normal): no task, queue or parsed handshake of ours, only the ASGI handler awaiting
`receive()` and a small `Client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette

from outbox import memory, notifier
from outbox.auth import AuthError, Principal, TokenVerifier, bearer_token
from outbox.cancellation import cancel_and_wait
from outbox.log import get_logger
from outbox.metrics import ApiMetrics
from outbox.settings import Settings
from outbox.store import EventRow, Store

log = get_logger("outbox.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

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
# Once this many clients have left since the peak, and at most half remain, the freed heap
# goes back to the system (outbox/memory.py), a moment later: a wave leaves together.
RELEASE_AFTER = 1000
RELEASE_DELAY = 2.0

# Close codes (RFC 6455 and the 4000–4999 private range).
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
BAD_REQUEST = 4400
UNAUTHORIZED = 4401
GONE = 4410

TOO_SLOW = "too slow: reconnect with ?since=<last event_id>"


def wire_message(event_id: int, event: str, data: dict[str, Any]) -> str:
    """The v1 wire message of one event (computed once per event, not per client)."""
    full = {**data, "event_id": event_id}
    ordered = {key: full.pop(key) for key in DATA_ORDER if key in full}
    ordered.update(full)
    return orjson.dumps({"event": event, "data": ordered, "version": WIRE_VERSION}).decode()


# What Gateway.offer did with an event (counted per page for the metrics).
SKIPPED, QUEUED, DROPPED = 0, 1, 2

# Where a client stands. A resuming client WAITs for a replay slot (live events skipped:
# the replay reads them from the table), REPLAYs (live events held back in `held`), or
# LAGs (more live events came during the replay than `held` may keep: dropped, the
# replay reads the table again); then it is LIVE.
WAITING, REPLAYING, LAGGING, LIVE = "waiting", "replaying", "lagging", "live"


@dataclass(eq=False, slots=True)
class Client:
    """One connected socket: whose events it gets, and what is on its way to it."""

    principal: Principal
    send: Send
    last_id: int  # highest event id handed over: anything at or below is skipped
    state: str = LIVE
    backlog: deque[str] | None = None  # live events not sent yet (None while there are none)
    held: deque[tuple[int, str]] | None = None  # live events held back while replaying
    task: asyncio.Task[None] | None = None  # the replay, or the sender of the backlog
    closing: bool = False  # a close is on its way: nothing more is handed over
    expiry: asyncio.TimerHandle | None = None


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
        self._per_user: dict[str, int] = {}  # sockets per JWT sub, admins included
        self.client_count = 0
        self.peak_clients = 0  # since the heap was last trimmed
        self.release_after, self.release_delay = RELEASE_AFTER, RELEASE_DELAY
        self.heap_trims = 0
        self._trim_timer: asyncio.TimerHandle | None = None
        self._replay_slots = asyncio.Semaphore(settings.ws_max_replays)
        self._wake = asyncio.Event()
        self._reading = False  # a read of the table is running: notifications wake it
        self._positioned = asyncio.Event()  # set once last_seen is known
        self.listening = False  # the LISTEN connection is up (it has been, at least once)
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closers: set[asyncio.Task[None]] = set()
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
        for client in list(self._clients()):
            self.cut(client, GOING_AWAY, "server shutting down")
        handlers = [task for task in self._handlers if not task.done()]
        if handlers:
            await asyncio.wait(handlers, timeout=SHUTDOWN_WAIT)

    async def stop(self) -> None:
        await self.going_away()
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        # Cancelled until they end (outbox/cancellation.py): a cancellation swallowed
        # once left the follower waiting for its next wake-up and this stop forever.
        await cancel_and_wait(self._tasks)

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
            self.last_seen = await self.store.events.max_id() or 0
            self._positioned.set()
        while True:
            rows = await self.store.events.after(self.last_seen, self.page_size)
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
        for client in tuple(users or ()):  # an offer may cut a client (and unregister it)
            tally[self.offer(client, row.id, text)] += 1
        for client in tuple(self._admins):
            tally[self.offer(client, row.id, text)] += 1

    # Handing events over ---------------------------------------------------------------

    def offer(self, client: Client, event_id: int, text: str) -> int:
        """Hand over a live event without ever waiting (fan-out must not block).
        Returns QUEUED, SKIPPED or DROPPED (this event cut the client off: too slow)."""
        if event_id <= client.last_id or client.closing:
            return SKIPPED
        if client.state != LIVE:
            if client.state == REPLAYING:
                assert client.held is not None
                if len(client.held) < self.queue_size:
                    client.held.append((event_id, text))
                    return QUEUED
                # Too many to hold: they are in the table, which the replay reads again.
                client.held, client.state = None, LAGGING
            return SKIPPED
        backlog = client.backlog
        if backlog is None:
            backlog = client.backlog = deque()
        elif len(backlog) >= self.queue_size:
            self.cut(client, TRY_AGAIN_LATER, TOO_SLOW)
            return DROPPED
        backlog.append(text)
        client.last_id = event_id
        if client.task is None:
            client.task = asyncio.create_task(self._send_backlog(client))
        return QUEUED

    async def _send_backlog(self, client: Client) -> None:
        backlog = client.backlog
        try:
            while backlog:
                await client.send({"type": "websocket.send", "text": backlog.popleft()})
        except OSError:  # the client is gone: its handler hears the disconnect
            client.closing = True  # nothing more for it meanwhile
            return
        except Exception as exc:
            log.error("websocket sender failed", error=repr(exc))
            client.task = None
            self.cut(client, INTERNAL_ERROR, "internal error")
            return
        # Sent: the next event starts a new sender (an idle client holds no task).
        client.task = client.backlog = None

    async def _replay(self, client: Client, since: int) -> None:
        """Stored events after `since` page by page, then the held-back live ones, then live.
        Each page is sent (at the client's pace) before the next is read: any number of
        events can follow `since`, the process holds one page per replaying client."""
        try:
            async with self._replay_slots:
                # From here on live events are held back (before, they are in the table).
                client.state, client.held = REPLAYING, deque()
                oldest = await self.store.events.oldest_id()
                if oldest is not None and since < oldest - 1:
                    self.cut(client, GONE, f"events after {since} were purged: oldest is {oldest}")
                    return
                user_id = None if client.principal.is_admin else client.principal.user_id
                while not client.closing:
                    await self._send_stored(client, user_id)
                    held = client.held
                    while held and client.state == REPLAYING and not client.closing:
                        event_id, text = held.popleft()
                        if event_id > client.last_id:
                            await client.send({"type": "websocket.send", "text": text})
                            client.last_id = event_id
                    if client.state == REPLAYING:
                        # Caught up, in one synchronous step: the next event goes live.
                        client.state, client.held, client.task = LIVE, None, None
                        return
                    # It lagged: read the table again, holding back what comes from now on.
                    client.state, client.held = REPLAYING, deque()
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("replay failed", error=str(exc).strip())
            self.cut(client, TRY_AGAIN_LATER, "database unavailable: retry with ?since=")
        except OSError:  # the client is gone: its handler hears the disconnect
            client.closing = True
        except Exception as exc:
            log.error("websocket replay failed", error=repr(exc))
            client.task = None
            self.cut(client, INTERNAL_ERROR, "internal error")

    async def _send_stored(self, client: Client, user_id: str | None) -> None:
        while not client.closing:
            rows = await self.store.events.after(client.last_id, self.page_size, user_id)
            for row in rows:
                text = wire_message(row.id, row.event, row.data)
                await client.send({"type": "websocket.send", "text": text})
                client.last_id = row.id
            if len(rows) < self.page_size:
                return

    def cut(self, client: Client, code: int, reason: str) -> None:
        """Stop handing events to this client and close its socket with `code`."""
        if client.closing:
            return
        client.closing = True
        self._unregister(client)
        if client.task is not None and client.task is not asyncio.current_task():
            client.task.cancel()
        client.task = None
        closer = asyncio.create_task(close(client.send, code, reason))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    # Clients ---------------------------------------------------------------------------

    def _clients(self) -> Iterable[Client]:
        yield from self._admins
        for users in self._by_user.values():
            yield from users

    def _register(self, client: Client) -> None:
        if client.principal.is_admin:
            self._admins.add(client)
        else:
            self._by_user.setdefault(client.principal.user_id, set()).add(client)
        user_id = client.principal.user_id
        self._per_user[user_id] = self._per_user.get(user_id, 0) + 1
        self.client_count += 1
        self.peak_clients = max(self.peak_clients, self.client_count)
        self.metrics.websocket_clients.inc()

    def _unregister(self, client: Client) -> None:
        if client.principal.is_admin:
            if client not in self._admins:
                return
            self._admins.discard(client)
        else:
            users = self._by_user.get(client.principal.user_id)
            if users is None or client not in users:
                return
            users.discard(client)
            if not users:
                del self._by_user[client.principal.user_id]
        user_id = client.principal.user_id
        self._per_user[user_id] -= 1
        if not self._per_user[user_id]:
            del self._per_user[user_id]
        self.client_count -= 1
        self.metrics.websocket_clients.dec()
        if client.expiry is not None:
            client.expiry.cancel()
            client.expiry = None
        gone = self.peak_clients - self.client_count
        wave = gone >= self.release_after and 2 * self.client_count <= self.peak_clients
        if wave and self._trim_timer is None:
            loop = asyncio.get_running_loop()
            self._trim_timer = loop.call_later(self.release_delay, self._trim_heap)

    def _trim_heap(self) -> None:
        self._trim_timer = None
        before, started = memory.rss_mb(), time.perf_counter()
        if memory.trim_heap():
            self.heap_trims += 1
            after = memory.rss_mb()
            log.info(
                "heap trimmed after websocket clients left",
                clients=self.client_count,
                peak=self.peak_clients,
                rss_mb_before=round(before or 0),
                rss_mb_after=round(after or 0),
                took_ms=round(1000 * (time.perf_counter() - started), 1),
            )
        self.peak_clients = self.client_count

    def authenticate(self, scope: Scope) -> Principal:
        token = query_param(scope, "token") or subprotocol_token(scope)
        if not token:
            token = bearer_token(header(scope, b"authorization"))
        return self.verifier.authenticate(token)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One socket, from the handshake to its close."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(scope, receive, send)
        finally:
            self._handlers.discard(task)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return  # gone before the handshake
        # Accept first, then close: browsers see the close code and reason, not a bare 403.
        # A client that offered the `outbox` subprotocol (its token beside it) gets it.
        if SUBPROTOCOL in scope.get("subprotocols", ()):
            await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
        else:
            await send({"type": "websocket.accept"})
        if self._stopping:
            await close(send, GOING_AWAY, "server shutting down")
            return
        try:
            principal = self.authenticate(scope)
        except AuthError as exc:
            await close(send, UNAUTHORIZED, str(exc))
            return
        try:
            since = parse_since(query_param(scope, "since"))
        except ValueError as exc:
            await close(send, BAD_REQUEST, str(exc))
            return
        # uvicorn keeps the scope for the socket's life: its headers (a browser's, with
        # cookies, run to kilobytes) and the token are not needed any more.
        scope["headers"], scope["query_string"], scope["subprotocols"] = [], b"", []
        # A client is registered only once the reader has a position: before that, events
        # committed meanwhile could fall between the replay and the live stream.
        try:
            await asyncio.wait_for(self._positioned.wait(), self.settings.db_pool_timeout)
        except TimeoutError:
            await close(send, TRY_AGAIN_LATER, "database unavailable: try again later")
            return
        cap = self.settings.ws_max_per_user
        if self._per_user.get(principal.user_id, 0) >= cap:
            await close(send, POLICY_VIOLATION, f"more than {cap} feeds for this user")
            return
        client = Client(
            principal=principal,
            send=send,
            last_id=since if since is not None else (self.last_seen or 0),
            # Registered before the replay reads the table: no gap at the switch.
            state=WAITING if since is not None else LIVE,
        )
        self._register(client)
        if principal.expires_at is not None:
            delay = principal.expires_at + self.settings.jwt_leeway - time.time()
            client.expiry = asyncio.get_running_loop().call_later(
                max(0.0, delay), self.cut, client, UNAUTHORIZED, "token expired"
            )
        if since is not None:
            client.task = asyncio.create_task(self._replay(client, since))
        try:
            # Clients only ping and close; a close of ours ends this too (the server
            # reports it as a disconnect).
            while (await receive())["type"] != "websocket.disconnect":
                pass
        finally:
            client.closing = True
            self._unregister(client)
            if client.task is not None:
                client.task.cancel()
                client.task = None


def parse_since(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_EVENT_ID:
        raise ValueError("since must be an event id (a non-negative integer)")
    return int(raw)


# The token may travel as a subprotocol, out of the URL that proxies log: the client
# offers `outbox, bearer.<JWT>` in Sec-WebSocket-Protocol and the server selects `outbox`.
SUBPROTOCOL = "outbox"
TOKEN_SUBPROTOCOL_PREFIX = "bearer."


def subprotocol_token(scope: Scope) -> str | None:
    for offered in scope.get("subprotocols", ()):
        if offered.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return str(offered[len(TOKEN_SUBPROTOCOL_PREFIX) :]) or None
    return None


def query_param(scope: Scope, name: str) -> str | None:
    """The last value of `name` in the query string (as starlette's QueryParams.get)."""
    found = None
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), True):
        if key == name:
            found = value
    return found


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _clip(reason: str) -> str:
    # A close frame's reason is at most 123 bytes of UTF-8.
    return reason.encode()[:123].decode(errors="ignore")


async def close(send: Send, code: int, reason: str) -> None:
    # The peer may be gone already; there is no one left to tell.
    with contextlib.suppress(Exception):
        await send({"type": "websocket.close", "code": code, "reason": _clip(reason)})


class FeedEndpoint:
    """The feed as a plain ASGI app (starlette mounts a non-function endpoint as is): no
    request/WebSocket wrappers kept for the socket's life."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway: Gateway = scope["app"].state.gateway
        await gateway.handle(scope, receive, send)


websocket_endpoint = FeedEndpoint()


async def going_away(app: Any) -> None:
    """Before the server closes connections (with 1012): close the feed's with 1001."""
    state = getattr(app, "state", None)
    gateway = getattr(state, "gateway", None) if isinstance(app, Starlette) else None
    if isinstance(gateway, Gateway):
        await gateway.going_away()
