"""Pydantic models of the API: request bodies, responses, and their normal form."""

from __future__ import annotations

import hashlib
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, NotRequired

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationInfo,
    field_validator,
)

# pydantic reads typing.TypedDict only from Python 3.12.
from typing_extensions import TypedDict

from outbox.states import DeliveryState, MessageStatus

MAX_SCHEDULE_AHEAD = timedelta(days=30)
MAX_EXPIRY_AHEAD = timedelta(days=365)
MAX_BATCH = 1000
ACCEPTED_MESSAGE = "Mensagem enfileirada para envio"


def _normalise_phone(value: str) -> str:
    digits = value[1:] if value.startswith("+") else value
    if not (digits.isascii() and digits.isdigit() and 8 <= len(digits) <= 15):
        raise ValueError("must be 8 to 15 digits, optionally after a leading '+'")
    return digits


def _no_nul(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold U+0000: refuse it here, not with a 500 there.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    return value


# Template components are passed through as the Cloud API defines them (a carousel of
# cards, each with buttons and parameters, nests 7 levels and holds a few hundred values):
# bounded so that one message cannot hold a large tree.
MAX_COMPONENTS_DEPTH = 10
MAX_COMPONENTS_VALUES = 2000


def _storable_json(value: Any) -> Any:
    """Free-form JSON (template components) that jsonb can store: no NUL, no NaN/Infinity,
    at most MAX_COMPONENTS_DEPTH levels and MAX_COMPONENTS_VALUES values."""
    budget = MAX_COMPONENTS_VALUES
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise ValueError(f"must hold at most {MAX_COMPONENTS_VALUES} JSON values")
        if isinstance(item, str):
            _no_nul(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite (no NaN or Infinity)")
        elif isinstance(item, int | float) and not -(2**63) <= item < 2**64:
            raise ValueError("numbers must fit in 64-bit integers' range")
        elif isinstance(item, dict | list):
            if depth > MAX_COMPONENTS_DEPTH:
                raise ValueError(f"must nest at most {MAX_COMPONENTS_DEPTH} levels deep")
            if isinstance(item, dict):
                for key in item:
                    _no_nul(key)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
    return value


# PostgreSQL's timestamptz takes UTC offsets up to ±15:59:59.
MAX_UTC_OFFSET = timedelta(hours=15, minutes=59, seconds=59)
_ISO_HINT = "an RFC 3339 date-time with a timezone, e.g. 2025-10-11T18:00:00Z"
# RFC 3339's date-time, as OpenAPI's `format: date-time` means it (the offset's range is
# checked by _utc_instant, with its own message).
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _datetime_text(value: Any) -> Any:
    """Only an RFC 3339 string: pydantic's lax mode would read 0 or "0" as 1970, and
    takes forms (a space for `T`, no seconds, `+0100`) that the document refuses."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError(f"must be {_ISO_HINT}")
    return value


def _utc_instant(value: datetime) -> datetime:
    """The same instant in UTC, refused when PostgreSQL could not store it."""
    offset = value.utcoffset()
    if offset is not None and abs(offset) > MAX_UTC_OFFSET:
        raise ValueError("UTC offset must be within ±15:59")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("must fall between years 1 and 9999 in UTC") from None


# The rules of these strings, as /openapi.json publishes them: JSON Schema patterns
# (ECMA-262), which pydantic's Rust regex reads alike. `\s` is spelled out (Unicode
# White_Space, what the link rule has always refused): each engine reads it differently.
NO_NUL_PATTERN = r"^[^\u0000]*$"
PHONE_PATTERN = r"^\+?[0-9]{8,15}$"
_WHITE_SPACE = r"\u0009-\u000d \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
LINK_PATTERN = rf"^https?://[^\u0000{_WHITE_SPACE}]+$"
# A sender's id (outbox/senders.py keeps the same rule for the senders it stores).
SENDER_PATTERN = r"^[a-z0-9_-]{1,64}$"
DEFAULT_SENDER = "default"
# A message's priority by name, and the column's value (0 is claimed first).
Priority = Literal["high", "normal", "low"]
PRIORITIES: dict[Priority, int] = {"high": 0, "normal": 1, "low": 2}
DEFAULT_PRIORITY: Priority = "normal"

# json_schema_extra: documented only; the validator enforces the rule.
Text = Annotated[str, AfterValidator(_no_nul), Field(json_schema_extra={"pattern": NO_NUL_PATTERN})]
Phone = Annotated[
    str,
    AfterValidator(_normalise_phone),
    Field(
        description="8 to 15 digits, optionally after a leading '+' (stored without it)",
        json_schema_extra={"pattern": PHONE_PATTERN},
    ),
]
Link = Annotated[str, Field(pattern=LINK_PATTERN, max_length=2048)]
SenderId = Annotated[
    str,
    Field(
        pattern=SENDER_PATTERN,
        description="The sender to send from (an admin creates senders under"
        " /api/v1/whatsapp/senders): 422 when there is none of that id, 403"
        " `sender_forbidden` when this token's `sub` may not send from it",
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class Language(_Strict):
    code: Text = Field(min_length=2, max_length=15)
    policy: Literal["deterministic"] | None = None


class Template(_Strict):
    name: Text = Field(min_length=1, max_length=512)
    language: Language
    # Passed through as the Cloud API defines them.
    components: Annotated[list[dict[str, Any]] | None, AfterValidator(_storable_json)] = None


class CaptionedMedia(_Strict):
    link: Link
    caption: Text | None = Field(default=None, max_length=1024)


class Document(CaptionedMedia):
    filename: Text | None = Field(default=None, min_length=1, max_length=240)


class Audio(_Strict):
    link: Link


# RFC 3339 allows offsets up to ±23:59; PostgreSQL stores up to ±15:59.
INSTANT_OFFSET_PATTERN = r"(?:[Zz]|[+-](?:0[0-9]|1[0-5]):[0-5][0-9])$"
Instant = Annotated[
    AwareDatetime,
    BeforeValidator(_datetime_text),
    AfterValidator(_utc_instant),
    Field(json_schema_extra={"pattern": INSTANT_OFFSET_PATTERN}),
]


class _Common(_Strict):
    to: Phone
    client_message_id: Text | None = Field(default=None, min_length=1, max_length=128)
    sender: SenderId = DEFAULT_SENDER
    priority: Priority = Field(
        default=DEFAULT_PRIORITY,
        description="Among a sender's due messages, higher priority is sent first (strict:"
        " a steady stream of `high` delays `low`); it never reorders a conversation",
    )
    ordered: StrictBool = Field(
        default=True,
        description="Sent only after the earlier ordered messages from this sender to this"
        " `to` (in acceptance order) are final; false: neither waits for them nor holds"
        " back later ones",
    )
    send_at: Instant | None = Field(
        default=None,
        description="When to send: RFC 3339 with a UTC offset within ±15:59, between years 1"
        f" and 9999 in UTC; at most {MAX_SCHEDULE_AHEAD.days} days ahead (422 beyond);"
        " in the past or absent: now",
    )
    expires_at: Instant | None = Field(
        default=None,
        description="Not sent after this instant (the message ends `error`, `expired`):"
        " RFC 3339 with a UTC offset within ±15:59; later than `send_at` and than now, at"
        f" most {MAX_EXPIRY_AHEAD.days} days ahead (422 otherwise)",
    )

    # Field validators (not a model validator) so that a 422 names the field.
    @field_validator("send_at")
    @classmethod
    def _check_send_at(cls, value: datetime | None) -> datetime | None:
        if value is not None and value - datetime.now(UTC) > MAX_SCHEDULE_AHEAD:
            raise ValueError("must be at most 30 days ahead")
        return value

    @field_validator("expires_at")
    @classmethod
    def _check_expires_at(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        if value is None:
            return value
        send_at = info.data.get("send_at")
        if send_at is not None and value <= send_at:
            raise ValueError("must be later than send_at")
        now = datetime.now(UTC)
        if value <= now:
            raise ValueError("must be in the future")
        if value - now > MAX_EXPIRY_AHEAD:
            raise ValueError("must be at most 365 days ahead")
        return value

    def content(self) -> dict[str, Any]:
        """The content of this message's type, as stored in `payload`."""
        raise NotImplementedError


class TextMessage(_Common):
    type: Literal["text"]
    text: Text = Field(min_length=1, max_length=4096)
    preview_url: StrictBool = False

    def content(self) -> dict[str, Any]:
        return {"body": self.text, "preview_url": self.preview_url}


class TemplateMessage(_Common):
    type: Literal["template"]
    template: Template

    def content(self) -> dict[str, Any]:
        return self.template.model_dump(exclude_none=True)


class ImageMessage(_Common):
    type: Literal["image"]
    image: CaptionedMedia

    def content(self) -> dict[str, Any]:
        return self.image.model_dump(exclude_none=True)


class VideoMessage(_Common):
    type: Literal["video"]
    video: CaptionedMedia

    def content(self) -> dict[str, Any]:
        return self.video.model_dump(exclude_none=True)


class DocumentMessage(_Common):
    type: Literal["document"]
    document: Document

    def content(self) -> dict[str, Any]:
        return self.document.model_dump(exclude_none=True)


class AudioMessage(_Common):
    type: Literal["audio"]
    audio: Audio

    def content(self) -> dict[str, Any]:
        return self.audio.model_dump(exclude_none=True)


AnyMessage = (
    TextMessage | TemplateMessage | ImageMessage | VideoMessage | DocumentMessage | AudioMessage
)
SendRequest = Annotated[AnyMessage, Field(discriminator="type")]


class BatchRequest(_Strict):
    messages: list[SendRequest] = Field(min_length=1, max_length=MAX_BATCH)


class BatchEnvelope(_Strict):
    """A batch body with its items not yet validated: the endpoint validates them in
    chunks, each while the database inserts the chunk before (same rules as
    BatchRequest, which documents the body). Items must be objects."""

    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH)


SEND_REQUEST = TypeAdapter[SendRequest](SendRequest)
BATCH_ENVELOPE = TypeAdapter(BatchEnvelope)
BATCH_ITEMS = TypeAdapter(list[SendRequest])


def request_hash(message: AnyMessage, content: dict[str, Any]) -> bytes:
    """A digest of the normalised request (`content` is message.content()): equal for a
    faithful resend."""
    normal: dict[str, Any] = {
        "to": message.to,
        "type": message.type,
        "content": content,
        "send_at": message.send_at.astimezone(UTC).isoformat() if message.send_at else None,
        "expires_at": message.expires_at.astimezone(UTC).isoformat()
        if message.expires_at
        else None,
    }
    # Only a sender other than the default: a request stored before messages named one
    # keeps the hash its replay computes now.
    if message.sender != DEFAULT_SENDER:
        normal["sender"] = message.sender
    # Likewise priority and ordered: only when not the default.
    if message.priority != DEFAULT_PRIORITY:
        normal["priority"] = message.priority
    if not message.ordered:
        normal["ordered"] = False
    return hashlib.sha256(orjson.dumps(normal, option=orjson.OPT_SORT_KEYS)).digest()


# Responses --------------------------------------------------------------------------


class SendResponse(BaseModel):
    message: str = ACCEPTED_MESSAGE
    task_id: str
    to: str
    client_message_id: str | None
    status: Literal[DeliveryState.QUEUED] = DeliveryState.QUEUED
    replayed: bool | None = Field(default=None, description="Set on batch items that replayed")


class BatchResponse(BaseModel):
    messages: list[SendResponse]


# Every MessageStatus, as a Literal: OpenAPI shows it inline (an enum of strings), not as
# a schema of its own.
Status = Literal[
    MessageStatus.PENDING,
    MessageStatus.IN_FLIGHT,
    MessageStatus.SENT,
    MessageStatus.ERROR,
    MessageStatus.CANCELLED,
]


class AttemptView(BaseModel):
    attempt: int
    started_at: str
    finished_at: str | None
    outcome: str
    error: str | None


class WaitingFor(TypedDict):
    """Why a pending message waits."""

    reason: Annotated[
        Literal["send_at", "retry", "earlier_message", "sender_paused", "rate_limit"],
        Field(
            description="send_at: scheduled later; retry: a retry's backoff; earlier_message:"
            " an earlier ordered message of its conversation is not final yet (`task_id`);"
            " sender_paused: its sender is paused; rate_limit: its sender's rate limit (a"
            " throttle's wait, with `until`, or an empty bucket)"
        ),
    ]
    until: NotRequired[
        Annotated[
            str | None,
            Field(
                description="When that wait ends: the send_at, the next attempt, a paused"
                " sender's next probe (null when paused by hand: until a resume)"
            ),
        ]
    ]
    task_id: NotRequired[
        Annotated[str, Field(description="earlier_message: the message it waits for")]
    ]


# A message's delivery: `accepted` (sent, no receipt yet), then as the provider's receipts
# tell (outbox/store/messages.py: DELIVERIES).
DeliveryName = Literal["accepted", "delivered", "read", "failed"]


class DeliveryError(TypedDict):
    """Why the provider could not deliver the message, as it said (Meta's error object:
    its code, title and details; a gateway's code and message)."""

    code: NotRequired[int | str | None]
    title: NotRequired[str | None]
    details: NotRequired[str | None]


class Delivery(BaseModel):
    """What the provider reported of a message it accepted (its delivery receipts)."""

    state: DeliveryName = Field(
        description="accepted: the provider took the message, no receipt yet; delivered: it"
        " reached the phone; read: the recipient read it; failed: the provider could not"
        " deliver it (`error` says why; the message stays `sent`). It only climbs: a late"
        " delivered after read stays read, a delivered or read after failed wins"
    )
    provider_sent_at: str | None = Field(
        description="When the provider says it sent the message (its `sent` status)"
    )
    delivered_at: str | None = Field(description="The provider's time of its delivered receipt")
    read_at: str | None = Field(description="The provider's time of its read receipt")
    failed_at: str | None = Field(
        description="The provider's time of its failed receipt (kept when a later delivered"
        " or read wins)"
    )
    error: DeliveryError | None = Field(
        description="With failed_at: the reason the provider gave; null otherwise"
    )


class ListedMessage(BaseModel):
    """A message as the list shows it: its attempts are in GET …/messages/{task_id}."""

    task_id: str
    status: Status
    to: str
    type: str
    client_message_id: str | None
    attempts: int
    max_attempts: int
    next_attempt_at: str | None
    send_at: str | None
    expires_at: str | None
    last_error: str | None
    provider_message_id: str | None
    created_at: str
    updated_at: str
    finished_at: str | None
    sender: str
    throttles: int = Field(
        description="Times the provider throttled it (its rate limit): each spent no attempt"
    )
    priority: Priority = Field(description="high, normal or low, as sent (default normal)")
    ordered: bool = Field(
        description="Sent only after the earlier ordered messages of its conversation"
        " (sender and `to`) are final"
    )
    waiting_for: WaitingFor | None = Field(
        description="Why a pending message is not being sent yet; null when it is not"
        " pending, or is due and waits only for a dispatcher"
    )
    delivery: Delivery | None = Field(
        description="Its delivery receipts; null before the provider accepted the message"
    )


class MessageView(ListedMessage):
    history: list[AttemptView] = Field(default_factory=list)


class MessageList(BaseModel):
    messages: list[ListedMessage]
    next_after: str | None = Field(description="Pass as `after` for the next page; null at the end")


class ErrorField(BaseModel):
    path: str
    message: str
    index: int | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    fields: list[ErrorField] | None = None
    index: int | None = Field(
        default=None, description="The batch item a 409 or a 403 (`sender_forbidden`) is about"
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


# Admin summary (GET /api/v1/admin/summary; built as JSON by the admin_summary query) ----


class StatusCount(BaseModel):
    count: int = Field(description="Rows in this status (a lower bound when `capped`)")
    capped: bool = Field(
        description="The count stopped reading after `cap` rows (sent and cancelled rows "
        "are read together: then both are lower bounds)"
    )
    cap: int
    oldest: str | None = Field(
        description="pending: earliest next_attempt_at; in_flight: earliest lease expiry; "
        "sent/error/cancelled: earliest finished_at"
    )
    due_now: int = Field(description="pending: due now; in_flight: lease expired")


class ThroughputMinute(BaseModel):
    minute: str
    sent: int
    failed: int


class LatencyMinute(BaseModel):
    minute: str
    calls: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


class FailureRow(BaseModel):
    task_id: str
    user_id: str
    to: str
    type: str
    attempts: int
    max_attempts: int
    finished_at: str | None
    last_error: str | None
    last_outcome: str | None
    sender: str


class WaitingRow(BaseModel):
    task_id: str
    user_id: str
    to: str
    type: str
    attempts: int
    max_attempts: int
    next_attempt_at: str
    created_at: str
    sender: str


class FunnelRow(BaseModel):
    """One sender's messages the provider accepted in the funnel's window (the view
    outbox.delivery_funnel's columns, over the whole window)."""

    sender: str
    accepted: int = Field(description="Messages sent (the provider accepted them)")
    delivered: int = Field(description="Of those, delivered (read ones included)")
    read: int
    failed: int = Field(description="Of those, failed after acceptance (no later delivered)")
    median_seconds_to_delivered: float | None = Field(
        description="From acceptance to the delivered receipt (the provider's clock against"
        " ours); null without one"
    )
    median_seconds_to_read: float | None = Field(
        description="From acceptance to the read receipt; null without one"
    )


class DeliveryFunnel(BaseModel):
    since: str = Field(
        description="The window's start: the hour 23 hours before this one, or, when"
        " `capped`, the acceptance of the oldest message read"
    )
    capped: bool = Field(
        description="The window held more than `cap` accepted messages: the newest `cap` were read"
    )
    cap: int
    senders: list[FunnelRow] = Field(description="Per sender with messages in the window")


class AdminSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generated_at: str
    counts: dict[Status, StatusCount]
    throughput: list[ThroughputMinute] = Field(description="Every minute of the last hour")
    provider_latency: list[LatencyMinute] = Field(description="Minutes with provider calls")
    recent_failures: list[FailureRow] = Field(description="Latest final failures, newest first")
    waiting: list[WaitingRow] = Field(description="Pending messages, next due first")
    delivery_funnel: DeliveryFunnel = Field(
        description="Delivery receipts per sender over the last 24 hours"
    )


def iso_utc(value: datetime | None) -> str | None:
    """UTC, ISO 8601 with milliseconds and `Z`: the one timestamp format on the wire."""
    if value is None:
        return None
    # Formatted by hand: strftime's %Y writes year 999 as "999", not "0999".
    v = value.astimezone(UTC)
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}"
        f".{v.microsecond // 1000:03d}Z"
    )
