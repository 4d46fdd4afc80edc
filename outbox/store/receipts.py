"""Delivery receipts: what a provider reports of messages it accepted, recorded with their
`message_status` events (sql/migrations/018_delivery_receipts.sql)."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from outbox.store.database import QUERIES, Database, dataclass_row

ReceiptStatus = Literal["sent", "delivered", "read", "failed"]


@dataclass(frozen=True, slots=True)
class Receipt:
    """One status of one message, as a provider reported it."""

    status: ReceiptStatus
    at: float  # the provider's time, unix seconds
    task_id: str | None = None  # biz_opaque_callback_data, or the gateway's task_id
    provider_id: str | None = None  # the provider's message id (a wamid)
    error: dict[str, Any] | None = None  # with `failed`: {"code", "title", "details"}


@dataclass(frozen=True, slots=True)
class ReceiptMatch:
    n: int  # the receipt's index in the list recorded
    message_id: uuid.UUID | None  # None: no message of the senders allowed has that id


_MATCH_ROW = dataclass_row(ReceiptMatch)


class Receipts:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(
        self, receipts: Sequence[Receipt], senders: Collection[str] | None
    ) -> list[ReceiptMatch]:
        """Records `receipts` in one transaction, matching each among the messages of
        `senders` (None: of any sender). Statuses never move back; duplicates change
        nothing; each message whose state climbs gets one `message_status` event."""
        if not receipts:
            return []
        items = [
            {
                "n": n,
                "status": r.status,
                "at": r.at,
                "task_id": r.task_id,
                "id": r.provider_id,
                "error": r.error,
            }
            for n, r in enumerate(receipts)
        ]
        params = {
            "receipts": orjson.dumps(items).decode(),
            "senders": None if senders is None else sorted(senders),
        }
        return await self._db.fetchall(QUERIES["record_receipts"], params, row=_MATCH_ROW)
