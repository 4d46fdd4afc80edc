"""The admin routes of senders: PUT, GET (one or all), DELETE, pause and resume.

The sender `default` is the environment's (OUTBOX_PROVIDER and its settings): shown, paused
and resumed, never changed or deleted here (409). Credentials are encrypted with
OUTBOX_SECRET_KEY before they are stored and never shown: an answer says only whether each
one is set."""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from outbox.errors import ApiError, unavailable, validation_fields
from outbox.log import get_logger
from outbox.senders import (
    DEFAULT_SENDER,
    KEY_SETTING,
    MAX_USERS,
    PAUSE_REQUEST,
    PROVIDERS,
    REQUIRED_SECRETS,
    SENDER_ID_PATTERN,
    SENDER_REQUEST,
    AnySender,
    Keyring,
    PauseRequest,
    SecretKeyError,
    SenderConfig,
    environment_sender,
    rate_limit_of,
    sender_view,
    split_settings,
    unique_users,
)
from outbox.services import require_admin, services_of
from outbox.store import NewSender, SenderRow, Store

log = get_logger("outbox.senders")

_SENDER_ID = re.compile(SENDER_ID_PATTERN.removeprefix("^").removesuffix("$"))
# JSON values a sender's body may hold: its users, its settings and a margin.
SENDER_JSON_VALUES = MAX_USERS + 100
READ_ONLY = (
    "the sender default is defined by the environment (OUTBOX_PROVIDER and its settings):"
    " change it there"
)


