"""Delivery receipts from providers: webhooks authenticated by signature, not by JWT.

- `GET /webhooks/whatsapp`: Meta's verification handshake (`hub.mode=subscribe`,
  `hub.verify_token` = OUTBOX_CLOUD_VERIFY_TOKEN → `hub.challenge` as plain text; else 403).
- `POST /webhooks/whatsapp`: Meta's status notifications, signed `X-Hub-Signature-256:
  sha256=<hex HMAC-SHA256 of the raw body>` with an app secret: OUTBOX_CLOUD_APP_SECRET
  (any sender's messages) or a cloud sender's `app_secret` (that sender's messages only).
- `POST /webhooks/http`: a self-hosted gateway's receipts, signed `X-Outbox-Signature-256:
  t=<unix seconds>,v1=<hex HMAC-SHA256 of t + "." + body>` with an http sender's `secret`
  (the scheme of outbox's own calls to it: outbox/providers/http.py), `t` within 5 minutes.

Each POST is read within OUTBOX_WEBHOOK_MAX_BYTES (413 while reading), its signature checked
over the raw bytes with constant-time compares before anything is parsed (401 and nothing
recorded otherwise), then all its receipts are recorded in one transaction with their
`message_status` events (store.receipts, sql/migrations/018_delivery_receipts.sql): no
provider call, an answer within milliseconds. Meta's shapes are read leniently (what does
not fit is acknowledged and counted, never a 500); the gateway's body is validated
strictly (422). Receipts for ids unknown here, Meta's inbound messages and other fields are
acknowledged with 200, counted in outbox_receipts_total, and logged once per process.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Annotated, Any, Literal, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from outbox import models
from outbox.body import PARSE_INLINE_BYTES
from outbox.errors import ApiError, validation_fields
from outbox.log import get_logger
from outbox.providers.http import TIMESTAMPED_SIGNATURE_HEADER, sign, sign_timestamped
from outbox.senders import SENDER_ID_PATTERN
from outbox.services import Services, services_of
from outbox.store import Receipt, ReceiptMatch, ReceiptStatus

log = get_logger("outbox.webhooks")

WHATSAPP_PATH = "/webhooks/whatsapp"
HTTP_PATH = "/webhooks/http"
HUB_SIGNATURE_HEADER = "X-Hub-Signature-256"
GATEWAY_SIGNATURE_HEADER = TIMESTAMPED_SIGNATURE_HEADER  # X-Outbox-Signature-256
# A gateway's signature older (or further ahead) than this is refused: a captured POST
# cannot be replayed later (one replayed sooner changes nothing: receipts are idempotent).
MAX_SIGNATURE_AGE = 300
# Bounds of what is stored from a receipt: longer ids match nothing here (and could not
# be indexed), longer texts are cut; times beyond year 9999 do not fit a timestamptz.
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 1024
MAX_TIMESTAMP = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_GATEWAY_STATUSES = 10_000
GATEWAY_JSON_VALUES = MAX_GATEWAY_STATUSES * 16
STATUSES: frozenset[str] = frozenset({"sent", "delivered", "read", "failed"})

# What a POST carried besides receipts (the `ignored` outcome), by kind.
INBOUND = "inbound_message"  # value.messages: a user wrote to the business number
OTHER_FIELD = "other_field"  # a change of another field (templates, account updates…)
OTHER_STATUS = "other_status"  # a status of another kind ("played", …)
MALFORMED = "malformed"  # a part that fits no shape known here
_IGNORED_NOTES = {
    INBOUND: "inbound messages are acknowledged, not recorded (outbox only sends)",
    OTHER_FIELD: "changes of fields other than `messages` are acknowledged, not recorded",
    OTHER_STATUS: "statuses other than sent, delivered, read and failed are acknowledged,"
    " not recorded",
    MALFORMED: "parts of a notification that fit no known shape are acknowledged, not recorded",
}

# Kinds already logged by this process: each is logged the first time, then only counted.
_logged: set[str] = set()


def _log_once(key: str, event: str, **fields: Any) -> None:
    if key in _logged:
        return
    _logged.add(key)
    log.info(event, **fields, note="logged once per process; outbox_receipts_total counts them")


def _not_authentic(reason: str) -> ApiError:
    return ApiError(401, reason)


async def _read_body(request: Request, limit: int) -> bytearray:
    """The raw body, counted while it is read: 413 past `limit`, never buffered beyond it."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body larger than {limit} bytes (OUTBOX_WEBHOOK_MAX_BYTES)")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise ApiError(413, f"body larger than {limit} bytes (OUTBOX_WEBHOOK_MAX_BYTES)")
        body += chunk
    return body


