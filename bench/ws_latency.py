"""POST → WebSocket event latency of the live status feed.

Starts `outbox serve` and `outbox dispatch` (fake provider) on a fresh database of the
local PostgreSQL (or OUTBOX_BENCH_DATABASE_URL's server), opens one feed, POSTs N messages
at a steady rate and reports p50/p99/max of the time from sending the POST to receiving
the message's `message_sent` event.

    .venv/bin/python -m bench.ws_latency [--count 1000] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid

import httpx
import orjson
import psycopg
import websockets
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbox import db
from outbox.auth import mint_token

SECRET = "bench-secret-that-is-long-enough-for-hs256!"
BODY = {"to": "5511999999999", "type": "text", "text": "latency probe"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


async def measure(port: int, token: str, count: int, rate: float) -> list[float]:
    """POST→`message_sent` latencies (ms) of `count` POSTs sent at `rate` per second (each
    started at t0 + i/rate, so a slow answer does not delay the next), through one feed."""
    sent_at: dict[str, float] = {}
    arrived: dict[str, float] = {}
    done = asyncio.Event()
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/whatsapp/?token={token}") as feed:

        async def listen() -> None:
            async for message in feed:
                event = orjson.loads(message)
                if event["event"] == "message_sent":
                    arrived[event["data"]["message_id"]] = time.perf_counter()
                    if len(arrived) >= count:
                        done.set()
                        return

        listener = asyncio.create_task(listen())
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as http:

            async def post() -> None:
                started = time.perf_counter()
                response = await http.post("/api/v1/whatsapp/send/", json=BODY)
                sent_at[response.json()["task_id"]] = started

            posts = []
            t0 = time.perf_counter()
            for i in range(count):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                posts.append(asyncio.create_task(post()))
            await asyncio.gather(*posts)
        await asyncio.wait_for(done.wait(), 60)
        listener.cancel()
    return [(arrived[task] - sent_at[task]) * 1000 for task in sent_at]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="POSTs per second")
    args = parser.parse_args()
    admin = os.environ.get(
        "OUTBOX_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    name = f"outbox_wslat_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(admin, dbname=name)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(
        OUTBOX_DATABASE_URL=url,
        OUTBOX_JWT_SECRET=SECRET,
        OUTBOX_PORT=str(port),
        OUTBOX_PROVIDER="fake",
        OUTBOX_LOG_LEVEL="warning",
        OUTBOX_LOG_FORMAT="json",
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        db.migrate(url)
        for role in ("serve", "dispatch"):
            procs.append(subprocess.Popen([sys.executable, "-m", "outbox", role], env=env))
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("outbox serve did not become ready")
            time.sleep(0.1)
        latencies = asyncio.run(measure(port, mint_token(SECRET, "bench"), args.count, args.rate))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    host = conninfo_to_dict(admin).get("host", "local")
    print(
        f"POST→event latency over {len(latencies)} messages at {args.rate:g}/s "
        f"(fake provider, PostgreSQL at {host}): "
        f"p50 {_pct(latencies, 50):.1f} ms, p99 {_pct(latencies, 99):.1f} ms, "
        f"max {max(latencies):.1f} ms"
    )


if __name__ == "__main__":
    main()
