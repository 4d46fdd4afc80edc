"""HTTP routes of `outbox serve`: send, batch, inspect, cancel, health."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import orjson
import uuid_utils
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outbox import dashboard, db, models, senders_api, webhooks
from outbox.auth import Principal, TokenVerifier
from outbox.body import BodyReader
from outbox.cancellation import cancel_and_wait
from outbox.errors import (
    EXCEPTION_HANDLERS,
    ApiError,
    error_response,
    unavailable,
    validation_fields,
)
from outbox.feed import Feed
from outbox.ingest import InsertCoalescer
from outbox.log import get_logger, mask_phone
from outbox.metrics import UNMATCHED, ApiMetrics, QueueGauges, render
from outbox.sender_access import check_senders
from outbox.sender_directory import SenderDirectory
from outbox.services import SERVICES, Services, authenticate, require_admin, services_of
from outbox.settings import Settings
from outbox.states import LIVE_STATUSES, DeliveryState, MessageStatus
from outbox.store import Conflict, Inserted, ListedRow, MessageRow, NewMessage, Store
from outbox.store.messages import ACCEPTED, DELIVERIES, DELIVERY_STATES

log = get_logger("outbox.api")

BATCH_BODY_FACTOR = 16
# JSON values a large body may hold (outbox/body.py): a message with the largest
# template components, and a batch of 1,000 messages of 200 values each on average.
MESSAGE_JSON_VALUES = models.MAX_COMPONENTS_VALUES + 100
BATCH_JSON_VALUES = models.MAX_BATCH * 200
LIST_LIMIT_MAX = 500
LIST_LIMIT_DEFAULT = 50
STATUSES = tuple(MessageStatus)
CLIENT_CLOSED = 499  # the request log's status for a client that left mid-request
LIST_PARAMETERS = (
    "status",
    "limit",
    "after",
    "client_message_id",
    "sender",
    "priority",
    "delivery",
)
_DELIVERY_NAMES = {value: name for name, value in DELIVERY_STATES.items()}
_SENDER = re.compile(models.SENDER_PATTERN.removeprefix("^").removesuffix("$"))
# The admin summary: where its counts stop (index-only counts of pending, in-flight and
# errored rows; sent and cancelled rows, read from the heap: see the admin_summary
# query), and how many recent failures and waiting messages it lists.
SUMMARY_COUNT_CAP = 100_000
SUMMARY_DONE_CAP = 20_000
SUMMARY_ROWS = 20


class OrjsonResponse(JSONResponse):
    """JSON rendered by orjson: several times faster than the json module."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _new_message(message: models.AnyMessage) -> NewMessage:
    content = message.content()
    return NewMessage(
        id=str(uuid_utils.uuid7()),  # the Rust type's text form: a fraction of the stdlib's cost
        client_message_id=message.client_message_id,
        to=message.to,
        type=message.type,
        payload=content,
        request_hash=models.request_hash(message, content),
        send_at=message.send_at,
        expires_at=message.expires_at,
        sender=message.sender,
        priority=models.PRIORITIES[message.priority],
        ordered=message.ordered,
    )


def _accepted(
    inserted: Inserted, message: NewMessage | models.AnyMessage, *, batch: bool = False
) -> dict[str, Any]:
    """The answer for one accepted message (a batch item says when it replayed)."""
    accepted: dict[str, Any] = {
        "message": models.ACCEPTED_MESSAGE,
        "task_id": inserted.id,
        "to": message.to,
        "client_message_id": message.client_message_id,
        "status": DeliveryState.QUEUED,
    }
    if batch and inserted.replayed:
        accepted["replayed"] = True
    return accepted


def _conflict(client_message_id: str | None, index: int | None = None) -> ApiError:
    where = f"item {index}: " if index is not None else ""
    return ApiError(
        409,
        f"{where}client_message_id {client_message_id!r} already names a different message",
        extra={"index": index} if index is not None else None,
    )


