"""Figures about the queue: the dashboard's summary, the queue gauges of /metrics (counts
estimated from the planner's statistics where counting would read the history), and the
per-status summary of `outbox status`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from outbox.store.database import QUERIES, Database


class Figures:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def queue_summary(self) -> list[dict[str, Any]]:
        async with self._db.connection() as conn:
            cursor = await self._db.execute(conn, QUERIES["queue_summary"], dicts=True)
            return await cursor.fetchall()

    async def dashboard(self, count_cap: int, done_cap: int, rows: int) -> str:
        """The dashboard's figures, as the JSON text PostgreSQL built (one round trip)."""
        params = {"cap": count_cap, "done_cap": done_cap, "rows": rows}
        async with self._db.connection() as conn:
            cursor = await self._db.execute(conn, QUERIES["admin_summary"], params)
            row = await cursor.fetchone()
        assert row is not None
        return str(row[0])

    async def queue_gauges(self) -> QueueFigures:
        """The queue gauges of /metrics in one statement (see `queue_gauges`)."""
        async with self._db.connection() as conn:
            cursor = await self._db.execute(conn, QUERIES["queue_gauges"])
            row = await cursor.fetchone()
        assert row is not None
        pending, due, oldest_due_age, in_flight, expired, *statistics = row
        return QueueFigures(
            counts={
                "pending": pending,
                "in_flight": in_flight,
                **{s: estimate_count(s, *statistics) for s in ("sent", "error", "cancelled")},
            },
            due=due,
            oldest_due_age=oldest_due_age,
            lease_expired=expired,
        )


def estimate_count(
    value: str,
    reltuples: float,
    null_frac: float | None,
    n_distinct: float | None,
    common_values: list[str] | None,
    common_shares: list[float] | None,
) -> int | None:
    """Rows with `value`, as the planner estimates an equality (eqsel): its share in the
    most-common-values list, or else an even part of what the list leaves over. None
    when the table was never analysed: no figure rather than a wrong one."""
    if reltuples < 0 or (n_distinct is None and reltuples > 0):
        return None
    if reltuples == 0 or n_distinct is None:
        return 0
    common = dict(zip(common_values or (), common_shares or (), strict=True))
    if value in common:
        share = common[value]
    else:
        distinct = n_distinct if n_distinct > 0 else -n_distinct * reltuples
        others = distinct - len(common)
        rest = 1.0 - (null_frac or 0.0) - sum(common.values())
        share = rest / others if others >= 1 and rest > 0 else 0.0
    return round(reltuples * share)


@dataclass(frozen=True, slots=True)
class QueueFigures:
    """The queue gauges of /metrics (`queue_gauges`)."""

    counts: dict[str, int | None]  # by status; None: no estimate (never analysed)
    due: int
    oldest_due_age: float  # seconds
    lease_expired: int
