"""Providers against a real local HTTP server that plays the provider, scripted per test."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from outbox.providers import (
    CloudProvider,
    FakeProvider,
    HttpProvider,
    OutgoingMessage,
    Provider,
    ProviderError,
    build_provider,
)
from outbox.providers.base import parse_retry_after
from outbox.retry import ErrorKind
from outbox.senders import environment_secrets, environment_sender
from outbox.settings import Settings
from tests.support import wait_for

SECRET = "s3cret"
TOKEN = "EAAG-test-token"
PHONE_ID = "1234567890"

MESSAGE = OutgoingMessage(
    id=uuid.UUID("a1b2c3d4-1234-5678-90ab-cdef12345678"),
    user_id="user-1",
    to="5511999999999",
    type="text",
    payload={"body": "Olá, mundo", "preview_url": False},
    client_message_id="custom_123",
    attempt=2,
)


# The scripted provider --------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    header_lines: list[tuple[str, str]]  # every header line, in order, names lower-cased

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict[str, Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # hold the answer until the test ends (a provider that never answers)
    chunks: Iterable[bytes] | None = None  # the body, chunked (no Content-Length), instead


Script = Reply | Callable[[Seen], Reply]


class ScriptedServer:
    """A real HTTP server on a free 127.0.0.1 port; answers each request with the next reply."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.release = threading.Event()
        self.written = 0  # body bytes of chunked answers that the socket took
        self.cut_off = threading.Event()  # the client closed a chunked answer mid-body
        self._script: list[Script] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                seen = Seen(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    [(k.lower(), v) for k, v in self.headers.items()],
                )
                reply = server._next(seen)
                if reply.hang:
                    server.release.wait(timeout=60)
                if reply.chunks is not None:
                    self._send_chunked(reply)
                    return
                payload = (
                    json.dumps(reply.body).encode() if isinstance(reply.body, dict) else reply.body
                )
                try:
                    self.send_response(reply.status)
                    if isinstance(reply.body, dict):
                        self.send_header("Content-Type", "application/json")
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    self.close_connection = True

            def _send_chunked(self, reply: Reply) -> None:
                assert reply.chunks is not None
                self.send_response(reply.status)
                for name, value in {**reply.headers, "Transfer-Encoding": "chunked"}.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    for chunk in reply.chunks:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        server.written += len(chunk)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    server.cut_off.set()
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        # A short poll interval only makes shutdown() prompt; requests are served at once.
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    def script(self, *replies: Script) -> None:
        with self._lock:
            self._script.extend(replies)

    def _next(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            script = self._script.pop(0) if self._script else Reply(500, b"unscripted request")
        return script(seen) if callable(script) else script

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    scripted.start()
    try:
        yield scripted
    finally:
        scripted.stop()


def cloud_settings(base_url: str, **extra: Any) -> Settings:
    return Settings(
        provider="cloud",
        cloud_base_url=base_url,
        cloud_api_version="v21.0",
        cloud_phone_number_id=PHONE_ID,
        cloud_token=TOKEN,
        **extra,
    )


def http_settings(url: str, secret: str = SECRET) -> Settings:
    return Settings(
        provider="http", provider_url=url, provider_secret=secret, provider_allow_unsigned=True
    )


def environment_provider(settings: Settings, client: httpx.AsyncClient) -> Provider:
    """The environment's provider (the sender `default`), built as a dispatcher builds it."""
    sender = environment_sender(settings)
    return build_provider(
        sender.provider,
        sender.settings,
        environment_secrets(settings),
        client,
        max_response_bytes=settings.provider_max_response_bytes,
    )


def send(
    settings: Settings, message: OutgoingMessage = MESSAGE, *, timeout: float = 5.0
) -> str | None:
    """One send through the factory with a fresh shared client, as the dispatcher does."""

    async def go() -> str | None:
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await environment_provider(settings, client).send(message)

    return asyncio.run(go())


def send_error(
    settings: Settings, message: OutgoingMessage = MESSAGE, *, timeout: float = 5.0
) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        send(settings, message, timeout=timeout)
    return info.value


def cloud_error(code: int, message: str, details: str) -> dict[str, Any]:
    """The Cloud API's synchronous error shape (whatsapp-cloud-api.md §3)."""
    return {
        "error": {
            "message": f"(#{code}) {message}",
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": details},
            "fbtrace_id": "AbCdEf123",
        }
    }


# Cloud ------------------------------------------------------------------------------


def test_cloud_success_returns_the_wamid_and_sends_the_cloud_body(server: ScriptedServer) -> None:
    server.script(
        Reply(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": MESSAGE.to, "wa_id": MESSAGE.to}],
                "messages": [{"id": "wamid.HBgLNTUxMTk5OTk5OTk5ORUCABEYEjA="}],
            },
        )
    )

    assert send(cloud_settings(server.url)) == "wamid.HBgLNTUxMTk5OTk5OTk5ORUCABEYEjA="

    [seen] = server.requests
    assert (seen.method, seen.path) == ("POST", f"/v21.0/{PHONE_ID}/messages")
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["idempotency-key"] == str(MESSAGE.id)
    assert seen.json() == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "5511999999999",
        "type": "text",
        "text": {"body": "Olá, mundo", "preview_url": False},
        "biz_opaque_callback_data": str(MESSAGE.id),
    }


