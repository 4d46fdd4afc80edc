"""Real `outbox dispatch` processes and a real local HTTP server playing the provider."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.leaks import leaks
from tests.support import ServerThread, wait_for

PROVIDER_SECRET = "provider-secret"


@dataclass
class Call:
    task_id: str
    attempt: int
    idempotency_key: str
    signature: str
    signature_256: str
    body: bytes
    at: float  # time.time() when the call arrived
    path: str = "/send"  # where it arrived (senders of their own are given other paths)


@dataclass
class Reply:
    status: int = 200
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Script = Callable[[Call, int], Reply]  # (call, how many calls this task had before) → reply


class ScriptedProvider:
    """A provider that answers as each test scripts it and records every call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self.script: Script = lambda call, n: Reply(body={"id": f"prov-{call.task_id}"})
        self.app = Starlette(routes=[Route("/{name}", self._send, methods=["POST"])])

    async def _send(self, request: Request) -> Response:
        body = await request.body()
        data = await request.json()
        call = Call(
            task_id=data["task_id"],
            attempt=data["attempt"],
            idempotency_key=request.headers.get("idempotency-key", ""),
            signature=request.headers.get("x-outbox-signature", ""),
            signature_256=request.headers.get("x-outbox-signature-256", ""),
            body=body,
            at=time.time(),
            path=request.url.path,
        )
        with self._lock:
            previous = sum(1 for c in self.calls if c.task_id == call.task_id)
            self.calls.append(call)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        reply = self.script(call, previous)
        try:
            if reply.delay:
                await asyncio.sleep(reply.delay)
        finally:
            with self._lock:
                self.in_flight -= 1
        return JSONResponse(reply.body or {}, status_code=reply.status, headers=reply.headers)

    def calls_for(self, task_id: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.task_id == task_id]

    def keys(self) -> list[str]:
        with self._lock:
            return [c.idempotency_key for c in self.calls]


@pytest.fixture
def provider() -> Iterator[tuple[ScriptedProvider, str]]:
    scripted = ScriptedProvider()
    with ServerThread(scripted.app) as server:
        yield scripted, f"{server.url}/send"


class DispatcherProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "outbox", "dispatch"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20) -> None:
        wait_for(
            lambda: '"ready"' in self.log() or self.proc.poll() is not None,
            timeout=timeout,
            what="dispatcher ready",
        )
        assert self.proc.poll() is None, self.log()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def dispatcher_env(database_url: str, provider: tuple[ScriptedProvider, str]) -> dict[str, str]:
    _, url = provider
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(
        OUTBOX_DATABASE_URL=database_url,
        OUTBOX_PROVIDER="http",
        OUTBOX_PROVIDER_URL=url,
        OUTBOX_PROVIDER_SECRET=PROVIDER_SECRET,
        OUTBOX_PROVIDER_TIMEOUT="2s",
        OUTBOX_LEASE_SECONDS="10s",
        OUTBOX_RETRY_BASE_DELAY="100ms",
        OUTBOX_RETRY_MAX_DELAY="1s",
        OUTBOX_RETRY_JITTER="0",
        OUTBOX_POLL_INTERVAL="200ms",
        OUTBOX_LOG_FORMAT="json",
        OUTBOX_LOG_LEVEL="info",
        OUTBOX_METRICS_PORT="0",  # no port each; the metrics tests give theirs
    )
    return env


@pytest.fixture
def start_dispatcher(
    dispatcher_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., DispatcherProcess]]:
    started: list[DispatcherProcess] = []

    def start(ready: bool = True, **overrides: str) -> DispatcherProcess:
        env = dict(dispatcher_env)
        env["OUTBOX_DISPATCHER_ID"] = f"d{len(started) + 1}"
        env.update({f"OUTBOX_{k.upper()}": v for k, v in overrides.items()})
        process = DispatcherProcess(env, tmp_path / f"dispatcher-{len(started) + 1}.log")
        started.append(process)
        if ready:
            process.wait_ready()
        return process

    yield start
    for process in started:
        process.close()
    leaked = [
        line for process in started for line in leaks(process.log().splitlines(), PROVIDER_SECRET)
    ]
    assert leaked == [], f"log lines that leak a phone, a token or a secret: {leaked[:5]}"


def insert_messages(
    conn: psycopg.Connection,
    count: int,
    *,
    user_id: str = "user-1",
    max_attempts: int = 4,
    send_at: str | None = None,
    expires_at: str | None = None,
    sender: str = "default",
) -> list[str]:
    """Queue `count` text messages directly (the API is tested elsewhere), each to a
    recipient of its own: no conversation orders them."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    conn.execute(
        """INSERT INTO outbox.messages
               (id, user_id, "to", type, payload, request_hash, max_attempts, send_at, expires_at,
                next_attempt_at, sender)
           SELECT id, %s, '5511' || lpad(n::text, 9, '0'), 'text',
                  '{"body": "hi", "preview_url": false}',
                  '\\x00', %s, %s::timestamptz, %s::timestamptz,
                  GREATEST(now(), COALESCE(%s::timestamptz, now())), %s
           FROM unnest(%s::uuid[]) WITH ORDINALITY AS t(id, n)""",
        [user_id, max_attempts, send_at, expires_at, send_at, sender, ids],
    )
    return ids


def statuses(conn: psycopg.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) FROM outbox.messages GROUP BY 1").fetchall()
    return {status: count for status, count in rows}


def wait_all(conn: psycopg.Connection, status: str, count: int, timeout: float = 30) -> None:
    wait_for(
        lambda: statuses(conn).get(status, 0) == count,
        timeout=timeout,
        what=f"{count} messages {status} (now {statuses(conn)})",
    )


__all__ = ["Reply", "ScriptedProvider", "insert_messages", "signal", "statuses", "wait_all"]


# claim_messages' parameters for a statement-level test (no dispatcher): add "limit".
CLAIM_PARAMS = {
    "dispatcher": "d-1",
    "lease_seconds": 30,
    "now": None,
    "burst": 0.2,
    "paced": 1000,
    "cursors": "{}",
    "user_max": None,
}
