"""A call without an HTTP answer: not sent (the connection failed before the request was
written) is transient; anything after that may have reached the provider, and is
`unknown`. Each httpx error class, through `transport_error` and through both HTTP
providers (httpx's own MockTransport raising it), and the executor's own deadline."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from outbox.executor import Executor
from outbox.providers.base import OutgoingMessage, ProviderError, transport_error
from outbox.providers.cloud import CloudProvider
from outbox.providers.http import HttpProvider
from outbox.retry import ErrorKind
from outbox.states import AttemptOutcome, MessageStatus
from tests.unit.offline import claimed, offline_executor, queued

_T, _U = ErrorKind.TRANSIENT, ErrorKind.UNKNOWN

# Every error httpx may raise from a call, with what it means.
KINDS: dict[type[httpx.HTTPError], ErrorKind] = {
    # Before the request was written: never reached the provider.
    httpx.ConnectError: _T,
    httpx.ConnectTimeout: _T,
    httpx.PoolTimeout: _T,
    httpx.UnsupportedProtocol: _T,
    httpx.LocalProtocolError: _T,
    httpx.ProxyError: _T,
    # While or after it was written, without an answer: it may have arrived.
    httpx.WriteError: _U,
    httpx.WriteTimeout: _U,
    httpx.ReadError: _U,
    httpx.ReadTimeout: _U,
    httpx.RemoteProtocolError: _U,
    httpx.CloseError: _U,
    # With an HTTP answer: known, transient as its body could not be used.
    httpx.DecodingError: _T,
    httpx.TooManyRedirects: _T,
}


def concrete_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= concrete_subclasses(sub)
    return found


def test_every_httpx_request_error_is_in_the_table() -> None:
    # A new httpx class fails here until someone says which side it is on.
    leaves = {c for c in concrete_subclasses(httpx.RequestError) if not c.__subclasses__()}
    assert leaves <= set(KINDS), sorted(c.__name__ for c in leaves - set(KINDS))


@pytest.mark.parametrize("cls", list(KINDS), ids=lambda cls: cls.__name__)
def test_transport_error_classifies_each_class(cls: type[httpx.HTTPError]) -> None:
    error = transport_error("cloud", cls("boom"), 10.0)
    assert error.kind is KINDS[cls]
    if issubclass(cls, httpx.TimeoutException):  # the reason still says what happened
        assert error.reason == f"cloud: timeout after 10s ({cls.__name__})"
    else:
        assert error.reason == f"cloud: {cls.__name__}: boom"


def test_a_timeout_without_a_known_limit_says_so_plainly() -> None:
    error = transport_error("http", httpx.ReadTimeout(""), None)
    assert (error.kind, error.reason) == (_U, "http: timeout (ReadTimeout)")


def message() -> OutgoingMessage:
    m = claimed()
    return OutgoingMessage(m.id, m.user_id, m.to, m.type, m.payload, None, m.attempt)


def raising(cls: type[httpx.HTTPError]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        raise cls("boom", request=request)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler), timeout=10.0)


@pytest.mark.parametrize("cls", list(KINDS), ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("which", ["cloud", "http"])
def test_both_http_providers_classify_each_class(cls: type[httpx.HTTPError], which: str) -> None:
    async def call() -> ProviderError:
        async with raising(cls) as client:
            provider: CloudProvider | HttpProvider
            if which == "cloud":
                provider = CloudProvider(
                    client,
                    base_url="http://127.0.0.1:9",
                    api_version="v21.0",
                    phone_number_id="123",
                    token="token",
                )
            else:
                provider = HttpProvider(client, url="http://127.0.0.1:9/send")
            with pytest.raises(ProviderError) as raised:
                await provider.send(message())
            return raised.value

    error = asyncio.run(call())
    assert error.kind is KINDS[cls]
    assert error.reason.startswith(f"{which}: ") and cls.__name__ in error.reason


class SilentProvider:
    """Never answers: only the executor's deadline ends its calls."""

    name = "silent"

    async def send(self, message: OutgoingMessage) -> str | None:
        await asyncio.Event().wait()
        return None


@pytest.mark.parametrize(
    ("unknown_outcome", "status"),
    [("retry", MessageStatus.PENDING), ("fail", MessageStatus.ERROR)],
)
def test_the_calls_deadline_is_an_unknown_outcome(
    unknown_outcome: str, status: MessageStatus
) -> None:
    async def run() -> Executor:
        executor = offline_executor(
            SilentProvider(), provider_timeout=0.05, unknown_outcome=unknown_outcome
        )
        await executor.attempt(claimed(1), time.monotonic() + 60)
        await asyncio.sleep(0.05)  # the outcome is recorded on the loop's next turn
        return executor

    [done] = queued(asyncio.run(run()))
    assert (done.status, done.outcome, done.refund) == (status, AttemptOutcome.UNKNOWN, 0)
    reason = "silent: no answer within 0.05s"
    assert done.error == (reason if unknown_outcome == "retry" else f"unknown outcome: {reason}")