@pytest.mark.parametrize(
    ("type_", "payload"),
    [
        (
            "template",
            {
                "name": "order_update",
                "language": {"code": "pt_BR", "policy": "deterministic"},
                "components": [{"type": "body", "parameters": [{"type": "text", "text": "42"}]}],
            },
        ),
        ("image", {"link": "https://example.com/a.png", "caption": "a"}),
        ("video", {"link": "https://example.com/a.mp4"}),
        ("document", {"link": "https://example.com/a.pdf", "filename": "a.pdf"}),
        ("audio", {"link": "https://example.com/a.ogg"}),
    ],
)
def test_cloud_maps_every_type_to_its_body(
    server: ScriptedServer, type_: str, payload: dict[str, Any]
) -> None:
    server.script(Reply(200, {"messages": [{"id": "wamid.X"}]}))
    message = OutgoingMessage(
        id=uuid.uuid4(),
        user_id="u",
        to="5511988887777",
        type=type_,
        payload=payload,
        client_message_id=None,
        attempt=1,
    )

    assert send(cloud_settings(server.url + "/"), message) == "wamid.X"
    body = server.requests[0].json()
    assert (body["type"], body[type_]) == (type_, payload)
    assert server.requests[0].path == f"/v21.0/{PHONE_ID}/messages"


def test_cloud_rate_limit_is_a_throttle_and_keeps_retry_after(server: ScriptedServer) -> None:
    server.script(
        Reply(429, cloud_error(130429, "Rate limit hit", "Too many"), {"Retry-After": "3"})
    )

    error = send_error(cloud_settings(server.url))

    assert error.kind is ErrorKind.THROTTLED
    assert (error.code, error.http_status, error.retry_after) == (130429, 429, 3.0)
    assert error.reason.startswith("cloud 130429: (#130429) Rate limit hit")


def test_cloud_pair_rate_limit_is_a_pair_throttle(server: ScriptedServer) -> None:
    server.script(Reply(400, cloud_error(131056, "Pair rate limit hit", "Too many")))

    error = send_error(cloud_settings(server.url))

    assert (error.kind, error.code, error.http_status) == (ErrorKind.PAIR_THROTTLED, 131056, 400)


def test_cloud_undeliverable_is_permanent(server: ScriptedServer) -> None:
    server.script(Reply(400, cloud_error(131026, "Message undeliverable", "Not a WhatsApp user")))

    error = send_error(cloud_settings(server.url))

    assert error.kind is ErrorKind.PERMANENT
    assert (error.code, error.http_status, error.retry_after) == (131026, 400, None)
    assert "cloud 131026" in error.reason
    assert "Not a WhatsApp user" in error.reason


def test_cloud_expired_token_is_sender_level(server: ScriptedServer) -> None:
    server.script(Reply(401, cloud_error(190, "Access token has expired", "Session expired")))

    error = send_error(cloud_settings(server.url))

    assert error.kind is ErrorKind.SENDER
    assert (error.code, error.http_status) == (190, 401)


def test_cloud_code_decides_before_the_status(server: ScriptedServer) -> None:
    # 131048 (spam limit) arrives as a 429, yet must pause the sender, not retry.
    server.script(Reply(429, cloud_error(131048, "Spam rate limit hit", "Quality")))

    assert send_error(cloud_settings(server.url)).kind is ErrorKind.SENDER


