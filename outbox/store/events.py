"""The status events the feed reads: the newest id, the oldest kept, and a page after an id."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from psycopg.rows import scalar_row

from outbox.store.database import QUERIES, Database, dataclass_row


@dataclass(frozen=True, slots=True)
class EventRow:
    """A status event as stored (the columns of events_after): `data` is the wire `data`
    without `event_id`."""

    id: int
    user_id: str | None  # None: a sender event (sender_paused, sender_resumed)
    sender: str | None
    event: str
    data: dict[str, Any]


_EVENT_ROW = dataclass_row(EventRow)


class Events:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def max_id(self) -> int | None:
        newest = await self._db.fetchone(QUERIES["max_event_id"], row=scalar_row)
        return int(newest) if newest is not None else None

    async def oldest_id(self) -> int | None:
        oldest = await self._db.fetchone(QUERIES["oldest_event_id"], row=scalar_row)
        return int(oldest) if oldest is not None else None

    async def after(
        self,
        after: int,
        limit: int,
        user_id: str | None = None,
        senders: Collection[str] = (),
    ) -> list[EventRow]:
        """Events with id > after in id order: everyone's when `user_id` is None, else that
        user's message events and the sender events of `senders` (those it may use)."""
        if user_id is None:
            params: dict[str, Any] = {"after": after, "limit": limit}
            return await self._db.fetchall(QUERIES["events_after"], params, row=_EVENT_ROW)
        params = {"after": after, "limit": limit, "user_id": user_id, "senders": sorted(senders)}
        return await self._db.fetchall(QUERIES["user_events_after"], params, row=_EVENT_ROW)