async def send(request: Request) -> Response:
    principal = authenticate(request)
    services = services_of(request)
    body = await services.bodies.read(request, services.settings.max_body_bytes)
    try:
        message = await services.bodies.parse(
            body, models.SEND_REQUEST, MESSAGE_JSON_VALUES, "a message"
        )
    except ValidationError as exc:
        raise ApiError(422, "invalid message", fields=validation_fields(exc)) from exc
    await check_senders(services.senders, principal, [message.sender], batch=False)
    new = _new_message(message)
    inserted = await services.ingest.insert(principal.user_id, new)
    if inserted is None:
        raise _conflict(new.client_message_id)
    request.state.message_id = str(inserted.id)
    request.state.to = mask_phone(new.to)
    services.metrics.accepted("single", new.sender)
    headers = {"Idempotent-Replayed": "true"} if inserted.replayed else None
    return OrjsonResponse(_accepted(inserted, new), status_code=202, headers=headers)


async def send_batch(request: Request) -> Response:
    """All the batch validated, then inserted in one transaction, then answered."""
    principal = authenticate(request)
    services = services_of(request)
    bodies = services.bodies
    body = await bodies.read(request, services.settings.max_body_bytes * BATCH_BODY_FACTOR)
    try:
        envelope = await bodies.parse(body, models.BATCH_ENVELOPE, BATCH_JSON_VALUES, "a batch")
    except ValidationError as exc:
        raise ApiError(422, "invalid batch", fields=validation_fields(exc, batch=True)) from exc
    del body  # the items are parsed: the bytes need not outlive them
    items = _batch_items(envelope.messages)
    senders = [item.sender for item in items]
    await check_senders(services.senders, principal, senders, batch=True)
    user_id = principal.user_id
    # Built as the store takes them, a statement's worth at a time: while PostgreSQL
    # inserts one chunk, the next one's ids and request hashes are computed.
    rows = ((user_id, _new_message(item)) for item in items)
    try:
        results = await services.store.messages.insert_batch(rows, services.settings.max_attempts)
    except Conflict as exc:
        raise _conflict(items[exc.index].client_message_id, exc.index) from exc
    answers = [
        _accepted(result, item, batch=True) for item, result in zip(items, results, strict=True)
    ]
    request.state.batch_size = len(answers)
    for sender, count in Counter(senders).items():
        services.metrics.accepted("batch", sender, count)
    return OrjsonResponse({"messages": answers}, status_code=202)


def _batch_items(raw: list[dict[str, Any]]) -> list[models.AnyMessage]:
    """The batch's items validated, or 422 naming every bad item (by its index); then every
    client_message_id that repeats one of an earlier item."""
    try:
        items = models.BATCH_ITEMS.validate_python(raw)
    except ValidationError as exc:
        raise ApiError(422, "invalid batch", fields=validation_fields(exc, items_from=0)) from exc
    repeated: list[dict[str, Any]] = []
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.client_message_id is None:
            continue
        if item.client_message_id in first_seen:
            first = first_seen[item.client_message_id]
            repeated.append(
                {
                    "index": index,
                    "path": "client_message_id",
                    "message": f"repeats the client_message_id of item {first}",
                }
            )
        else:
            first_seen[item.client_message_id] = index
    if repeated:
        raise ApiError(422, "invalid batch", fields=repeated)
    return items


# A task id as the API writes it (uuid.UUID alone also reads `{…}`, `urn:uuid:…` and
# bare hex, which OpenAPI's `format: uuid` refuses).
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


def _uuid(text: str) -> uuid.UUID:
    if not _UUID.fullmatch(text):
        raise ValueError("not a UUID in its 8-4-4-4-12 form")
    return uuid.UUID(text)


def _parse_task_id(request: Request) -> uuid.UUID:
    try:
        return _uuid(request.path_params["task_id"])
    except ValueError as exc:
        raise ApiError(404, "no such message") from exc


def _iso_from_json(value: str | None) -> str | None:
    return models.iso_utc(datetime.fromisoformat(value)) if value else None