def test_cloud_500_without_a_body_is_transient(server: ScriptedServer) -> None:
    server.script(Reply(500))

    error = send_error(cloud_settings(server.url))

    assert error.kind is ErrorKind.TRANSIENT
    assert (error.code, error.http_status) == (None, 500)
    assert error.reason == "cloud http 500"


def test_cloud_timeout_is_unknown(server: ScriptedServer) -> None:
    server.script(Reply(200, {"messages": [{"id": "wamid.late"}]}, hang=True))

    error = send_error(cloud_settings(server.url), timeout=0.3)

    assert error.kind is ErrorKind.UNKNOWN
    assert error.http_status is None
    assert "timeout" in error.reason
    assert len(server.requests) == 1  # it reached the provider, which never answered: unknown


def test_connection_refused_is_transient() -> None:
    # A bound socket that does not listen: connections to it are refused, with no race.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        cloud = send_error(cloud_settings(f"http://127.0.0.1:{port}"))
        http = send_error(http_settings(f"http://127.0.0.1:{port}/send"))

    for error in (cloud, http):
        assert error.kind is ErrorKind.TRANSIENT
        assert error.http_status is None
        assert "ConnectError" in error.reason


# Generic http -----------------------------------------------------------------------


def verify_signature(seen: Seen) -> Reply:
    """What a receiving gateway does: recompute the HMAC over the raw body."""
    expected = "sha256=" + hmac.new(SECRET.encode(), seen.body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(seen.headers.get("x-outbox-signature", ""), expected):
        return Reply(401, {"error": "bad_signature"})
    return Reply(202, {"id": "gw-" + seen.headers["idempotency-key"]})


def test_http_signature_verifies_and_idempotency_key_is_the_task_id(
    server: ScriptedServer,
) -> None:
    server.script(verify_signature)

    assert send(http_settings(server.url + "/send")) == f"gw-{MESSAGE.id}"

    [seen] = server.requests
    assert seen.path == "/send"
    assert seen.headers["idempotency-key"] == str(MESSAGE.id)
    assert seen.json() == {
        "task_id": str(MESSAGE.id),
        "user_id": "user-1",
        "to": "5511999999999",
        "type": "text",
        "text": {"body": "Olá, mundo", "preview_url": False},
        "client_message_id": "custom_123",
        "attempt": 2,
    }


@pytest.mark.parametrize("which", ["cloud", "http"])
def test_both_providers_send_the_clients_headers_and_cookies_with_their_own(
    server: ScriptedServer, which: str
) -> None:
    """Requests are built from the shared client's defaults (JsonPost): its headers go
    out with every call, a call's own header replaces the client's of the same name
    (whatever its case), and a cookie the provider set comes back (a sticky session)."""
    answer = {"id": "x", "messages": [{"id": "wamid.X"}]}
    server.script(Reply(200, answer, {"Set-Cookie": "lb=node-7; Path=/"}), Reply(200, answer))
    settings = cloud_settings(server.url) if which == "cloud" else http_settings(server.url)
    defaults = {"User-Agent": "outbox-test/1", "Content-Type": "text/plain", "IDEMPOTENCY-KEY": "x"}

    async def go() -> None:
        async with httpx.AsyncClient(headers=defaults) as client:
            provider = environment_provider(settings, client)
            await provider.send(MESSAGE)
            await provider.send(MESSAGE)

    asyncio.run(go())

    first, second = server.requests
    for seen in (first, second):
        names = [name for name, _ in seen.header_lines]
        assert names.count("content-type") == names.count("idempotency-key") == 1, names
        assert seen.headers["user-agent"] == "outbox-test/1"
        assert seen.headers["content-type"] == "application/json"
        assert seen.headers["idempotency-key"] == str(MESSAGE.id)
        assert int(seen.headers["content-length"]) == len(seen.body)
    assert "cookie" not in first.headers
    assert second.headers["cookie"] == "lb=node-7"


def test_http_wrong_secret_is_rejected_by_the_server(server: ScriptedServer) -> None:
    server.script(verify_signature)

    error = send_error(http_settings(server.url, secret="wrong"))

    assert (error.kind, error.http_status) == (ErrorKind.PERMANENT, 401)
    assert error.reason == "http 401: bad_signature"


def test_http_without_a_secret_sends_no_signature(server: ScriptedServer) -> None:
    server.script(Reply(204))

    assert send(http_settings(server.url, secret="")) is None
    assert "x-outbox-signature" not in server.requests[0].headers
    assert "x-outbox-signature-256" not in server.requests[0].headers


def test_http_429_is_a_throttle_with_retry_after_in_seconds(server: ScriptedServer) -> None:
    server.script(Reply(429, b"slow down", {"Retry-After": "7"}))

    error = send_error(http_settings(server.url))

    assert (error.kind, error.http_status, error.retry_after) == (ErrorKind.THROTTLED, 429, 7.0)


def test_http_retry_after_as_an_http_date(server: ScriptedServer) -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    server.script(Reply(503, b"", {"Retry-After": format_datetime(when, usegmt=True)}))

    error = send_error(http_settings(server.url))

    assert error.kind is ErrorKind.TRANSIENT
    assert error.retry_after is not None
    assert 100 < error.retry_after <= 120


@pytest.mark.parametrize(
    "body",
    [
        {"error": "session_not_ready"},
        {"error": {"code": "session_not_ready", "message": "QR code not scanned"}},
    ],
)
def test_http_session_not_ready_is_transient(server: ScriptedServer, body: dict[str, Any]) -> None:
    server.script(Reply(409, body))

    error = send_error(http_settings(server.url))

    assert (error.kind, error.http_status) == (ErrorKind.TRANSIENT, 409)
    assert "session_not_ready" in error.reason


def test_http_relayed_cloud_code_is_classified(server: ScriptedServer) -> None:
    server.script(Reply(502, {"error": {"code": 131026, "message": "Message undeliverable"}}))

    error = send_error(http_settings(server.url))

    assert (error.kind, error.code) == (ErrorKind.PERMANENT, 131026)
    assert error.reason == "http 502: 131026: Message undeliverable"


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, 130429, ErrorKind.THROTTLED),
        (502, 130429, ErrorKind.THROTTLED),
        (429, 131056, ErrorKind.PAIR_THROTTLED),
    ],
)
def test_http_relayed_cloud_rate_limits_are_throttles(
    server: ScriptedServer, status: int, code: int, kind: ErrorKind
) -> None:
    server.script(Reply(status, {"error": {"code": code, "message": "Rate limit hit"}}))

    error = send_error(http_settings(server.url))

    assert (error.kind, error.code, error.http_status) == (kind, code, status)


