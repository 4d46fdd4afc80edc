"""The status events the feed reads: the newest id, the oldest kept, and a page after an id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from outbox.store.database import QUERIES, Database


@dataclass(frozen=True, slots=True)
class EventRow:
    """A status event as stored: `data` is the wire `data` without `event_id`."""

    id: int
    user_id: str
    event: str
    data: dict[str, Any]


class Events:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def max_id(self) -> int | None:
        async with self._db.connection() as conn:
            cursor = await self._db.execute(conn, QUERIES["max_event_id"])
            row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else None

    async def oldest_id(self) -> int | None:
        async with self._db.connection() as conn:
            cursor = await self._db.execute(conn, QUERIES["oldest_event_id"])
            row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else None

    async def after(self, after: int, limit: int, user_id: str | None = None) -> list[EventRow]:
        """Events with id > after in id order; one user's, or everyone's when None."""
        query = QUERIES["events_after"] if user_id is None else QUERIES["user_events_after"]
        async with self._db.connection() as conn:
            cursor = await self._db.execute(
                conn, query, {"after": after, "limit": limit, "user_id": user_id}
            )
            rows = await cursor.fetchall()
        return [EventRow(*row) for row in rows]
