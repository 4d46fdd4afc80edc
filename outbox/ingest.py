"""Group commit for the send endpoint: concurrent requests share one INSERT.

Every committing transaction that issued a NOTIFY holds a database-wide lock
through its commit, so one transaction per request serialises their WAL flushes.
Requests that arrive while a write is in progress wait for the next write and go
in together: one statement, one commit, one NOTIFY for all of them. A request is
still answered only after its own row is committed; an idle service writes at
once, without waiting to fill a batch.
"""

from __future__ import annotations

import asyncio
from collections import deque

from outbox.store import Inserted, NewMessage, Store

MAX_ROWS = 500
WRITERS = 2  # writes in flight at once: one commits while the next is sent


class _Pending:
    __slots__ = ("future", "message", "user_id")

    def __init__(self, user_id: str, message: NewMessage, future: asyncio.Future[Inserted | None]):
        self.user_id = user_id
        self.message = message
        self.future = future


class InsertCoalescer:
    def __init__(self, store: Store, max_attempts: int) -> None:
        self._store = store
        self._max_attempts = max_attempts
        self._queue: deque[_Pending] = deque()
        self._writing = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def insert(self, user_id: str, message: NewMessage) -> Inserted | None:
        """The row as committed (None: its client_message_id names another request)."""
        if not self._queue and self._writing < WRITERS:
            # Nothing to coalesce with: write from this request's own task, without
            # the hand-off to a writer task (the single-client path).
            self._writing += 1
            try:
                (result,) = await self._store.messages.insert(
                    [(user_id, message)], self._max_attempts
                )
            finally:
                self._writing -= 1
                self._start_writers()
            return result
        future: asyncio.Future[Inserted | None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(user_id, message, future))
        self._start_writers()
        return await future

    def _start_writers(self) -> None:
        while self._queue and self._writing < WRITERS:
            self._writing += 1
            task = asyncio.create_task(self._write(self._take()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Pending]:
        """Up to MAX_ROWS requests; a repeated (user, client_message_id) waits its turn,
        since one statement cannot both insert a row and resolve a conflict on it."""
        batch: list[_Pending] = []
        keys: set[tuple[str, str]] = set()
        deferred: list[_Pending] = []
        while self._queue and len(batch) < MAX_ROWS:
            item = self._queue.popleft()
            if item.message.client_message_id is not None:
                key = (item.user_id, item.message.client_message_id)
                if key in keys:
                    deferred.append(item)
                    continue
                keys.add(key)
            batch.append(item)
        self._queue.extendleft(reversed(deferred))
        # One key order for every write, so two writes waiting on each other's
        # uncommitted client_message_ids cannot deadlock.
        batch.sort(key=lambda item: (item.user_id, item.message.client_message_id or ""))
        return batch

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            results = await self._store.messages.insert(
                [(item.user_id, item.message) for item in batch], self._max_attempts
            )
        except BaseException as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():  # its request may have been cancelled
                    item.future.set_result(result)
        finally:
            self._writing -= 1
            self._start_writers()
