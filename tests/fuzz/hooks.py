"""Schemathesis hooks of the fuzz runs (loaded by name through SCHEMATHESIS_HOOKS).

Two rules of a send are relative to the request, which JSON Schema cannot say: the time
windows (`send_at` at most 30 days ahead; `expires_at` later than `send_at` and than now,
at most 365 days ahead: /openapi.json says so in words) and a batch's unique
`client_message_id`s. A generator that ignores them makes most valid-looking sends 422,
so before each call this moves a generated instant that falls outside its window into
it (same UTC offset, so odd offsets still reach the server) and drops a repeated id.
Nothing else is touched: what is invalid for any other reason stays invalid.

A message's `sender` must name a sender that exists (else 422), which JSON Schema cannot
say either: a generated one that matches the id's pattern is replaced by `default`, which
every token may send from (one that does not match is left, and refused).

Likewise a sender's credentials: omitted on a PUT, they keep the stored ones, so they are
required only when the sender is created or changes provider, which JSON Schema cannot
say either. Before a PUT whose settings lack one, the hook adds it.

And one check's premise is not this API's: use_after_free expects a 404 once a DELETE
succeeded, but `DELETE …/messages/{task_id}` cancels (DESIGN.md): the message stays,
readable as `cancelled`, or in any state again after an admin's retry requeued it. A
read that shows that very message is set aside (counted in the totals); any other
answer still fails.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import schemathesis

from outbox.models import DEFAULT_SENDER, MAX_EXPIRY_AHEAD, MAX_SCHEDULE_AHEAD, SENDER_PATTERN

_SEND_PATHS = ("/api/v1/whatsapp/send", "/api/v1/whatsapp/send/")
_BATCH_PATH = "/api/v1/whatsapp/send/batch"
_MESSAGE_PATH = "/api/v1/whatsapp/messages/{task_id}"
_MARGIN = timedelta(days=1)  # clear of the window's edges, however long the call takes
_SENDER = re.compile(SENDER_PATTERN.removeprefix("^").removesuffix("$"))


def _instant(value: object) -> datetime | None:
    """`value` as an aware datetime when it is one in ISO 8601 form, else None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.utcoffset() is not None else None


def _inside(original: datetime, earliest: datetime, span: timedelta) -> str:
    """An instant in [earliest, earliest + span), chosen from `original`, in its offset."""
    digest = hashlib.sha256(original.isoformat().encode()).digest()
    fraction = int.from_bytes(digest[:4], "big") / 2**32
    moved = earliest + span * fraction
    return moved.astimezone(original.tzinfo).isoformat()


def _into_windows(message: dict[str, Any], now: datetime) -> None:
    send_at = _instant(message.get("send_at"))
    if send_at is not None and send_at - now > MAX_SCHEDULE_AHEAD - _MARGIN:
        message["send_at"] = _inside(send_at, now + _MARGIN, MAX_SCHEDULE_AHEAD - 2 * _MARGIN)
        send_at = _instant(message["send_at"])
    expires_at = _instant(message.get("expires_at"))
    if expires_at is None:
        return
    floor = max(now, send_at or now) + _MARGIN
    ceiling = now + MAX_EXPIRY_AHEAD - _MARGIN
    if not floor <= expires_at <= ceiling:
        message["expires_at"] = _inside(expires_at, floor, ceiling - floor)


def _known_sender(message: dict[str, Any]) -> None:
    sender = message.get("sender")
    if isinstance(sender, str) and _SENDER.fullmatch(sender):
        message["sender"] = DEFAULT_SENDER


def _unique_ids(messages: list[Any]) -> None:
    seen: set[object] = set()
    for message in messages:
        if not isinstance(message, dict):
            continue
        key = message.get("client_message_id")
        if isinstance(key, str):
            if key in seen:
                message["client_message_id"] = None
            seen.add(key)


_SENDER_PATH = "/api/v1/whatsapp/senders/{sender_id}"
# The credentials a sender needs, by provider (outbox.senders.REQUIRED_SECRETS).
_CREDENTIALS = {"cloud": "access_token", "http": "secret"}


def _with_credential(body: dict[str, Any]) -> None:
    settings = body.get("settings")
    credential = _CREDENTIALS.get(str(body.get("provider")))
    if credential and isinstance(settings, dict) and settings.get(credential) is None:
        settings[credential] = "fuzz-credential"


@schemathesis.hook
def before_call(
    context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]
) -> None:
    body = case.body
    if case.method.upper() == "PUT" and case.path == _SENDER_PATH and isinstance(body, dict):
        _with_credential(body)
    if case.method.upper() != "POST" or not isinstance(body, dict):
        return
    now = datetime.now(UTC)
    if case.path in _SEND_PATHS:
        _into_windows(body, now)
        _known_sender(body)
    elif case.path == _BATCH_PATH and isinstance(body.get("messages"), list):
        for message in body["messages"]:
            if isinstance(message, dict):
                _into_windows(message, now)
                _known_sender(message)
        _unique_ids(body["messages"])


@schemathesis.hook
def filter_failure(
    context: schemathesis.HookContext,
    failure: Any,
    case: schemathesis.Case,
    response: schemathesis.Response,
) -> bool:
    if getattr(failure, "code", None) != "ST301":  # use_after_free
        return True
    if case.path != _MESSAGE_PATH or case.method.upper() != "GET" or response.status_code != 200:
        return True
    try:
        shown = json.loads(response.content).get("task_id")
    except (ValueError, AttributeError):
        return True
    return shown != (case.path_parameters or {}).get("task_id")
