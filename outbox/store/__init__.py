"""The only package that runs SQL: named queries from sql/queries.sql → typed functions,
one class per role (messages, queue, events, jobs, figures, senders, receipts) over one
`Database`."""

from __future__ import annotations

from psycopg.rows import scalar_row
from psycopg_pool import AsyncConnectionPool

from outbox.store.database import QUERIES, ColumnMismatch, Database, dataclass_row
from outbox.store.events import EventRow, Events
from outbox.store.figures import Figures, QueueFigures, StatusSummary, estimate_count
from outbox.store.jobs import (
    JOB_LOCK_NAMESPACE,
    Jobs,
    JobSession,
    PgCronJob,
    PurgeCounts,
    PurgeCutoffs,
)
from outbox.store.messages import (
    Conflict,
    HistoryEntry,
    Inserted,
    ListedRow,
    MessageRow,
    Messages,
    NewMessage,
)
from outbox.store.queue import Claimed, ClaimResult, Completion, Queue
from outbox.store.receipts import Receipt, ReceiptMatch, Receipts, ReceiptStatus
from outbox.store.senders import (
    NewSender,
    SenderCounts,
    SenderRow,
    Senders,
    SenderState,
    SenderStatus,
    stored_senders,
)

__all__ = [
    "JOB_LOCK_NAMESPACE",
    "QUERIES",
    "ClaimResult",
    "Claimed",
    "ColumnMismatch",
    "Completion",
    "Conflict",
    "Database",
    "EventRow",
    "Events",
    "Figures",
    "HistoryEntry",
    "Inserted",
    "JobSession",
    "Jobs",
    "ListedRow",
    "MessageRow",
    "Messages",
    "NewMessage",
    "NewSender",
    "PgCronJob",
    "PurgeCounts",
    "PurgeCutoffs",
    "Queue",
    "QueueFigures",
    "Receipt",
    "ReceiptMatch",
    "ReceiptStatus",
    "Receipts",
    "SenderCounts",
    "SenderRow",
    "SenderState",
    "SenderStatus",
    "Senders",
    "StatusSummary",
    "Store",
    "dataclass_row",
    "estimate_count",
    "stored_senders",
]


class Store:
    """One pool's statements, by role: each part of outbox uses the role it needs."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        session_conninfo: str = "",
        statement_timeout: float | None = None,
    ) -> None:
        self.db = Database(
            pool, session_conninfo=session_conninfo, statement_timeout=statement_timeout
        )
        self.messages = Messages(self.db)
        self.queue = Queue(self.db)
        self.events = Events(self.db)
        self.jobs = Jobs(self.db)
        self.figures = Figures(self.db)
        self.senders = Senders(self.db)
        self.receipts = Receipts(self.db)

    @property
    def pool(self) -> AsyncConnectionPool:
        return self.db.pool

    async def schema_version(self) -> int:
        version = await self.db.fetchone(QUERIES["schema_version"], row=scalar_row)
        return int(version) if version is not None else 0
