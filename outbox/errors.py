"""One error shape everywhere: `{"error": {"code", "message", "fields"?}}`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
import psycopg_pool
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from outbox.log import get_logger

log = get_logger("outbox.api")

_CODE_BY_STATUS = {
    400: "malformed_json",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    503: "unavailable",
}
UNION_TAGS = {"text", "template", "image", "document", "audio", "video"}
RETRY_AFTER_SECONDS = "5"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        fields: list[dict[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODE_BY_STATUS.get(status, "error")
        self.message = message
        self.fields = fields
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def error_response(error: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"code": error.code, "message": error.message, **error.extra}
    if error.fields is not None:
        body["fields"] = error.fields
    return JSONResponse({"error": body}, status_code=error.status, headers=error.headers)


def unauthorized(reason: str) -> ApiError:
    # A header value is latin-1 and this one is a quoted string: keep printable ASCII only.
    description = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in reason)
    return ApiError(
        401,
        reason,
        headers={
            "WWW-Authenticate": f'Bearer error="invalid_token", error_description="{description}"'
        },
    )


def forbidden(reason: str) -> ApiError:
    return ApiError(403, reason)


def unavailable(reason: str) -> ApiError:
    return ApiError(503, reason, headers={"Retry-After": RETRY_AFTER_SECONDS})


def validation_fields(
    error: ValidationError, *, batch: bool = False, items_from: int | None = None
) -> list[dict[str, Any]]:
    """Pydantic errors → `[{"path", "message"}]` (with `index` for batch items).

    `items_from`: the error is of a list of batch items, the first of which is item
    `items_from` of the batch."""
    fields = []
    for item in error.errors(include_url=False):
        loc = list(item["loc"])
        entry: dict[str, Any] = {}
        if items_from is not None and loc and isinstance(loc[0], int):
            entry["index"] = items_from + loc[0]
            loc = loc[1:]
        elif batch and len(loc) >= 2 and loc[0] == "messages" and isinstance(loc[1], int):
            entry["index"] = loc[1]
            loc = loc[2:]
        # A tagged union prefixes the member's tag; the client never wrote it.
        if loc and loc[0] in UNION_TAGS and not item["type"].startswith("union_tag"):
            loc = loc[1:]
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "union_tag_not_found":
            loc, message = [*loc, "type"], "required: one of " + ", ".join(sorted(UNION_TAGS))
        elif item["type"] == "union_tag_invalid":
            loc, message = [*loc, "type"], "must be one of " + ", ".join(sorted(UNION_TAGS))
        entry["path"] = ".".join(str(part) for part in loc)
        entry["message"] = message
        fields.append(entry)
    return fields


def is_malformed_json(error: ValidationError) -> bool:
    return any(item["type"] == "json_invalid" for item in error.errors())


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "no such route", 405: "method not allowed on this route"}
    return error_response(
        ApiError(
            exc.status_code, messages.get(exc.status_code, str(exc.detail)), headers=exc.headers
        )
    )


async def _database_error(request: Request, exc: Exception) -> Response:
    log.warning("database unavailable", path=request.url.path, error=str(exc).splitlines()[0:1])
    return error_response(unavailable("database unavailable, try again shortly"))


async def _query_canceled(request: Request, exc: Exception) -> Response:
    # The API's statement_timeout (OUTBOX_API_STATEMENT_TIMEOUT) cut a query short, or an
    # operator cancelled it: the database is busy, not broken, and the request may succeed
    # later. The transaction was rolled back and the connection is idle again.
    log.warning("query cancelled", path=request.url.path, error=str(exc).splitlines()[0:1])
    return error_response(unavailable("the database took too long to answer, try again shortly"))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", path=request.url.path)
    return error_response(ApiError(500, "internal error", code="internal"))


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: _api_error,
    HTTPException: _http_error,
    psycopg.errors.QueryCanceled: _query_canceled,  # an OperationalError: looked up first
    psycopg.OperationalError: _database_error,
    psycopg_pool.PoolTimeout: _database_error,
    Exception: _unexpected,
}
