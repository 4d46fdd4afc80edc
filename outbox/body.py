"""JSON request bodies read and parsed within bounds.

A body is counted while it is read (413 past the route's limit); a large one is then
checked for how many JSON values it can hold before any parser builds them (a 16 MiB
`[[], [], …]` is 8 million lists: ~650 MB once parsed), and parsed in a worker thread,
a few at a time, so that the event loop keeps answering meanwhile."""

from __future__ import annotations

import asyncio
import re
from typing import TypeVar

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request

from outbox.errors import ApiError, is_malformed_json

T = TypeVar("T")

# Bodies up to this size are parsed on the loop (at most ~128 Ki values, a few ms);
# larger ones are counted first and parsed in a thread.
PARSE_INLINE_BYTES = 256 * 1024
# Large bodies parsed at once per process: each may briefly hold a tree of up to its
# route's value limit (~80 bytes a value).
PARSERS = 2
# A JSON string, escapes included: the unrolled form matches in linear time.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_values_bound(body: bytes | bytearray) -> int:
    """An upper bound on the JSON values and keys that `body` holds.

    Outside strings every value after a container's first is preceded by a comma, every
    key by a colon, and every container opens with a bracket: counting them bounds what
    a parser builds, at C speed."""
    structure = _JSON_STRING.sub(b"0", body)
    return 1 + sum(structure.count(mark) for mark in (b",", b":", b"[", b"{"))


class BodyReader:
    """Reads a request's JSON body and parses it into a model, within bounds."""

    def __init__(self, parsers: int = PARSERS) -> None:
        self._parsing = asyncio.Semaphore(parsers)

    async def read(self, request: Request, limit: int) -> bytearray:
        content_type = request.headers.get("content-type", "application/json")
        media_type = content_type.partition(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise ApiError(415, f"expected Content-Type application/json, got {media_type!r}")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"body larger than {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():  # counted while reading, never past the limit
            if len(body) + len(chunk) > limit:
                raise ApiError(413, f"body larger than {limit} bytes")
            body += chunk
        return body

    async def parse(
        self, body: bytearray, adapter: TypeAdapter[T], max_values: int, what: str
    ) -> T:
        """`body` validated by `adapter`: 400 when it is not JSON, 413 when it holds more
        than `max_values` JSON values; a ValidationError is the caller's to answer."""
        if len(body) <= PARSE_INLINE_BYTES:
            return _validate(body, adapter)
        async with self._parsing:
            return await asyncio.to_thread(_count_and_validate, body, adapter, max_values, what)


def _count_and_validate(body: bytearray, adapter: TypeAdapter[T], max_values: int, what: str) -> T:
    if json_values_bound(body) > max_values:
        raise ApiError(413, f"{what} holds more than {max_values} JSON values")
    return _validate(body, adapter)


def _validate(body: bytearray, adapter: TypeAdapter[T]) -> T:
    try:
        return adapter.validate_json(body)
    except ValidationError as exc:
        if is_malformed_json(exc):
            reason = exc.errors()[0]["msg"].removeprefix("Invalid JSON: ")
            raise ApiError(400, f"body is not valid JSON: {reason}") from exc
        raise