async def _off_loop(body: bytearray, keys: int, work: Callable[[], Any]) -> Any:
    """`work` (HMACs or a parse over `body`) on the loop when small, else in a thread."""
    if len(body) * max(keys, 1) <= PARSE_INLINE_BYTES:
        return work()
    return await asyncio.to_thread(work)


def _hex_digest(value: str) -> bytes | None:
    """A SHA-256 hex digest as given (any case), or None when it is not one."""
    value = value.strip().lower()
    if len(value) != 64 or not value.isascii() or any(c not in "0123456789abcdef" for c in value):
        return None
    return value.encode()


# Signatures -------------------------------------------------------------------------


def cloud_secrets(services: Services) -> dict[str, frozenset[str] | None]:
    """Each Meta app secret known → the senders whose messages its notifications may
    concern (None: any, for OUTBOX_CLOUD_APP_SECRET). Senders of one Meta app share its
    secret: one HMAC per secret, whatever the number of senders."""
    by_secret: dict[str, set[str]] = {}
    for sender in services.senders.senders.values():
        secret = sender.secrets.get("app_secret")
        if sender.config.provider == "cloud" and secret:
            by_secret.setdefault(secret, set()).add(sender.id)
    secrets: dict[str, frozenset[str] | None] = {
        secret: frozenset(ids) for secret, ids in by_secret.items()
    }
    if services.settings.cloud_app_secret:
        secrets[services.settings.cloud_app_secret] = None
    return secrets


def gateway_secrets(services: Services) -> dict[str, frozenset[str]]:
    """Each http sender's secret known → the senders that have it (`default`'s is
    OUTBOX_PROVIDER_SECRET when OUTBOX_PROVIDER=http)."""
    by_secret: dict[str, set[str]] = {}
    for sender in services.senders.senders.values():
        secret = sender.secrets.get("secret")
        if sender.config.provider == "http" and secret:
            by_secret.setdefault(secret, set()).add(sender.id)
    return {secret: frozenset(ids) for secret, ids in by_secret.items()}


def hub_signature_senders(
    body: bytes | bytearray, header: str, secrets: Mapping[str, frozenset[str] | None]
) -> tuple[bool, frozenset[str] | None]:
    """(whether `header`, `sha256=<hex>`, signs `body` under one of `secrets`, the senders
    allowed: None for any). Every secret is tried, each compare in constant time."""
    scheme, _, given = header.strip().partition("=")
    digest = _hex_digest(given) if scheme.strip().lower() == "sha256" else None
    if digest is None:
        return False, frozenset()
    matched = False
    allowed: set[str] | None = set()
    for secret, senders in secrets.items():
        expected = sign(secret, bytes(body)).removeprefix("sha256=").encode()
        if hmac.compare_digest(expected, digest):
            matched = True
            if senders is None:
                allowed = None
            elif allowed is not None:
                allowed |= senders
    return matched, (None if allowed is None else frozenset(allowed))


def parse_timestamped(header: str) -> tuple[int, list[bytes]] | None:
    """`t=<unix seconds>,v1=<hex>[,v1=<hex>…]` → (t, the v1 digests), None if malformed."""
    timestamp: int | None = None
    digests: list[bytes] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        value = value.strip()
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1":
            digest = _hex_digest(value)
            if digest is not None:
                digests.append(digest)
    if timestamp is None or not digests:
        return None
    return timestamp, digests


def timestamped_senders(
    body: bytes | bytearray,
    timestamp: int,
    digests: Sequence[bytes],
    secrets: Mapping[str, frozenset[str]],
) -> frozenset[str]:
    """The senders whose secret signed `timestamp` and `body` (one of `digests`)."""
    allowed: set[str] = set()
    for secret, senders in secrets.items():
        signed = sign_timestamped(secret, bytes(body), timestamp)
        expected = signed.partition(",v1=")[2].encode()
        # Every digest compared, in constant time each: no early exit that tells which.
        if sum(hmac.compare_digest(expected, digest) for digest in digests):
            allowed |= senders
    return frozenset(allowed)


# Meta's notifications ----------------------------------------------------------------


def _unix_seconds(value: object) -> float | None:
    """Meta's `timestamp` (a string of unix seconds; a number accepted too)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) and 0 <= seconds <= MAX_TIMESTAMP else None


def _identifier(value: object) -> str | None:
    """An id that may name a message here: a non-empty string, no NUL, not too long."""
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > MAX_ID_CHARS:
        return None
    return value


def _text(value: object) -> str | None:
    """A text of the provider's, storable (jsonb refuses NUL) and bounded."""
    if not isinstance(value, str):
        return None
    return value.replace("\x00", "")[:MAX_TEXT_CHARS]


def _code(value: object) -> int | str | None:
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value
    return _text(value)