def listed_message(row: ListedRow) -> dict[str, Any]:
    return {
        "task_id": str(row.id),
        "status": row.status,
        "to": row.to,
        "type": row.type,
        "client_message_id": row.client_message_id,
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "next_attempt_at": (
            models.iso_utc(row.next_attempt_at) if row.status in LIVE_STATUSES else None
        ),
        "send_at": models.iso_utc(row.send_at),
        "expires_at": models.iso_utc(row.expires_at),
        "last_error": row.last_error,
        "provider_message_id": row.provider_message_id,
        "created_at": models.iso_utc(row.created_at),
        "updated_at": models.iso_utc(row.updated_at),
        "finished_at": models.iso_utc(row.finished_at),
        "sender": row.sender,
        "throttles": row.throttles,
        "priority": row.priority,
        "ordered": row.ordered,
        "waiting_for": row.waiting_for,
        "delivery": _delivery(row),
    }


def _delivery(row: ListedRow) -> dict[str, Any] | None:
    """Its receipts; None before the provider accepted it (not sent, no receipt, and no
    `sent` status from the provider)."""
    if (
        row.delivery_state is None
        and row.status != MessageStatus.SENT
        and row.provider_sent_at is None
    ):
        return None
    return {
        "state": ACCEPTED if row.delivery_state is None else _DELIVERY_NAMES[row.delivery_state],
        "provider_sent_at": models.iso_utc(row.provider_sent_at),
        "delivered_at": models.iso_utc(row.delivered_at),
        "read_at": models.iso_utc(row.read_at),
        "failed_at": models.iso_utc(row.failed_at),
        "error": row.delivery_error,
    }


def message_view(row: MessageRow) -> dict[str, Any]:
    view = listed_message(row)
    view["history"] = [
        {
            "attempt": attempt["attempt"],
            "started_at": _iso_from_json(attempt["started_at"]),
            "finished_at": _iso_from_json(attempt["finished_at"]),
            "outcome": attempt["outcome"],
            "error": attempt["error"],
        }
        for attempt in row.history
    ]
    return view


def _owner_filter(principal: Principal) -> str | None:
    return None if principal.is_admin else principal.user_id


async def get_message(request: Request) -> Response:
    principal = authenticate(request)
    task_id = _parse_task_id(request)
    request.state.message_id = str(task_id)
    row = await services_of(request).store.messages.get(task_id, _owner_filter(principal))
    if row is None:
        raise ApiError(404, "no such message")
    return OrjsonResponse(message_view(row))


async def cancel_message(request: Request) -> Response:
    principal = authenticate(request)
    task_id = _parse_task_id(request)
    request.state.message_id = str(task_id)
    store = services_of(request).store
    owner = _owner_filter(principal)
    cancelled = await store.messages.cancel(task_id, owner)
    row = await store.messages.get(task_id, owner)
    if row is None:
        raise ApiError(404, "no such message")
    if not cancelled:  # DESIGN.md: only a message still pending; 409 otherwise (a repeat too)
        raise ApiError(409, f"message is {row.status}: only a pending message can be cancelled")
    return OrjsonResponse(message_view(row))


async def message(request: Request) -> Response:
    if request.method == "DELETE":
        return await cancel_message(request)
    return await get_message(request)


async def retry_message(request: Request) -> Response:
    require_admin(request)
    task_id = _parse_task_id(request)
    request.state.message_id = str(task_id)
    store = services_of(request).store
    row = await store.messages.retry(task_id, services_of(request).settings.max_attempts)
    if row is not None:
        return OrjsonResponse(message_view(row))
    row = await store.messages.get(task_id, None)
    if row is None:
        raise ApiError(404, "no such message")
    if row.status in (MessageStatus.ERROR, MessageStatus.CANCELLED):
        # Refused for its sender, deleted since (read from the database, not the cached
        # senders), or else for its expiry.
        if not await store.messages.sender_exists(row.sender):
            raise ApiError(
                409,
                f"message's sender {row.sender!r} no longer exists: create it again"
                f" (PUT /api/v1/whatsapp/senders/{row.sender}) before retrying",
            )
        expired = models.iso_utc(row.expires_at)
        raise ApiError(409, f"message expired at {expired}: a retry would only expire again")
    raise ApiError(
        409, f"message is {row.status}: only an errored or cancelled message can be retried"
    )


