"""The `ws` step: BENCH_WS_CLIENTS idle status feeds on one `serve` (bench/ws_idle.py, a
process of its own), that serve's RSS before, with them and once they have left, and the
POST → `message_sent` event latency through one more feed at M4's rate meanwhile.

The latency alone, through one feed with no idle ones, on a fresh database:

    .venv/bin/python -m bench.feeds [--count 1000] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.request

import httpx
import orjson
import websockets
from psycopg.conninfo import conninfo_to_dict

from bench import ws_idle
from bench.common import CpuMeter, Proc, next_recipient, pct, stop_all, vm_rss_mb, wait_ready
from bench.config import Config
from bench.harness import SEND, Harness, wait_lines, wait_log

BODY = {"type": "text", "text": "latency probe"}  # each POST adds its own recipient


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
                response = await http.post(SEND, json={**BODY, "to": next_recipient()})
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


def wait_feeds(port: int, n: int, serve: Proc, timeout: float = 120.0) -> None:
    """Until serve's `outbox_websocket_clients` gauge reads n."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        if not serve.alive():
            raise RuntimeError(f"{serve.name} exited, see {serve.log_path}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            found = re.search(rb"^outbox_websocket_clients (\S+)", answer.read(), re.M)
        seen = float(found.group(1)) if found else None
        if seen == n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{serve.name}: {seen} feeds connected, not {n}")


def ws(h: Harness, rep: int) -> None:
    """Its serve stays out of the `peak RSS, serve` row: the feeds are what it holds."""
    n = h.cfg.ws_clients
    ws_idle.raise_fd_limit(n + 2000)  # serve inherits it: one descriptor per feed
    h.db.reset()
    h.db.checkpoint()
    serve, port = h.start_serve(f"ws-{rep}")
    (dispatcher,) = h.start_dispatchers(f"ws-{rep}", 1)
    idle: Proc | None = None
    try:
        wait_ready([dispatcher])
        # Pool, imports and the feed's path warm, outside the measurements.
        asyncio.run(measure(port, h.token, 20, h.cfg.m4_rate))
        before = vm_rss_mb(serve.pid)
        idle = h.start_python(
            f"ws-idle-{rep}", "-m", "bench.ws_idle", "--port", str(port), "--count", str(n)
        )
        wait_lines(idle.log_path, 1, 300)
        opened = idle.log_path.read_text().strip()
        if not opened.startswith(f"open {n} "):
            raise RuntimeError(f"{idle.name}: {opened[-300:]!r}, see {idle.log_path}")
        wait_feeds(port, n, serve)
        held = vm_rss_mb(serve.pid)
        meter = CpuMeter({"serve": [serve.pid], "dispatch": [dispatcher.pid]}, self_cpu=True)
        count = int(h.cfg.m4_rate * h.cfg.m4_seconds)
        latencies = asyncio.run(measure(port, h.token, count, h.cfg.m4_rate))
        cpu = meter.stop()
        cpu["loadgen"] = cpu.pop("bench")
        idle.stop()
        wait_feeds(port, 0, serve)
        trimmed = wait_log(serve, "heap trimmed after websocket clients left", 15)
        after = vm_rss_mb(serve.pid)
    finally:
        if idle is not None:
            idle.stop()
        h.stop(dispatcher, "dispatch")
        peak = serve.read_peak_rss()
        serve.stop()
    if before is None or held is None or after is None:
        raise RuntimeError("serve's RSS could not be read (/proc)")
    detail = {"clients": n, "connect": opened.split()[-1], "peak_rss_mb": peak}
    h.record("ws_rss_before", "MB", before, **detail)
    per_feed = round(1024 * (held - before) / n, 1)  # KB
    h.record("ws_rss", "MB", held, kb_per_feed=per_feed, **detail)
    h.record("ws_rss_after", "MB", after, heap_trimmed=trimmed, **detail)
    for label, p in (("p50", 50), ("p99", 99)):
        h.record(f"ws_{label}", "ms", pct(latencies, p), n=len(latencies), cpu=cpu)


def main() -> None:
    """The latency alone: one `serve` and one `dispatch` (fake provider, `warning` logs),
    after 20 POSTs that warm them up."""
    parser = argparse.ArgumentParser(description="POST → WebSocket event latency")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="POSTs per second")
    args = parser.parse_args()
    h = Harness(Config.from_env())
    try:
        h.setup()
        h.start_dispatchers("probe", 1, OUTBOX_LOG_LEVEL="warning")
        _, port = h.start_serve("probe", OUTBOX_LOG_LEVEL="warning")
        # Until events flow (the dispatcher started too), as the `ws` step warms up.
        asyncio.run(measure(port, h.token, 20, args.rate))
        latencies = asyncio.run(measure(port, h.token, args.count, args.rate))
    finally:
        stop_all()
        h.teardown()
    host = conninfo_to_dict(h.db.url).get("host", "local")
    print(
        f"POST→event latency over {len(latencies)} messages at {args.rate:g}/s "
        f"(fake provider, PostgreSQL at {host}): "
        f"p50 {pct(latencies, 50):.1f} ms, p99 {pct(latencies, 99):.1f} ms, "
        f"max {max(latencies):.1f} ms"
    )


if __name__ == "__main__":
    main()
