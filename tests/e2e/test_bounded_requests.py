"""No request stalls or exhausts a real `outbox serve`: hostile batch bodies
are refused within bounded memory while /healthz keeps answering, and clients that
leave mid-body are counted as 499 without a traceback."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from outbox.auth import mint_token
from tests.conftest import JWT_SECRET
from tests.e2e.conftest import Process
from tests.scrape import scrape, total
from tests.support import wait_for

BATCH = "/api/v1/whatsapp/send/batch"
SEND = "/api/v1/whatsapp/send/"
MiB = 1024 * 1024


class HealthPoller:
    """GET /healthz in a loop on a thread of its own; the slowest answer it saw."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.slowest = 0.0
        self.answers = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = http.get(f"{self.url}/healthz").status_code
                except httpx.TransportError as exc:
                    self.failures.append(repr(exc))
                    continue
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.answers += 1
                if status != 200:
                    self.failures.append(f"status {status}")
                time.sleep(0.01)  # pacing of the poller itself, not a wait on the server

    @contextmanager
    def running(self) -> Iterator[HealthPoller]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=15)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def nested_batch(size: int) -> bytes:
    """`{"messages": [[[], [], …]]}` of about `size` bytes: millions of lists once parsed."""
    return b'{"messages": [[' + b",".join([b"[]"] * (size // 3)) + b"]]}"


def test_nested_batches_are_refused_without_stalling_or_bloating(
    serve: tuple[Process, str],
) -> None:
    process, url = serve
    headers = {
        "Authorization": f"Bearer {mint_token(JWT_SECRET, 'user-1')}",
        "Content-Type": "application/json",
    }
    bodies = [
        nested_batch(12 * MiB),
        b'{"messages": [' + b",".join([b"[]"] * (12 * MiB // 3)) + b"]}",
        b'{"messages": [{"type": "text", "a": [' + b",".join([b"{}"] * (12 * MiB // 3)) + b"]}]}",
    ]
    with HealthPoller(url).running() as poller, httpx.Client(timeout=60) as http:
        for raw in bodies:
            response = http.post(f"{url}{BATCH}", content=raw, headers=headers)
            assert 400 <= response.status_code < 500, response.text[:300]
            assert response.json()["error"]["code"] == "payload_too_large"
        wait_for(lambda: poller.answers >= 5, timeout=10, what="a few /healthz answers")
    assert poller.failures == []
    assert poller.slowest < 1.0, f"/healthz stalled {poller.slowest:.3f} s"
    assert peak_rss_mb(process.popen.pid) < 300


def test_a_client_leaving_mid_body_is_a_499_without_a_traceback(
    serve: tuple[Process, str],
) -> None:
    process, url = serve
    port = int(url.rsplit(":", 1)[1])
    token = mint_token(JWT_SECRET, "user-1")
    head = (
        f"POST {SEND} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        '{"to": "5511999999999", "type": "text", "text": "'
    ).encode()
    leaving = 200
    with HealthPoller(url).running() as poller:
        for _ in range(leaving):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(head)

        def counted() -> bool:
            samples = scrape(f"{url}/metrics")
            return (
                total(samples, "outbox_http_request_duration_seconds_count", status="499")
                >= leaving
            )

        wait_for(counted, timeout=30, what="every early leaver counted as 499")
    samples = scrape(f"{url}/metrics")
    assert total(samples, "outbox_http_request_duration_seconds_count", status="500") == 0
    assert (
        total(samples, "outbox_http_request_duration_seconds_count", route=SEND, status="499")
        == leaving
    )
    assert poller.failures == []
    assert poller.slowest < 1.0, f"/healthz stalled {poller.slowest:.3f} s"

    # One info line each, no traceback, nothing at error level.
    def logged() -> list[dict[str, object]]:
        output = process.stdout + process.stderr
        return [json.loads(line) for line in output if line.startswith("{")]

    wait_for(
        lambda: sum(line.get("status") == 499 for line in logged()) >= leaving,
        timeout=30,
        what="a request line for every early leaver",
    )
    lines = logged()
    left = [line for line in lines if line.get("status") == 499]
    assert len(left) == leaving
    assert {line["level"] for line in left} == {"info"}
    assert not [line for line in lines if line.get("level") in ("error", "critical")]
    assert not any("Traceback" in line for line in process.stdout + process.stderr)
