"""One feed socket: its handshake, its replay (`?since=`), the live events on their way
to it and its close. The process-wide part it joins is `Feed` (outbox/feed/follower.py).

A session that is sent something gets a sender task until its backlog is out, so a slow
client never delays the others: when its backlog reaches OUTBOX_WS_QUEUE_SIZE it is
closed with 1013 and resumes with `?since=<event_id>`. A resume replays the table in
pages, each sent before the next is read, at most OUTBOX_WS_MAX_REPLAYS at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg
from psycopg_pool import PoolTimeout

from outbox.auth import Principal
from outbox.feed.handshake import Refused, accept, forget, read_opening
from outbox.feed.wire import (
    GOING_AWAY,
    GONE,
    INTERNAL_ERROR,
    POLICY_VIOLATION,
    SHUTTING_DOWN,
    TOO_SLOW,
    TRY_AGAIN_LATER,
    UNAUTHORIZED,
    Receive,
    Scope,
    Send,
    close,
    wire_message,
)
from outbox.log import get_logger
from outbox.waiting import wait_event

if TYPE_CHECKING:
    from outbox.feed.follower import Feed

log = get_logger("outbox.feed")

# What Session.offer did with a live event (counted per page for the metrics).
SKIPPED, QUEUED, DROPPED = 0, 1, 2

# Where a session stands. A resuming one WAITs for a replay slot (live events skipped:
# the replay reads them from the table), REPLAYs (live events held back in `held`), or
# LAGs (more live events came during the replay than `held` may keep: dropped, the
# replay reads the table again); then it is LIVE.
WAITING, REPLAYING, LAGGING, LIVE = "waiting", "replaying", "lagging", "live"


@dataclass(eq=False, slots=True)
class Session:
    """One connected socket: whose events it gets, and what is on its way to it. Idle,
    it is all the feed keeps for a socket (thousands are normal): no task, no queue."""

    feed: Feed
    principal: Principal
    send: Send
    last_id: int  # highest event id handed over: anything at or below is skipped
    state: str = LIVE
    backlog: deque[str] | None = None  # live events not sent yet (None while there are none)
    held: deque[tuple[int, str]] | None = None  # live events held back while replaying
    task: asyncio.Task[None] | None = None  # the replay, or the sender of the backlog
    closing: bool = False  # a close is on its way: nothing more is handed over
    expiry: asyncio.TimerHandle | None = None

    def offer(self, event_id: int, text: str) -> int:
        """Hand over a live event without ever waiting (fan-out must not block).
        Returns QUEUED, SKIPPED or DROPPED (this event cut the session off: too slow)."""
        if event_id <= self.last_id or self.closing:
            return SKIPPED
        if self.state != LIVE:
            if self.state == REPLAYING:
                assert self.held is not None
                if len(self.held) < self.feed.queue_size:
                    self.held.append((event_id, text))
                    return QUEUED
                # Too many to hold: they are in the table, which the replay reads again.
                self.held, self.state = None, LAGGING
            return SKIPPED
        backlog = self.backlog
        if backlog is None:
            backlog = self.backlog = deque()
        elif len(backlog) >= self.feed.queue_size:
            self.cut(TRY_AGAIN_LATER, TOO_SLOW)
            return DROPPED
        backlog.append(text)
        self.last_id = event_id
        if self.task is None:
            self.task = asyncio.create_task(self._send_backlog())
        return QUEUED

    async def _send_backlog(self) -> None:
        backlog = self.backlog
        try:
            while backlog:
                await self.send({"type": "websocket.send", "text": backlog.popleft()})
        except OSError:  # the client is gone: its handler hears the disconnect
            self.closing = True  # nothing more for it meanwhile
            return
        except Exception as exc:
            log.error("websocket sender failed", error=repr(exc))
            self.task = None
            self.cut(INTERNAL_ERROR, "internal error")
            return
        # Sent: the next event starts a new sender (an idle session holds no task).
        self.task = self.backlog = None

    async def replay(self, since: int) -> None:
        """Stored events after `since` page by page (a user's: its messages' and its senders'),
        then the held-back live ones, then live.
        Each page is sent (at the client's pace) before the next is read: any number of
        events can follow `since`, the process holds one page per replaying session."""
        try:
            async with self.feed.replay_slots:
                # From here on live events are held back (before, they are in the table).
                self.state, self.held = REPLAYING, deque()
                oldest = await self.feed.store.events.oldest_id()
                if oldest is not None and since < oldest - 1:
                    self.cut(GONE, f"events after {since} were purged: oldest is {oldest}")
                    return
                await self._send_until_live()
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("replay failed", error=str(exc).strip())
            self.cut(TRY_AGAIN_LATER, "database unavailable: retry with ?since=")
        except OSError:  # the client is gone: its handler hears the disconnect
            self.closing = True
        except Exception as exc:
            log.error("websocket replay failed", error=repr(exc))
            self.task = None
            self.cut(INTERNAL_ERROR, "internal error")

    async def _send_until_live(self) -> None:
        user_id = None if self.principal.is_admin else self.principal.user_id
        while not self.closing:
            await self._send_stored(user_id)
            held = self.held
            while held and self.state == REPLAYING and not self.closing:
                event_id, text = held.popleft()
                if event_id > self.last_id:
                    await self.send({"type": "websocket.send", "text": text})
                    self.last_id = event_id
            if self.state == REPLAYING:
                # Caught up, in one synchronous step: the next event goes live.
                self.state, self.held, self.task = LIVE, None, None
                return
            # It lagged: read the table again, holding back what comes from now on.
            self.state, self.held = REPLAYING, deque()

    async def _send_stored(self, user_id: str | None) -> None:
        feed = self.feed
        page_size, events, directory = feed.page_size, feed.store.events, feed.senders
        while not self.closing:
            # A user's own events and those of the senders it may use, as the directory
            # says now (a sender deleted since is nobody's but the admins').
            senders = directory.allowed_ids(user_id) if user_id and directory else frozenset()
            rows = await events.after(self.last_id, page_size, user_id, senders)
            for row in rows:
                text = wire_message(row.id, row.event, row.data)
                await self.send({"type": "websocket.send", "text": text})
                self.last_id = row.id
            if len(rows) < page_size:
                return

    def expire_at(self, deadline: float) -> None:
        """Closed with 4401 at `deadline` (unix time): its token has expired."""
        delay = max(0.0, deadline - time.time())
        loop = asyncio.get_running_loop()
        self.expiry = loop.call_later(delay, self.cut, UNAUTHORIZED, "token expired")

    def cut(self, code: int, reason: str) -> None:
        """Stop handing events to this session and close its socket with `code`."""
        if self.closing:
            return
        self.closing = True
        self._leave_feed()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.task = None
        self.feed.close_later(self.send, code, reason)

    def end(self) -> None:
        """The socket has ended: out of the feed, its replay or sender stopped."""
        self.closing = True
        self._leave_feed()
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def _leave_feed(self) -> None:
        self.feed.subscribers.remove(self)
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None


async def run(feed: Feed, scope: Scope, receive: Receive, send: Send) -> None:
    """One socket, from the handshake to its close."""
    session = await _open(feed, scope, receive, send)
    if session is None:
        return
    try:
        # Clients only ping and close; a close of ours ends this too (the server
        # reports it as a disconnect).
        while (await receive())["type"] != "websocket.disconnect":
            pass
    finally:
        session.end()


async def _open(feed: Feed, scope: Scope, receive: Receive, send: Send) -> Session | None:
    """The handshake: the socket is accepted, then refused with a close code, or joins
    the feed (replaying first when it resumes)."""
    if (await receive())["type"] != "websocket.connect":
        return None  # gone before the handshake
    await accept(scope, send)
    try:
        if feed.stopping:
            raise Refused(GOING_AWAY, SHUTTING_DOWN)
        opening = read_opening(scope, feed.verifier)
        forget(scope)
        # A session joins only once the follower has a position: before that, events
        # committed meanwhile could fall between the replay and the live stream.
        if not await wait_event(feed.positioned, feed.settings.db_pool_timeout):
            raise Refused(TRY_AGAIN_LATER, "database unavailable: try again later")
        cap = feed.settings.ws_max_per_user
        if feed.subscribers.of_user(opening.principal.user_id) >= cap:
            raise Refused(POLICY_VIOLATION, f"more than {cap} feeds for this user")
    except Refused as refused:
        await close(send, refused.code, refused.reason)
        return None
    since = opening.since
    session = Session(
        feed=feed,
        principal=opening.principal,
        send=send,
        last_id=since if since is not None else (feed.last_seen or 0),
        # Joins before the replay reads the table: no gap at the switch.
        state=WAITING if since is not None else LIVE,
    )
    feed.subscribers.add(session)
    if opening.principal.expires_at is not None:
        session.expire_at(opening.principal.expires_at + feed.settings.jwt_leeway)
    if since is not None:
        session.task = asyncio.create_task(session.replay(since))
    return session
