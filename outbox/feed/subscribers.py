"""Whom the feed hands events to: the registered sessions by user (admins apart, they
get everyone's), the sockets per user (the per-user cap counts them), and the heap given
back to the system once most of a crowd has left."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from outbox import memory
from outbox.log import get_logger
from outbox.metrics import ApiMetrics

if TYPE_CHECKING:
    from outbox.feed.session import Session

log = get_logger("outbox.feed")

# Once this many clients have left since the peak, and at most half remain, the freed heap
# goes back to the system (outbox/memory.py), a moment later: a wave leaves together.
RELEASE_AFTER = 1000
RELEASE_DELAY = 2.0


class Subscribers:
    def __init__(self, metrics: ApiMetrics) -> None:
        self.metrics = metrics
        self.by_user: dict[str, set[Session]] = {}  # users' sessions (admins' apart)
        self.admins: set[Session] = set()
        self._per_user: dict[str, int] = {}  # sockets per JWT sub, admins included
        self.count = 0
        self.peak = 0  # since the heap was last trimmed
        self.release_after, self.release_delay = RELEASE_AFTER, RELEASE_DELAY
        self.heap_trims = 0
        self._trim_timer: asyncio.TimerHandle | None = None

    def __iter__(self) -> Iterator[Session]:
        yield from self.admins
        for sessions in self.by_user.values():
            yield from sessions

    def of_user(self, user_id: str) -> int:
        """How many sockets this JWT sub has open."""
        return self._per_user.get(user_id, 0)

    def add(self, session: Session) -> None:
        principal = session.principal
        if principal.is_admin:
            self.admins.add(session)
        else:
            self.by_user.setdefault(principal.user_id, set()).add(session)
        self._per_user[principal.user_id] = self._per_user.get(principal.user_id, 0) + 1
        self.count += 1
        self.peak = max(self.peak, self.count)
        self.metrics.websocket_clients.inc()

    def remove(self, session: Session) -> None:
        """Out of the feed (nothing when it is out already)."""
        principal = session.principal
        if principal.is_admin:
            if session not in self.admins:
                return
            self.admins.discard(session)
        else:
            sessions = self.by_user.get(principal.user_id)
            if sessions is None or session not in sessions:
                return
            sessions.discard(session)
            if not sessions:
                del self.by_user[principal.user_id]
        self._per_user[principal.user_id] -= 1
        if not self._per_user[principal.user_id]:
            del self._per_user[principal.user_id]
        self.count -= 1
        self.metrics.websocket_clients.dec()
        gone = self.peak - self.count
        wave = gone >= self.release_after and 2 * self.count <= self.peak
        if wave and self._trim_timer is None:
            loop = asyncio.get_running_loop()
            self._trim_timer = loop.call_later(self.release_delay, self._trim_heap)

    def stop(self) -> None:
        if self._trim_timer is not None:
            self._trim_timer.cancel()

    def _trim_heap(self) -> None:
        self._trim_timer = None
        before, started = memory.rss_mb(), time.perf_counter()
        if memory.trim_heap():
            self.heap_trims += 1
            after = memory.rss_mb()
            log.info(
                "heap trimmed after websocket clients left",
                clients=self.count,
                peak=self.peak,
                rss_mb_before=round(before or 0),
                rss_mb_after=round(after or 0),
                took_ms=round(1000 * (time.perf_counter() - started), 1),
            )
        self.peak = self.count