def cloud_error(errors: object) -> dict[str, Any] | None:
    """Meta's `errors[0]` as `{"code", "title", "details"}` (details: error_data.details)."""
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return None
    first = errors[0]
    data = first.get("error_data")
    return {
        "code": _code(first.get("code")),
        "title": _text(first.get("title")),
        "details": _text(data.get("details")) if isinstance(data, dict) else None,
    }


def _cloud_status(status: object) -> Receipt | str:
    """One of `value.statuses` as a receipt, or the kind of thing it is instead."""
    if not isinstance(status, dict):
        return MALFORMED
    kind = status.get("status")
    if not isinstance(kind, str) or kind not in STATUSES:
        return OTHER_STATUS if isinstance(kind, str) else MALFORMED
    at = _unix_seconds(status.get("timestamp"))
    task_id = _identifier(status.get("biz_opaque_callback_data"))
    provider_id = _identifier(status.get("id"))
    if at is None or (task_id is None and provider_id is None):
        return MALFORMED
    error = cloud_error(status.get("errors")) if kind == "failed" else None
    return Receipt(cast(ReceiptStatus, kind), at, task_id, provider_id, error)


def cloud_receipts(document: object) -> tuple[list[Receipt], Counter[str]]:
    """The receipts of one Meta notification, and what else it held, by kind (as many
    as inbound messages, changes of other fields, statuses of other kinds and parts that
    fit no shape known here)."""
    receipts: list[Receipt] = []
    ignored: Counter[str] = Counter()
    entries = document.get("entry") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        ignored[MALFORMED] += 1
        return receipts, ignored
    for entry in entries:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(changes, list):
            ignored[MALFORMED] += 1
            continue
        for change in changes:
            if not isinstance(change, dict):
                ignored[MALFORMED] += 1
                continue
            if change.get("field") != "messages":
                ignored[OTHER_FIELD] += 1
                continue
            value = change.get("value")
            if not isinstance(value, dict):
                ignored[MALFORMED] += 1
                continue
            inbound = value.get("messages")
            if isinstance(inbound, list):
                ignored[INBOUND] += len(inbound)
            statuses = value.get("statuses")
            if statuses is None:
                if not isinstance(inbound, list):
                    ignored[MALFORMED] += 1  # e.g. value.errors: Meta's own failures
                continue
            if not isinstance(statuses, list):
                ignored[MALFORMED] += 1
                continue
            for status in statuses:
                read = _cloud_status(status)
                if isinstance(read, Receipt):
                    receipts.append(read)
                else:
                    ignored[read] += 1
    return receipts, ignored


# A self-hosted gateway's receipts ----------------------------------------------------

_Identifier = Annotated[models.Text, Field(min_length=1, max_length=MAX_ID_CHARS)]


class GatewayError(BaseModel):
    """Why a message was not delivered: the gateway's code (a number or a word) and text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    code: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | _Identifier
    message: Annotated[models.Text, Field(max_length=MAX_TEXT_CHARS)] | None = None


class GatewayStatus(BaseModel):
    """One status of one message: named by outbox's `task_id` (as the call carried it) or
    by the gateway's own `id` (the one its answer to the call gave)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    task_id: _Identifier | None = None
    id: _Identifier | None = None
    status: Literal["delivered", "read", "failed"]
    timestamp: float = Field(ge=0, le=MAX_TIMESTAMP, description="unix seconds")
    error: GatewayError | None = None

    @model_validator(mode="after")
    def _named(self) -> GatewayStatus:
        if self.task_id is None and self.id is None:
            raise ValueError("needs task_id or id")
        return self


class GatewayReceipts(BaseModel):
    """`POST /webhooks/http`'s body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sender: str = Field(pattern=SENDER_ID_PATTERN)
    statuses: list[GatewayStatus] = Field(max_length=MAX_GATEWAY_STATUSES)


GATEWAY_RECEIPTS = TypeAdapter(GatewayReceipts)


def gateway_receipt(status: GatewayStatus) -> Receipt:
    error = None
    if status.status == "failed" and status.error is not None:
        # One shape for both sources: Meta's {"code", "title", "details"}.
        error = {"code": status.error.code, "title": status.error.message, "details": None}
    return Receipt(status.status, status.timestamp, status.task_id, status.id, error)


# Recording ---------------------------------------------------------------------------


async def _record(
    services: Services,
    source: str,
    receipts: Sequence[Receipt],
    senders: Collection[str] | None,
    ignored: Counter[str],
) -> Response:
    """One transaction for the POST's receipts; counted, first kinds logged; the answer."""
    matches: list[ReceiptMatch] = await services.store.receipts.record(receipts, senders)
    unknown = sum(1 for match in matches if match.message_id is None)
    recorded = len(matches) - unknown
    dropped = sum(ignored.values())
    services.metrics.receipts(source, recorded=recorded, unknown=unknown, ignored=dropped)
    if unknown:
        _log_once(
            f"{source}:unknown",
            "receipts for messages unknown here acknowledged",
            source=source,
            count=unknown,
            hint="another system's messages, purged ones, or a sender's secret shared"
            " with another app",
        )
    for kind, count in ignored.items():
        _log_once(f"{source}:{kind}", _IGNORED_NOTES[kind], source=source, count=count)
    return Response(
        orjson.dumps({"recorded": recorded, "unknown": unknown, "ignored": dropped}),
        media_type="application/json",
    )


