"""outbox's vocabulary: the statuses a message moves through, the outcomes an attempt
records, and the states the status events report. The SQL (sql/migrations, sql/queries.sql)
writes the same words; these are their one spelling in Python."""

from __future__ import annotations

from enum import StrEnum


class MessageStatus(StrEnum):
    """`outbox.messages.status`."""

    PENDING = "pending"  # waiting for its time or its next attempt
    IN_FLIGHT = "in_flight"  # claimed by a dispatcher under a lease
    SENT = "sent"  # the provider accepted it
    ERROR = "error"  # final failure
    CANCELLED = "cancelled"  # cancelled while pending


# Statuses a message can still leave (a cancel applies to pending ones only).
LIVE_STATUSES = frozenset({MessageStatus.PENDING, MessageStatus.IN_FLIGHT})


class AttemptOutcome(StrEnum):
    """`outbox.attempts.outcome`: how one attempt ended."""

    SENT = "sent"
    TRANSIENT = "transient"  # failed; retried after the backoff while attempts remain
    PERMANENT = "permanent"  # failed; retrying cannot help
    SENDER = "sender"  # the account cannot send: sending pauses, the attempt is refunded
    THROTTLED = "throttled"  # the provider's rate limit: pending again, the attempt refunded
    UNKNOWN = "unknown"  # called, no answer: it may have been sent (OUTBOX_UNKNOWN_OUTCOME)
    EXPIRED = "expired"  # its expires_at passed before the call
    INTERRUPTED = "interrupted"  # the dispatcher stopped before the call ended
    LEASE_EXPIRED = "lease_expired"  # the reaper took the row back (written in SQL)


class DeliveryState(StrEnum):
    """`data.status` of a status event: where the message stands for its sender."""

    QUEUED = "queued"  # accepted by the provider
    RETRYING = "retrying"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DELIVERED = "delivered"  # the provider's receipts
    READ = "read"
