"""What the feed puts on a socket: the v1 message of an event, and the close codes."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

# The ASGI shapes the feed handles (plain mappings: no starlette wrappers per socket).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

WIRE_VERSION = "v1"
# The order of a message event's `data` on the wire: the v1 fields first, the additive
# ones after.
DATA_ORDER = (
    "message_id",
    "status",
    "to",
    "timestamp",
    "error",
    "event_id",
    "client_message_id",
    "provider_message_id",
    "attempt",
    "next_attempt_at",
)
# A sender's events (no message_id): who, why, when first.
SENDER_DATA_ORDER = ("sender", "reason", "code", "timestamp", "event_id")

# Close codes (RFC 6455 and the 4000–4999 private range).
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
BAD_REQUEST = 4400
UNAUTHORIZED = 4401
GONE = 4410

TOO_SLOW = "too slow: reconnect with ?since=<last event_id>"
SHUTTING_DOWN = "server shutting down"


def wire_message(event_id: int, event: str, data: dict[str, Any]) -> str:
    """The v1 wire message of one event (computed once per event, not per client)."""
    full = {**data, "event_id": event_id}
    order = DATA_ORDER if "message_id" in full else SENDER_DATA_ORDER
    ordered = {key: full.pop(key) for key in order if key in full}
    ordered.update(full)
    return orjson.dumps({"event": event, "data": ordered, "version": WIRE_VERSION}).decode()


def _clip(reason: str) -> str:
    # A close frame's reason is at most 123 bytes of UTF-8.
    return reason.encode()[:123].decode(errors="ignore")


async def close(send: Send, code: int, reason: str) -> None:
    # The peer may be gone already; there is no one left to tell.
    with contextlib.suppress(Exception):
        await send({"type": "websocket.close", "code": code, "reason": _clip(reason)})