async def admin_summary(request: Request) -> Response:
    require_admin(request)
    document = await services_of(request).store.figures.dashboard(
        SUMMARY_COUNT_CAP, SUMMARY_DONE_CAP, SUMMARY_ROWS
    )
    # Built as JSON by PostgreSQL: passed through, never parsed here.
    return Response(document, media_type="application/json", headers={"Cache-Control": "no-store"})


def _query_error(path: str, message: str) -> ApiError:
    return ApiError(422, "invalid query", fields=[{"path": path, "message": message}])


async def list_messages(request: Request) -> Response:
    principal = authenticate(request)
    params = request.query_params
    for name in LIST_PARAMETERS:  # `?limit=` is not `limit` left out: OpenAPI refuses it
        if params.get(name) == "":
            raise _query_error(name, "must not be empty (leave the parameter out instead)")
    status = params.get("status")
    if status is not None and status not in STATUSES:
        raise _query_error("status", "must be one of " + ", ".join(STATUSES))
    status_filter = MessageStatus(status) if status is not None else None
    raw_limit = params.get("limit", str(LIST_LIMIT_DEFAULT))
    # isascii: str.isdigit() also accepts '²', which int() refuses.
    if (
        not (raw_limit.isascii() and raw_limit.isdigit())
        or not 1 <= int(raw_limit) <= LIST_LIMIT_MAX
    ):
        raise _query_error("limit", f"must be an integer from 1 to {LIST_LIMIT_MAX}")
    client_message_id = params.get("client_message_id")
    if client_message_id is not None and "\x00" in client_message_id:
        raise _query_error("client_message_id", "must not contain the NUL character")
    sender = params.get("sender")
    if sender is not None and not _SENDER.fullmatch(sender):
        raise _query_error("sender", f"must match {models.SENDER_PATTERN}")
    priority = params.get("priority")
    if priority is not None and priority not in models.PRIORITIES:
        raise _query_error("priority", "must be one of " + ", ".join(models.PRIORITIES))
    delivery = params.get("delivery")
    if delivery is not None and delivery not in DELIVERIES:
        raise _query_error("delivery", "must be one of " + ", ".join(DELIVERIES))
    after = None
    if "after" in params:
        try:
            after = _uuid(params["after"])
        except ValueError as exc:
            raise _query_error("after", "must be a task_id") from exc
    limit = int(raw_limit)
    rows = await services_of(request).store.messages.listing(
        _owner_filter(principal),
        status=status_filter,
        client_message_id=client_message_id,
        sender=sender,
        priority=priority,
        delivery=delivery,
        after=after,
        limit=limit,
    )
    views = [listed_message(row) for row in rows]
    next_after = views[-1]["task_id"] if len(views) == limit else None
    return OrjsonResponse({"messages": views, "next_after": next_after})


async def healthz(request: Request) -> Response:
    return OrjsonResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    expected = db.latest_version()
    try:
        version = await services_of(request).store.schema_version()
    except Exception as exc:  # the table may not exist yet, or the database is down
        log.warning("not ready", error=str(exc).splitlines()[0:1])
        return error_response(unavailable("database unreachable or not migrated"))
    # A schema ahead of this code is fine: migrations keep the previous release
    # working, so processes still on it stay ready while the new code rolls out.
    if version < expected:
        return error_response(
            unavailable(
                f"schema at version {version}, this code needs {expected}: run outbox migrate"
            )
        )
    return OrjsonResponse({"status": "ready", "schema_version": version})


