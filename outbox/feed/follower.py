"""`Feed`: the process-wide half of the status feed. One LISTEN connection per process
(`NOTIFY outbox_events`, whose payload is the highest new id); each new event read once
from `outbox.events`, a page at a time, and handed, serialised once, to every session
allowed to see it: a message's to its user and the admins, a sender's to the admins and
the users allowed to send from it (everyone for `*`). It lives in the app's lifespan state:
started with the app, it closes its sockets with 1001 when the server shuts down."""

from __future__ import annotations

import asyncio
from typing import Any

from psycopg.conninfo import make_conninfo

from outbox import notifier
from outbox.auth import TokenVerifier
from outbox.cancellation import cancel_and_wait
from outbox.feed import session
from outbox.feed.session import DROPPED, QUEUED, Session
from outbox.feed.subscribers import Subscribers
from outbox.feed.wire import GOING_AWAY, SHUTTING_DOWN, Receive, Scope, Send, close, wire_message
from outbox.log import get_logger
from outbox.metrics import ApiMetrics
from outbox.retry import Backoff
from outbox.sender_directory import SenderDirectory
from outbox.settings import Settings
from outbox.store import EventRow, Store

log = get_logger("outbox.feed")

CHANNEL = "outbox_events"
# Names the LISTEN connection in pg_stat_activity (as the README tells operators).
APPLICATION_NAME = "outbox-gateway"
MAX_PAGE = 500
RETRY_MIN = 0.1
RETRY_MAX = 10.0
SHUTDOWN_WAIT = 5.0


class Feed:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        verifier: TokenVerifier,
        metrics: ApiMetrics | None = None,
        *,
        senders: SenderDirectory | None = None,
    ) -> None:
        self.settings = settings
        self.senders = senders  # who may see a sender's events
        self.metrics = metrics or ApiMetrics()
        self.store = store
        self.verifier = verifier
        self.queue_size = settings.ws_queue_size
        # A page never exceeds half a queue, so a session that keeps up never overflows
        # on one page's fan-out (senders run between pages, while the next one is read).
        self.page_size = max(1, min(MAX_PAGE, self.queue_size // 2))
        self.subscribers = Subscribers(self.metrics)
        self.replay_slots = asyncio.Semaphore(settings.ws_max_replays)
        self.last_seen: int | None = None  # None until the first read of the table
        self.positioned = asyncio.Event()  # set once last_seen is known
        self.listening = False  # the LISTEN connection is up (it has been, at least once)
        self.stopping = False
        self._wake = asyncio.Event()
        self._reading = False  # a read of the table is running: notifications wake it
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closers: set[asyncio.Task[None]] = set()

    # Lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        conninfo = make_conninfo(
            self.settings.listen_database_url, application_name=APPLICATION_NAME
        )
        self._tasks = [
            asyncio.create_task(
                notifier.listen(conninfo, CHANNEL, self._on_notify, on_connect=self._on_listening),
                name="feed-listen",
            ),
            asyncio.create_task(self._follow(), name="feed-follow"),
        ]
        self._wake.set()  # find the starting position now, not at the first notification

    async def going_away(self) -> None:
        """Close every socket with 1001 and give the handlers a moment to send it."""
        self.stopping = True
        for subscriber in list(self.subscribers):
            subscriber.cut(GOING_AWAY, SHUTTING_DOWN)
        handlers = [task for task in self._handlers if not task.done()]
        if handlers:
            await asyncio.wait(handlers, timeout=SHUTDOWN_WAIT)

    async def stop(self) -> None:
        await self.going_away()
        self.subscribers.stop()
        # Cancelled until they end (outbox/cancellation.py): a cancellation swallowed
        # once left the follower waiting for its next wake-up and this stop forever.
        await cancel_and_wait(self._tasks)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One socket, from the handshake to its close (awaited by `going_away`)."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await session.run(self, scope, receive, send)
        finally:
            self._handlers.discard(task)

    def close_later(self, send: Send, code: int, reason: str) -> None:
        """A close frame on its way, without waiting for it (held until sent)."""
        closer = asyncio.create_task(close(send, code, reason))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    @property
    def idle(self) -> bool:
        """No read of the table running, and none asked for."""
        return not self._reading and not self._wake.is_set()

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
            if not self._reading and not self.subscribers.count:
                # Nobody to hand them to: a session that opens from now on starts
                # after them (a resuming one replays from the table), so skip the read.
                self.last_seen = newest
                return
        self._wake.set()

    async def _follow(self) -> None:
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._catch_up()
            except Exception as exc:  # the one reader must outlive any failure: retry
                delay = backoff.next_delay()
                log.warning("reading events failed", error=str(exc).strip(), retry_in=delay)
                await asyncio.sleep(delay)
                self._wake.set()
            else:
                backoff.reset()

    async def _catch_up(self) -> None:
        self._reading = True
        try:
            await self._read_new_events()
        finally:
            self._reading = False

    async def _read_new_events(self) -> None:
        if self.last_seen is None:
            # First contact: live sessions start from here (resuming ones replay).
            self.last_seen = await self.store.events.max_id() or 0
            self.positioned.set()
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
        if row.user_id is None:  # a sender event: rare, routed apart
            self._fan_out_sender_event(row, tally)
            return
        users = self.subscribers.by_user.get(row.user_id)
        admins = self.subscribers.admins
        if not users and not admins:
            return
        event_id, text = row.id, wire_message(row.id, row.event, row.data)
        for subscriber in tuple(users or ()):  # an offer may cut a session (and remove it)
            tally[subscriber.offer(event_id, text)] += 1
        for subscriber in tuple(admins):
            tally[subscriber.offer(event_id, text)] += 1

    def _fan_out_sender_event(self, row: EventRow, tally: list[int]) -> None:
        """To the admins and the sessions of the users the sender allows (everyone's for
        `*`); only to the admins when the sender is not known (deleted since)."""
        known = self.senders.get(row.sender) if self.senders and row.sender else None
        subscribers = self.subscribers
        targets: list[Session] = list(subscribers.admins)
        if known is not None:
            users = known.config.users
            if "*" in users:
                targets = list(subscribers)
            else:
                for user_id in users:
                    targets.extend(subscribers.by_user.get(user_id, ()))
        if not targets:
            return
        event_id, text = row.id, wire_message(row.id, row.event, row.data)
        for subscriber in targets:  # a copy: an offer may cut a session (and remove it)
            tally[subscriber.offer(event_id, text)] += 1