def _respond(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


@functools.lru_cache(maxsize=4)
def keyring(keys: str) -> Keyring:
    """OUTBOX_SECRET_KEY's keyring, built once per value."""
    return Keyring(keys)


def _sender_id(request: Request) -> str:
    return str(request.path_params["sender_id"])


async def _view(store: Store, sender: SenderConfig) -> dict[str, Any]:
    counts = await store.senders.counts([sender.id])
    states = await store.senders.states(sender.id)
    return sender_view(sender, counts.get(sender.id), states.get(sender.id))


async def _stored_or_404(store: Store, sender_id: str) -> SenderRow:
    row = await store.senders.get(sender_id) if _SENDER_ID.fullmatch(sender_id) else None
    if row is None:
        raise ApiError(404, f"no such sender: {sender_id!r}")
    return row


async def list_senders(request: Request) -> Response:
    require_admin(request)
    services = services_of(request)
    store = services.store
    senders = [environment_sender(services.settings)]
    senders += [SenderConfig.stored(row) for row in await store.senders.all()]
    counts = await store.senders.counts([sender.id for sender in senders])
    states = await store.senders.states()
    views = [sender_view(s, counts.get(s.id), states.get(s.id)) for s in senders]
    return _respond({"senders": views})


async def get_sender(request: Request) -> Response:
    require_admin(request)
    services = services_of(request)
    sender_id = _sender_id(request)
    if sender_id == DEFAULT_SENDER:
        return _respond(await _view(services.store, environment_sender(services.settings)))
    row = await _stored_or_404(services.store, sender_id)
    return _respond(await _view(services.store, SenderConfig.stored(row)))


def _body_fields(error: ValidationError) -> list[dict[str, Any]]:
    """validation_fields without the provider's tag that pydantic puts first."""
    fields = []
    for entry, item in zip(validation_fields(error), error.errors(), strict=True):
        loc = list(item["loc"])
        kind = item["type"]
        if kind.startswith("union_tag"):
            choices = ", ".join(PROVIDERS)
            required = kind == "union_tag_not_found"
            entry["path"] = "provider"
            entry["message"] = ("required: one of " if required else "must be one of ") + choices
        elif loc and loc[0] in PROVIDERS:
            entry["path"] = ".".join(str(part) for part in loc[1:])
        fields.append(entry)
    return fields


def _missing_secrets(request: AnySender, given: dict[str, str], kept: set[str]) -> None:
    missing = [
        name
        for name in REQUIRED_SECRETS[request.provider]
        if name not in given and name not in kept
    ]
    if missing:
        raise ApiError(
            422,
            "invalid sender",
            fields=[
                {
                    "path": f"settings.{name}",
                    "message": "required when the sender is created or changes provider",
                }
                for name in missing
            ],
        )


def _encrypted(
    keys: Keyring, existing: SenderRow | None, given: dict[str, str], kept: set[str]
) -> tuple[bytes | None, list[str]]:
    """The sender's credentials as stored: those given, plus the stored ones kept."""
    names = sorted(set(given) | kept)
    if not given:  # nothing new: the stored token as it is (or none)
        assert not kept or (existing is not None and existing.secrets is not None)
        return (existing.secrets if kept and existing else None), names
    merged = dict(given)
    if kept and existing is not None and existing.secrets is not None:
        stored = keys.decrypt(existing.secrets, existing.id)
        merged = {**{name: stored[name] for name in kept if name in stored}, **given}
    return keys.encrypt(merged), names


async def put_sender(request: Request) -> Response:
    require_admin(request)
    services = services_of(request)
    sender_id = _sender_id(request)
    if not _SENDER_ID.fullmatch(sender_id):
        raise ApiError(
            422,
            "invalid sender id",
            fields=[{"path": "id", "message": f"must match {SENDER_ID_PATTERN}"}],
        )
    body = await services.bodies.read(request, services.settings.max_body_bytes)
    try:
        sender = await services.bodies.parse(body, SENDER_REQUEST, SENDER_JSON_VALUES, "a sender")
    except ValidationError as exc:
        raise ApiError(422, "invalid sender", fields=_body_fields(exc)) from exc
    if sender_id == DEFAULT_SENDER:
        raise ApiError(409, READ_ONLY)
    keys = keyring(services.settings.secret_key)
    if not keys.configured:
        # Once a sender is stored, serve and dispatch need the key to start: none is
        # stored without one.
        raise unavailable(f"{KEY_SETTING} is not set: senders cannot be stored without it")
    store = services.store
    existing = await store.senders.get(sender_id)
    plain, given = split_settings(sender)
    kept = set()
    if existing is not None and existing.provider == sender.provider:
        kept = set(existing.secret_fields) - set(given)
    _missing_secrets(sender, given, kept)
    try:
        secrets, secret_fields = _encrypted(keys, existing, given, kept)
    except SecretKeyError as exc:
        raise unavailable(str(exc)) from exc
    created = await store.senders.put(
        NewSender(
            id=sender_id,
            provider=sender.provider,
            settings=plain,
            secrets=secrets,
            secret_fields=secret_fields,
            rate_limit=rate_limit_of(sender, services.settings),
            users=unique_users(sender.users),
        )
    )
    log.info("sender stored", sender=sender_id, provider=sender.provider, created=created)
    row = await _stored_or_404(store, sender_id)
    return _respond(await _view(store, SenderConfig.stored(row)), 201 if created else 200)


async def delete_sender(request: Request) -> Response:
    require_admin(request)
    store = services_of(request).store
    sender_id = _sender_id(request)
    if sender_id == DEFAULT_SENDER:
        raise ApiError(409, READ_ONLY)
    if _SENDER_ID.fullmatch(sender_id) and await store.senders.delete(sender_id):
        log.info("sender deleted", sender=sender_id)
        return Response(status_code=204)
    await _stored_or_404(store, sender_id)
    counts = (await store.senders.counts([sender_id])).get(sender_id)
    pending, in_flight = (counts.pending, counts.in_flight) if counts else (0, 0)
    raise ApiError(
        409,
        f"sender {sender_id!r} has {pending} pending and {in_flight} in-flight messages:"
        " cancel them or let them finish first",
    )


async def sender(request: Request) -> Response:
    if request.method == "PUT":
        return await put_sender(request)
    if request.method == "DELETE":
        return await delete_sender(request)
    return await get_sender(request)


async def _pause_request(request: Request) -> PauseRequest:
    services = services_of(request)
    body = await services.bodies.read(request, services.settings.max_body_bytes)
    if not body.strip():
        return PauseRequest()
    try:
        return await services.bodies.parse(body, PAUSE_REQUEST, 100, "a pause")
    except ValidationError as exc:
        raise ApiError(422, "invalid pause", fields=validation_fields(exc)) from exc


async def _current(request: Request, sender_id: str) -> SenderConfig:
    """The sender as it is now: `default` from the environment, else the stored one."""
    services = services_of(request)
    if sender_id == DEFAULT_SENDER:
        return environment_sender(services.settings)
    return SenderConfig.stored(await _stored_or_404(services.store, sender_id))


async def pause_sender(request: Request) -> Response:
    """Paused by hand (`default` too: its pause lives in its state, not in its settings)."""
    require_admin(request)
    store = services_of(request).store
    sender_id = _sender_id(request)
    pause = await _pause_request(request)
    await _current(request, sender_id)  # 404 first when there is no such sender
    if not await store.senders.pause(sender_id, pause.reason):
        raise ApiError(404, f"no such sender: {sender_id!r}")
    log.info("sender paused", sender=sender_id, manual=True)
    return _respond(await _view(store, await _current(request, sender_id)))


async def resume_sender(request: Request) -> Response:
    require_admin(request)
    store = services_of(request).store
    sender_id = _sender_id(request)
    await _current(request, sender_id)
    if not await store.senders.resume(sender_id):
        raise ApiError(404, f"no such sender: {sender_id!r}")
    log.info("sender resumed", sender=sender_id)
    return _respond(await _view(store, await _current(request, sender_id)))


ROUTES = [
    Route("/api/v1/whatsapp/senders", list_senders, methods=["GET"]),
    Route("/api/v1/whatsapp/senders/", list_senders, methods=["GET"]),
    # One route for the three methods, so that a 405 names them all in `Allow`.
    Route("/api/v1/whatsapp/senders/{sender_id}", sender, methods=["GET", "PUT", "DELETE"]),
    Route("/api/v1/whatsapp/senders/{sender_id}/pause", pause_sender, methods=["POST"]),
    Route("/api/v1/whatsapp/senders/{sender_id}/resume", resume_sender, methods=["POST"]),
]
