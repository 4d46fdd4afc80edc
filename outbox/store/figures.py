"""Figures about the queue: the dashboard's summary, the queue gauges of /metrics (counts
estimated from the planner's statistics where counting would read the history), and the
per-status summary of `outbox status`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import scalar_row

from outbox.states import MessageStatus
from outbox.store.database import QUERIES, Database, dataclass_row


@dataclass(slots=True)
class StatusSummary:
    """One status in the view outbox.queue_summary (`outbox status`)."""

    status: MessageStatus
    count: int
    oldest: datetime | None
    due_now: int

    def __post_init__(self) -> None:
        self.status = MessageStatus(self.status)  # the column is text


@dataclass(frozen=True, slots=True)
class GaugeRow:
    """The columns of queue_gauges: exact counts of live rows, and the planner's
    statistics of the status column (see `estimate_count`)."""

    pending: int
    due: int
    oldest_due_age: float  # seconds
    in_flight: int
    lease_expired: int
    reltuples: float
    null_frac: float | None
    n_distinct: float | None
    common_values: list[str] | None
    common_shares: list[float] | None


_SUMMARY_ROW = dataclass_row(StatusSummary)
_GAUGE_ROW = dataclass_row(GaugeRow)
# Statuses whose counts are estimated: most of a big table, counting them would read it.
_ESTIMATED = (MessageStatus.SENT, MessageStatus.ERROR, MessageStatus.CANCELLED)


class Figures:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def queue_summary(self) -> list[StatusSummary]:
        return await self._db.fetchall(QUERIES["queue_summary"], row=_SUMMARY_ROW)

    async def dashboard(self, count_cap: int, done_cap: int, rows: int) -> str:
        """The dashboard's figures, as the JSON text PostgreSQL built (one round trip)."""
        params = {"cap": count_cap, "done_cap": done_cap, "rows": rows}
        document = await self._db.fetchone(QUERIES["admin_summary"], params, row=scalar_row)
        assert document is not None
        return str(document)

    async def queue_gauges(self) -> QueueFigures:
        """The queue gauges of /metrics in one statement (see `queue_gauges`)."""
        row = await self._db.fetchone(QUERIES["queue_gauges"], row=_GAUGE_ROW)
        assert row is not None
        statistics = (
            row.reltuples,
            row.null_frac,
            row.n_distinct,
            row.common_values,
            row.common_shares,
        )
        return QueueFigures(
            counts={
                MessageStatus.PENDING: row.pending,
                MessageStatus.IN_FLIGHT: row.in_flight,
                **{status: estimate_count(status, *statistics) for status in _ESTIMATED},
            },
            due=row.due,
            oldest_due_age=row.oldest_due_age,
            lease_expired=row.lease_expired,
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