def test_http_plain_4xx_is_permanent(server: ScriptedServer) -> None:
    server.script(Reply(422, b"<html>bad</html>"))

    error = send_error(http_settings(server.url))

    assert (error.kind, error.code, error.reason) == (ErrorKind.PERMANENT, None, "http 422")


def test_http_timeout_is_unknown(server: ScriptedServer) -> None:
    server.script(Reply(200, hang=True))

    error = send_error(http_settings(server.url), timeout=0.3)

    assert error.kind is ErrorKind.UNKNOWN
    assert "timeout" in error.reason


# The size of an answer ------------------------------------------------------------

MIB = 1024 * 1024


def capped_settings(which: str, url: str, **extra: Any) -> Settings:
    if which == "cloud":
        return cloud_settings(url, **extra)
    return Settings(provider="http", provider_url=url, provider_secret=SECRET, **extra)


def success_body(size: int) -> bytes:
    """A 2xx answer both providers would take (an id each reads), `size` bytes long."""
    head = b'{"id": "gw-1", "messages": [{"id": "wamid.X"}], "padding": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def assert_too_large(error: ProviderError, limit: int) -> None:
    assert error.kind is ErrorKind.TRANSIENT
    assert f"{limit}-byte limit" in error.reason, error.reason
    assert "OUTBOX_PROVIDER_MAX_RESPONSE_BYTES" in error.reason


@pytest.mark.parametrize("which", ["cloud", "http"])
def test_an_answer_over_the_limit_is_a_transient_error(server: ScriptedServer, which: str) -> None:
    """2 MiB against the default 1 MiB: declared by Content-Length, or chunked (read until
    the limit), or a small gzip body that inflates past it."""
    server.script(
        Reply(200, success_body(2 * MIB)),
        Reply(200, chunks=[success_body(2 * MIB)[i : i + 65536] for i in range(0, 2 * MIB, 65536)]),
        Reply(200, gzip.compress(success_body(2 * MIB)), {"Content-Encoding": "gzip"}),
    )
    settings = capped_settings(which, server.url)

    for _ in range(3):
        error = send_error(settings)
        assert_too_large(error, MIB)
        assert error.http_status == 200
    assert len(server.requests) == 3


