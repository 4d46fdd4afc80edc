"""Pydantic models of the API: request bodies, responses, and their normal form."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationInfo,
    field_validator,
)

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


def _storable_json(value: Any) -> Any:
    """Free-form JSON (template components) that jsonb can store: no NUL, no NaN/Infinity."""
    if isinstance(value, str):
        _no_nul(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite (no NaN or Infinity)")
    elif isinstance(value, int) and not -(2**63) <= value < 2**64:
        raise ValueError("integers must fit in 64 bits")
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable_json(key)
            _storable_json(item)
    elif isinstance(value, list):
        for item in value:
            _storable_json(item)
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
Phone = Annotated[str, AfterValidator(_normalise_phone)]
Link = Annotated[Text, Field(pattern=r"^https?://\S+$", max_length=2048)]


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


class _Common(_Strict):
    to: Phone
    client_message_id: Text | None = Field(default=None, min_length=1, max_length=128)
    send_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None

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
    preview_url: bool = False

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
    BatchRequest, which documents the body)."""

    messages: list[Any] = Field(min_length=1, max_length=MAX_BATCH)


SEND_REQUEST = TypeAdapter[SendRequest](SendRequest)
BATCH_ENVELOPE = TypeAdapter(BatchEnvelope)
BATCH_ITEMS = TypeAdapter(list[SendRequest])


def request_hash(message: AnyMessage, content: dict[str, Any]) -> bytes:
    """A digest of the normalised request (`content` is message.content()): equal for a
    faithful resend."""
    normal = {
        "to": message.to,
        "type": message.type,
        "content": content,
        "send_at": message.send_at.astimezone(UTC).isoformat() if message.send_at else None,
        "expires_at": message.expires_at.astimezone(UTC).isoformat()
        if message.expires_at
        else None,
    }
    return hashlib.sha256(orjson.dumps(normal, option=orjson.OPT_SORT_KEYS)).digest()


# Responses --------------------------------------------------------------------------


class SendResponse(BaseModel):
    message: str = ACCEPTED_MESSAGE
    task_id: str
    to: str
    client_message_id: str | None
    status: Literal["queued"] = "queued"
    replayed: bool | None = Field(default=None, description="Set on batch items that replayed")


class BatchResponse(BaseModel):
    messages: list[SendResponse]


Status = Literal["pending", "in_flight", "sent", "error", "cancelled"]


class AttemptView(BaseModel):
    attempt: int
    started_at: str
    finished_at: str | None
    outcome: str
    error: str | None


class MessageView(BaseModel):
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
    history: list[AttemptView] = Field(default_factory=list)


class MessageList(BaseModel):
    messages: list[MessageView]
    next_after: str | None = Field(description="Pass as `after` for the next page; null at the end")


class ErrorField(BaseModel):
    path: str
    message: str
    index: int | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    fields: list[ErrorField] | None = None
    index: int | None = Field(default=None, description="The batch item a 409 is about")


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


class WaitingRow(BaseModel):
    task_id: str
    user_id: str
    to: str
    type: str
    attempts: int
    max_attempts: int
    next_attempt_at: str
    created_at: str


class AdminSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generated_at: str
    counts: dict[Status, StatusCount]
    throughput: list[ThroughputMinute] = Field(description="Every minute of the last hour")
    provider_latency: list[LatencyMinute] = Field(description="Minutes with provider calls")
    recent_failures: list[FailureRow] = Field(description="Latest final failures, newest first")
    waiting: list[WaitingRow] = Field(description="Pending messages, next due first")


def iso_utc(value: datetime | None) -> str | None:
    """UTC, ISO 8601 with milliseconds and `Z`: the one timestamp format on the wire."""
    if value is None:
        return None
    return (
        value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    )