# Routes ------------------------------------------------------------------------------


async def whatsapp_handshake(request: Request) -> Response:
    params = request.query_params
    expected = services_of(request).settings.cloud_verify_token
    given = params.get("hub.verify_token", "")
    if not (
        expected
        and params.get("hub.mode") == "subscribe"
        and hmac.compare_digest(
            given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
        )
    ):
        raise ApiError(403, "verification refused: hub.mode or hub.verify_token does not match")
    return PlainTextResponse(params.get("hub.challenge", ""))


async def whatsapp_notification(request: Request) -> Response:
    services = services_of(request)
    body = await _read_body(request, services.settings.webhook_max_bytes)
    header = request.headers.get(HUB_SIGNATURE_HEADER)
    if not header:
        raise _not_authentic(f"missing {HUB_SIGNATURE_HEADER}")
    secrets = cloud_secrets(services)
    if not secrets and not services.senders.loaded.is_set():
        await services.senders.reread()  # at start, before the stored senders were read
        secrets = cloud_secrets(services)
    if not secrets:
        raise _not_authentic(
            "no app secret configured: set OUTBOX_CLOUD_APP_SECRET or a cloud sender's app_secret"
        )
    matched, allowed = await _off_loop(
        body, len(secrets), lambda: hub_signature_senders(body, header, secrets)
    )
    if not matched:
        raise _not_authentic(f"{HUB_SIGNATURE_HEADER} does not sign this body with a known secret")
    try:
        document = await _off_loop(body, 1, lambda: orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc.msg}") from exc
    receipts, ignored = cloud_receipts(document)
    return await _record(services, "whatsapp", receipts, allowed, ignored)


async def whatsapp(request: Request) -> Response:
    if request.method == "POST":
        return await whatsapp_notification(request)
    return await whatsapp_handshake(request)


async def gateway_notification(request: Request) -> Response:
    services = services_of(request)
    body = await _read_body(request, services.settings.webhook_max_bytes)
    header = request.headers.get(TIMESTAMPED_SIGNATURE_HEADER)
    if not header:
        raise _not_authentic(f"missing {TIMESTAMPED_SIGNATURE_HEADER}")
    parsed = parse_timestamped(header)
    if parsed is None:
        raise _not_authentic(f"{TIMESTAMPED_SIGNATURE_HEADER} is not t=<unix seconds>,v1=<hex>")
    timestamp, digests = parsed
    if abs(time.time() - timestamp) > MAX_SIGNATURE_AGE:
        raise _not_authentic(
            f"{TIMESTAMPED_SIGNATURE_HEADER}'s t is more than {MAX_SIGNATURE_AGE} s from now"
        )
    secrets = gateway_secrets(services)
    if not secrets and not services.senders.loaded.is_set():
        await services.senders.reread()
        secrets = gateway_secrets(services)
    allowed = await _off_loop(
        body, len(secrets), lambda: timestamped_senders(body, timestamp, digests, secrets)
    )
    if not allowed:
        raise _not_authentic(
            f"{TIMESTAMPED_SIGNATURE_HEADER} does not sign this body with a known http"
            " sender's secret"
        )
    try:
        receipts = await services.bodies.parse(
            body, GATEWAY_RECEIPTS, GATEWAY_JSON_VALUES, "a receipts body"
        )
    except ValidationError as exc:
        raise ApiError(422, "invalid receipts", fields=validation_fields(exc)) from exc
    if receipts.sender not in allowed:
        raise _not_authentic(f"sender {receipts.sender!r}'s secret did not sign this body")
    return await _record(
        services,
        "http",
        [gateway_receipt(status) for status in receipts.statuses],
        [receipts.sender],
        Counter(),
    )


ROUTES = [
    # One route for both methods, so that a 405 names them both in `Allow`.
    Route(WHATSAPP_PATH, whatsapp, methods=["GET", "POST"]),
    Route(HTTP_PATH, gateway_notification, methods=["POST"]),
]