@pytest.mark.parametrize("which", ["cloud", "http"])
def test_the_limit_is_the_setting_and_an_answer_of_that_size_is_read(
    server: ScriptedServer, which: str
) -> None:
    server.script(Reply(200, success_body(4096)), Reply(200, success_body(4097)))
    settings = capped_settings(which, server.url, provider_max_response_bytes=4096)

    assert send(settings) in ("gw-1", "wamid.X")
    assert_too_large(send_error(settings), 4096)


def test_an_endless_answer_is_not_read_to_its_end(server: ScriptedServer) -> None:
    """A provider (or whatever answers at its address) streaming without end: the call ends
    at the limit and closes the connection; the server cannot write the rest."""
    total = 64 * MIB
    server.script(Reply(200, chunks=(b"x" * 65536 for _ in range(total // 65536))))

    error = send_error(capped_settings("http", server.url))

    assert_too_large(error, MIB)
    wait_for(server.cut_off.is_set, what="the server to see the connection closed")
    assert server.written < total / 2, server.written


# Fake -------------------------------------------------------------------------------


def test_fake_failure_rate_one_always_fails_transiently() -> None:
    provider = FakeProvider(failure_rate=1.0)
    for _ in range(20):
        with pytest.raises(ProviderError) as info:
            asyncio.run(provider.send(MESSAGE))
        assert info.value.kind is ErrorKind.TRANSIENT


def test_fake_failure_rate_zero_returns_an_id() -> None:
    ids = {asyncio.run(FakeProvider(failure_rate=0.0).send(MESSAGE)) for _ in range(20)}
    assert len(ids) == 20
    assert all(i is not None and i.startswith("fake-") and len(i) == 37 for i in ids)


@pytest.mark.parametrize(("draw", "fails"), [(0.29, True), (0.3, False), (0.99, False)])
def test_fake_failure_follows_the_random_source(draw: float, fails: bool) -> None:
    provider = FakeProvider(failure_rate=0.3, random=lambda: draw)
    if fails:
        with pytest.raises(ProviderError):
            asyncio.run(provider.send(MESSAGE))
    else:
        assert asyncio.run(provider.send(MESSAGE))


@pytest.mark.parametrize(("latency_ms", "sleeps"), [(0, []), (25, [0.025])])
def test_fake_latency(
    monkeypatch: pytest.MonkeyPatch, latency_ms: float, sleeps: list[float]
) -> None:
    seen: list[float] = []

    async def fake_sleep(delay: float) -> None:
        seen.append(delay)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)  # records, so the test never waits
    settings = Settings(provider="fake", fake_latency_ms=latency_ms)

    assert send(settings) is not None
    assert seen == sleeps


# Factory and helpers ----------------------------------------------------------------


def test_build_provider_picks_the_configured_one() -> None:
    async def go() -> list[str]:
        async with httpx.AsyncClient() as client:
            providers = [
                environment_provider(Settings(provider="fake"), client),
                environment_provider(http_settings("http://gw.local/send"), client),
                environment_provider(cloud_settings("https://graph.facebook.com"), client),
            ]
        assert isinstance(providers[0], FakeProvider)
        assert isinstance(providers[1], HttpProvider)
        assert isinstance(providers[2], CloudProvider)
        return [p.name for p in providers]

    assert asyncio.run(go()) == ["fake", "http", "cloud"]


@pytest.mark.parametrize(
    "settings",
    [
        {"provider": "cloud", "cloud_phone_number_id": "", "cloud_token": TOKEN},
        {"provider": "cloud", "cloud_phone_number_id": PHONE_ID, "cloud_token": ""},
        {"provider": "http", "provider_url": "gw.local/send"},
    ],
)
def test_build_provider_rejects_an_unusable_configuration(settings: dict[str, Any]) -> None:
    async def go() -> None:
        async with httpx.AsyncClient() as client:
            environment_provider(Settings(**settings), client)

    with pytest.raises(ValueError):
        asyncio.run(go())


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
