"""The provider interface: send one message, get its provider id or a classified error."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx
import orjson

from outbox.retry import ErrorKind

_MAX_REASON = 300  # `last_error` is for people: keep it to one readable line
MAX_RESPONSE_BYTES = 1024 * 1024  # OUTBOX_PROVIDER_MAX_RESPONSE_BYTES' default


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 5× more, per message
class OutgoingMessage:
    id: uuid.UUID  # the task id, also the idempotency key
    user_id: str
    to: str
    type: str
    payload: dict[str, Any]  # the content of `type`, as in models.*.content()
    client_message_id: str | None
    attempt: int  # 1-based number of this attempt


def clean_text(text: str) -> str:
    """Text PostgreSQL can store: no NUL, no lone surrogates (providers echo anything)."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode()


class SettingError(ValueError):
    """A provider setting that can never work. The message names the sender's settings
    (`phone_number_id`); `named()` says it with other names for them (the environment's
    variables, for the sender `default`). `detail` follows as it is."""

    def __init__(self, problem: str, settings: Sequence[str], detail: str = "") -> None:
        self.problem = problem  # `{}` for each of `settings`, in order
        self.settings = tuple(settings)
        self.detail = detail
        super().__init__(self.named({}))

    def named(self, names: Mapping[str, str]) -> str:
        return self.problem.format(*(names.get(s, s) for s in self.settings)) + self.detail


class ProviderError(Exception):
    """A failed send, already classified; `reason` is short and human."""

    def __init__(
        self,
        kind: ErrorKind,
        reason: str,
        *,
        retry_after: float | None = None,
        code: int | None = None,
        http_status: int | None = None,
    ) -> None:
        reason = clean_text(" ".join(reason.split()))
        if len(reason) > _MAX_REASON:
            reason = reason[: _MAX_REASON - 1] + "…"
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.retry_after = retry_after
        self.code = code
        self.http_status = http_status

    def __repr__(self) -> str:
        return f"ProviderError({self.kind.value!r}, {self.reason!r})"


class Provider(Protocol):
    name: str

    async def send(self, message: OutgoingMessage) -> str | None:
        """Deliver `message`; return the provider's message id, or raise ProviderError."""
        ...


@dataclass(slots=True)
class ProviderResponse:
    """A provider's answer with its whole body, read within the size limit."""

    status_code: int
    headers: httpx.Headers
    body: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300


class CallProgress:
    """How far the call running in this task got: whether it began writing its request.
    The executor's deadline cuts a call short from outside: begun, its outcome is unknown
    (the provider may have it); not begun (still connecting, or waiting for a pooled
    connection), nothing was sent."""

    __slots__ = ("request_started",)

    def __init__(self) -> None:
        self.request_started = False


# The current attempt's progress, set by the executor in each attempt's own task.
CALL_PROGRESS: ContextVar[CallProgress | None] = ContextVar("outbox_call_progress", default=None)


async def _trace(event: str, info: Mapping[str, Any]) -> None:
    """httpcore's trace hook: notes the moment a request's head starts to be written."""
    if event.endswith(".send_request_headers.started"):
        progress = CALL_PROGRESS.get()
        if progress is not None:
            progress.request_started = True


class JsonPost:
    """POSTs JSON bodies to one URL with the client's settings, by `client.send`.

    `client.post` first merges the client's defaults into each request: 70 of the
    ~450 µs that httpx spends before a call's first byte leaves, after an idle moment
    here (measured with the bench's provider server); done once here instead. The
    client's headers (a call's own replace them, names in any case), timeouts, pool,
    proxies and cookies (a load balancer's sticky session) all still apply.

    The answer is streamed and read up to `max_response_bytes` (decoded, so a small
    compressed body that inflates is stopped too): a provider, or whatever answers at
    its address, cannot make a dispatcher hold an unbounded body. Beyond it the call is
    a transient error; the connection is closed, not reused."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: httpx.URL,
        *,
        name: str,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.client = client
        self.url = url
        self.name = name
        self.max_response_bytes = max_response_bytes
        # httpx.Headers keys are lower case: the call's names are lowered to match.
        self._headers = {**client.headers, "content-type": "application/json"}
        self._extensions: dict[str, Any] = {
            "timeout": client.timeout.as_dict(),
            "trace": _trace,  # CallProgress: whether a call cut short had begun sending
        }

    async def __call__(self, body: bytes, headers: dict[str, str]) -> ProviderResponse:
        merged = self._headers | {name.lower(): value for name, value in headers.items()}
        request = httpx.Request(
            "POST",
            self.url,
            content=body,
            headers=merged,
            cookies=self.client.cookies or None,  # empty but for a provider that sets one
            extensions=self._extensions,
        )
        response = await self.client.send(request, stream=True)
        try:
            content = await self._read(response)
        finally:
            await response.aclose()
        return ProviderResponse(response.status_code, response.headers, content)

    async def _read(self, response: httpx.Response) -> bytes:
        limit = self.max_response_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(response, f"declares {declared} bytes, over")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise self._too_large(response, "is over")
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, response: httpx.Response, what: str) -> ProviderError:
        return ProviderError(
            ErrorKind.TRANSIENT,
            f"{self.name}: the HTTP {response.status_code} answer {what} the "
            f"{self.max_response_bytes}-byte limit (OUTBOX_PROVIDER_MAX_RESPONSE_BYTES); "
            "not read further",
            http_status=response.status_code,
        )


# Transport errors raised before any byte of the request was written: the provider never
# saw the call, which is transient. Any other one (a write or read error or timeout, the
# server closing without an answer) may come after the provider received the request.
NOT_SENT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
    httpx.ProxyError,
)


def transport_error(name: str, exc: httpx.HTTPError, timeout: float | None) -> ProviderError:
    """No usable response. Not sent (a connection error before the request was written):
    transient. A transport error after that (a write or read error or timeout, the server
    closing without an answer): unknown, since the provider may have received the request
    and acted on it. Any other error came after an HTTP answer (a body that does not
    decode, too many redirects): transient."""
    if isinstance(exc, httpx.TimeoutException):
        after = f" after {timeout:g}s" if timeout is not None else ""
        reason = f"{name}: timeout{after} ({type(exc).__name__})"
    else:
        detail = f": {exc}" if str(exc) else ""
        reason = f"{name}: {type(exc).__name__}{detail}"
    maybe_sent = isinstance(exc, httpx.TransportError) and not isinstance(exc, NOT_SENT_ERRORS)
    return ProviderError(ErrorKind.UNKNOWN if maybe_sent else ErrorKind.TRANSIENT, reason)


def check_url(url: str, setting: str) -> None:
    """Refuse a URL that could never work, rather than retry it forever."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise SettingError("{} is not a valid URL", [setting], f": {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise SettingError("{} must be an http:// or https:// URL", [setting], f" (got {url!r})")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP-date; None if absent/bad."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or {} when it is empty or anything else."""
    try:
        data = orjson.loads(body)
    except ValueError:  # orjson.JSONDecodeError, and text that is not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def int_code(value: Any) -> int | None:
    """An error code as an int; JSON booleans and floats are not codes."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None
