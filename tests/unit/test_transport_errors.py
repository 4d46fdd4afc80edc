"""A call without an HTTP answer: not sent (the connection failed before the request was
written) is transient; anything after that may have reached the provider, and is
`unknown`. Each httpx error class, through `transport_error` and through both HTTP
providers (httpx's own MockTransport raising it), and the executor's own deadline."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from outbox.executor import Executor
from outbox.providers.base import CALL_PROGRESS, OutgoingMessage, ProviderError, transport_error
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
    """Writes its request (as httpx's trace hook notes it) and never answers: only the
    executor's deadline ends its calls."""

    name = "silent"

    async def send(self, message: OutgoingMessage) -> str | None:
        progress = CALL_PROGRESS.get()
        assert progress is not None  # the executor sets it for each attempt
        progress.request_started = True
        await asyncio.Event().wait()
        return None


class StuckConnecting(SilentProvider):
    """Never gets as far as writing its request."""

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


def test_the_calls_deadline_before_the_request_is_written_is_transient() -> None:
    async def run() -> Executor:
        executor = offline_executor(
            StuckConnecting(), provider_timeout=0.05, unknown_outcome="fail"
        )
        await executor.attempt(claimed(1), time.monotonic() + 60)
        await asyncio.sleep(0.05)
        return executor

    [done] = queued(asyncio.run(run()))
    assert (done.status, done.outcome) == (MessageStatus.PENDING, AttemptOutcome.TRANSIENT)
    assert done.error == "silent: no answer within 0.05s (request not sent)"


def full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: a new connection's SYN is dropped,
    so connecting to it hangs (what a firewall dropping packets looks like)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    clients = []
    for _ in range(16):
        client = socket.socket()
        client.settimeout(0.2)
        try:
            client.connect(server.getsockname())
        except TimeoutError:
            client.close()
            return server, clients
        clients.append(client)
    raise AssertionError("the accept queue never filled")


@pytest.mark.parametrize("connects", [False, True], ids=["connect-hangs", "never-answers"])
def test_the_deadline_on_a_real_call_knows_whether_the_request_went(connects: bool) -> None:
    """Through httpx to a real socket, with the executor's deadline (0.3 s) well before
    httpx's own timeouts (10 s): a connect that hangs sent nothing (transient, even with
    OUTBOX_UNKNOWN_OUTCOME=fail); a request written to a server that never answers
    (listening, never accepting) may have arrived (unknown)."""
    if connects:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        held: list[socket.socket] = []
    else:
        server, held = full_backlog()
    port = server.getsockname()[1]

    async def run() -> Executor:
        async with httpx.AsyncClient(timeout=10) as client:
            provider = CloudProvider(
                client,
                base_url=f"http://127.0.0.1:{port}",
                api_version="v21.0",
                phone_number_id="123",
                token="token",
            )
            executor = offline_executor(provider, provider_timeout=0.3, unknown_outcome="fail")
            await executor.attempt(claimed(1), time.monotonic() + 60)
            await asyncio.sleep(0.05)
            return executor

    try:
        [done] = queued(asyncio.run(run()))
    finally:
        for sock in (server, *held):
            sock.close()
    if connects:
        assert (done.status, done.outcome) == (MessageStatus.ERROR, AttemptOutcome.UNKNOWN)
        assert done.error == "unknown outcome: cloud: no answer within 0.3s"
    else:
        assert (done.status, done.outcome) == (MessageStatus.PENDING, AttemptOutcome.TRANSIENT)
        assert done.error == "cloud: no answer within 0.3s (request not sent)"