async def metrics(request: Request) -> Response:
    services = services_of(request)
    await services.queue_gauges.refresh()  # cached: at most one query per OUTBOX_METRICS_CACHE
    return Response(render(services.metrics_registries), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    from outbox.openapi import openapi_document

    return OrjsonResponse(openapi_document(services_of(request).settings.max_body_bytes))


ROUTES = [
    Route("/api/v1/whatsapp/send/", send, methods=["POST"]),
    Route("/api/v1/whatsapp/send", send, methods=["POST"]),
    Route("/api/v1/whatsapp/send/batch", send_batch, methods=["POST"]),
    Route("/api/v1/whatsapp/send/batch/", send_batch, methods=["POST"]),
    Route("/api/v1/whatsapp/messages", list_messages, methods=["GET"]),
    Route("/api/v1/whatsapp/messages/", list_messages, methods=["GET"]),
    # One route for both methods, so that a 405 names them both in `Allow`.
    Route("/api/v1/whatsapp/messages/{task_id}", message, methods=["GET", "DELETE"]),
    Route("/api/v1/whatsapp/messages/{task_id}/retry", retry_message, methods=["POST"]),
    Route("/api/v1/admin/summary", admin_summary, methods=["GET"]),
    *senders_api.ROUTES,
    *webhooks.ROUTES,
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]


class FeedEndpoint:
    """The feed as a plain ASGI app (starlette mounts a non-function endpoint as is): no
    request/WebSocket wrappers kept for the socket's life."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services: Services = scope["state"][SERVICES]
        await services.feed.handle(scope, receive, send)


# The live status feed (outbox/feed/), apart from the HTTP routes that OpenAPI
# describes; slashes are not redirected for WebSockets, hence both paths.
WEBSOCKET_ROUTES = [
    WebSocketRoute("/ws/whatsapp/", FeedEndpoint()),
    WebSocketRoute("/ws/whatsapp", FeedEndpoint()),
]


class RequestLog:
    """One log line per request: method, path, status, duration, message and user ids;
    and the request's duration in the metrics, by route template (bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            # The client left before its body was read: nothing to answer, nothing wrong
            # here. Counted apart from server errors under nginx's "client closed" code.
            status = CLIENT_CLOSED
        finally:
            duration = time.perf_counter() - started
            route = scope.get("route")  # set by the router on a match (also a 405's)
            self.metrics.observe_request(
                getattr(route, "path", UNMATCHED), scope["method"], status, duration
            )
            state = scope.get("state", {})
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round(duration * 1000, 2),
                message_id=state.get("message_id"),
                user_id=state.get("user_id"),
                **{key: state[key] for key in ("to", "batch_size") if state.get(key)},
            )


def create_app(
    settings: Settings, *, extra_registries: Sequence[CollectorRegistry] = ()
) -> Starlette:
    """The ASGI app; `extra_registries` (a dispatcher's in the same process) join /metrics."""
    verifier = TokenVerifier(settings)
    api_metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Services]]:
        pool = db.create_pool(settings)
        # Not waiting: the API starts while the database is away and answers 503.
        await pool.open(wait=False)
        store = Store(pool, statement_timeout=settings.api_statement_timeout)
        queue_gauges = QueueGauges(store, settings.metrics_cache)
        api_metrics.registry.register(queue_gauges)
        # Decrypted: the webhooks check signatures with the senders' secrets.
        senders = SenderDirectory(settings, store, decrypt=True)
        feed = Feed(settings, store, verifier, api_metrics, senders=senders)
        services = Services(
            settings=settings,
            store=store,
            verifier=verifier,
            ingest=InsertCoalescer(store, settings.max_attempts),
            bodies=BodyReader(),
            metrics=api_metrics,
            queue_gauges=queue_gauges,
            metrics_registries=(api_metrics.registry, *extra_registries),
            feed=feed,
            senders=senders,
        )
        feed.start()
        following = asyncio.create_task(senders.run(), name="senders-follow")
        try:
            yield {SERVICES: services}
        finally:
            await cancel_and_wait([following])
            await feed.stop()
            await pool.close(timeout=0.2)  # a worker still connecting is cancelled at exit
            api_metrics.registry.unregister(queue_gauges)

    app = Starlette(
        routes=[*ROUTES, *WEBSOCKET_ROUTES, *dashboard.ROUTES],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.add_middleware(RequestLog, metrics=api_metrics)
    return app
