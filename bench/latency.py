"""Latency workloads at a steady rate: the `m4` step (a POST answered → the call arriving
at the bench's provider server, through `serve` and `dispatch`) and the `m4_floor` step
(the same path with the thinnest client, bench/m4_floor.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from bench import m4_floor as floor_worker
from bench.common import TEXT, CpuMeter, Proc, next_recipient, payload_bytes, pct, wait_ready
from bench.harness import SEND, Harness, wait_lines
from bench.httpclient import RawClient, build_post

T = TypeVar("T")

WARM = 10  # calls before timing: the pool and the provider connection set up
Sent = list[tuple[str, float, float]]  # (key, call, return) epochs of each enqueue


def paced(
    h: Harness,
    enqueue: Callable[[int], T],
    key_of: Callable[[T], str],
    rate: float | None = None,
    seconds: float | None = None,
) -> tuple[Sent, int]:
    """M4's producer: `enqueue(i)` at a steady rate (M4's unless given; scheduled at t0 +
    i/rate, no catch-up bursts) for `seconds` (M4's), each awaited; (key, call, return)
    epochs, the return stamped before `key_of` reads the answer, and how many calls
    were late."""
    rate = rate or h.cfg.m4_rate
    seconds = seconds or h.cfg.m4_seconds
    sent: Sent = []
    late = 0
    t0 = time.time() + 0.2
    for i in range(int(rate * seconds)):
        delay = t0 + i / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.005:
            late += 1
        t_call = time.time()
        answer = enqueue(i)
        t_ret = time.time()
        sent.append((key_of(answer), t_call, t_ret))
    return sent, late


# M4 ---------------------------------------------------------------------------------------


def m4(h: Harness, rep: int) -> None:
    h.db.reset()
    h.db.checkpoint()
    provider, provider_port, arrivals = h.start_provider(f"m4-{rep}")
    serve: Proc | None = None
    dispatcher: Proc | None = None
    try:
        serve, port = h.start_serve(f"m4-{rep}")
        (dispatcher,) = h.start_dispatchers(
            f"m4-{rep}",
            1,
            OUTBOX_PROVIDER="http",
            OUTBOX_PROVIDER_URL=f"http://127.0.0.1:{provider_port}/send",
            OUTBOX_PROVIDER_SECRET=h.secret,  # signed, as a deployment's calls are
        )
        wait_ready([dispatcher])
        pids = {"serve": [serve.pid], "dispatch": [dispatcher.pid], "provider": [provider.pid]}
        sent, late, cpu = _m4_posts(h, port, arrivals, pids)
    finally:
        if dispatcher is not None:
            h.stop(dispatcher, "dispatch")
        if serve is not None:
            h.stop(serve, "serve")
        provider.stop()
    # PROTOCOL.md times the peers to their handler's first statement; the same
    # moment here is the attempt's start as the dispatcher records it (its clock,
    # just before the call; the `attempt started` line is written a moment later).
    started = {
        message_id: float(epoch)
        for message_id, epoch in h.db.q(
            "SELECT message_id::text, extract(epoch FROM started_at) "
            "FROM outbox.attempts WHERE attempt = 1"
        ).fetchall()
    }
    post_ms = [1000 * (t_ret - t_call) for _, t_call, t_ret in sent]
    record_latency(
        h,
        "m4",
        sent,
        arrivals,
        started,
        late_posts=late,
        post_p50_ms=round(pct(post_ms, 50), 3),
        post_p99_ms=round(pct(post_ms, 99), 3),
        cpu=cpu,
    )


def _task_id(answer: tuple[int, bytes]) -> str:
    status, body = answer
    if status != 202:
        raise RuntimeError(f"M4 POST answered {status}: {body[:200]!r}")
    return str(json.loads(body)["task_id"])


def _m4_posts(
    h: Harness, port: int, arrivals: Path, pids: dict[str, list[int]]
) -> tuple[Sent, int, dict[str, Any]]:
    """M4's timed POSTs on one kept-alive connection, after a warm-up and 1 s idle."""
    host = f"127.0.0.1:{port}"
    requests = [
        build_post(SEND, host, h.token, payload_bytes(f"c-{i:010d}"))
        for i in range(int(h.cfg.m4_rate * h.cfg.m4_seconds))
    ]
    with RawClient("127.0.0.1", port) as client:
        for i in range(WARM):  # pool, provider connection: set up before timing
            client.request(build_post(SEND, host, h.token, payload_bytes(f"w-{i}")))
        wait_lines(arrivals, WARM, 15)
        time.sleep(1.0)  # the dispatcher idles for 1 s, as in PROTOCOL.md
        meter = CpuMeter(pids, self_cpu=True)
        sent, late = paced(h, lambda i: client.request(requests[i]), _task_id)
    wait_lines(arrivals, WARM + len(sent), 15)
    cpu = meter.stop()
    cpu["loadgen"] = cpu.pop("bench")
    return sent, late, cpu


# M4's floor -------------------------------------------------------------------------------


def m4_floor(h: Harness, rep: int) -> None:
    """M4's path with the thinnest client (bench/m4_floor.py), in the same run."""
    h.db.q(floor_worker.TABLE)
    h.db.checkpoint()
    provider, provider_port, arrivals = h.start_provider(f"m4floor-{rep}")
    starts = h.outdir / f"m4floor-{rep}-starts.txt"
    worker = h.start_python(
        f"m4floor-{rep}",
        *("-m", "bench.m4_floor", "--db", h.db.url),
        *("--port", str(provider_port), "--out", str(starts)),
    )
    try:
        wait_lines(worker.log_path, 1, 15)
        if worker.log_path.read_text().strip() != "ready":
            raise RuntimeError(f"{worker.name} did not start, see {worker.log_path}")
        pids = {"worker": [worker.pid], "provider": [provider.pid]}
        sent, late, cpu = _floor_inserts(h, arrivals, pids)
    finally:
        worker.stop()
        provider.stop()
    started = {}
    for line in starts.read_text().splitlines():
        key, _, stamp = line.partition(" ")
        started[key] = float(stamp)
    record_latency(h, "m4floor", sent, arrivals, started, late_posts=late, cpu=cpu)


def _floor_inserts(
    h: Harness, arrivals: Path, pids: dict[str, list[int]]
) -> tuple[Sent, int, dict[str, Any]]:
    """The floor's timed rows, each INSERTed and NOTIFYed in one autocommitted statement."""
    with psycopg.connect(h.db.url, autocommit=True) as producer:
        body = Jsonb({"body": TEXT, "preview_url": False})

        def enqueue(_i: int) -> tuple[Any, ...] | None:
            args = {"to": next_recipient(), "payload": body}  # each row its own recipient
            return producer.execute(floor_worker.ENQUEUE, args).fetchone()

        def row_id(row: tuple[Any, ...] | None) -> str:
            assert row is not None
            return str(row[0])

        for i in range(WARM):
            enqueue(i)
        wait_lines(arrivals, WARM, 15)
        time.sleep(1.0)
        meter = CpuMeter(pids, self_cpu=True)
        sent, late = paced(h, enqueue, row_id)
        wait_lines(arrivals, WARM + len(sent), 15)
        cpu = meter.stop()
        cpu["loadgen"] = cpu.pop("bench")
    return sent, late, cpu


# Percentiles ------------------------------------------------------------------------------


def record_latency(
    h: Harness,
    name: str,
    sent: Sent,
    arrivals: Path,
    started: dict[str, float],
    **detail: Any,
) -> None:
    """Percentiles from each enqueue's return to its call's arrival, and to its start."""
    first: dict[str, float] = {}
    lines = arrivals.read_text().splitlines()
    for line in lines:
        key, _, stamp = line.partition(" ")
        first.setdefault(key, float(stamp))
    ms = [1000 * (first[key] - t_ret) for key, _, t_ret in sent if key in first]
    from_call = [1000 * (first[key] - t_call) for key, t_call, _ in sent if key in first]
    to_start = [1000 * (started[key] - t_ret) for key, _, t_ret in sent if key in started]
    missing = len(sent) - len(ms)
    if not ms:
        raise RuntimeError(f"{name}: no provider call arrived ({missing} missing)")
    detail = {
        "n": len(sent),
        "missing": missing,
        "duplicates": len(lines) - len(first),
        "from_call_p50_ms": round(pct(from_call, 50), 3),
        **detail,
    }
    for label, value in (
        ("p50", pct(ms, 50)),
        ("p95", pct(ms, 95)),
        ("p99", pct(ms, 99)),
        ("max", max(ms)),
        ("start_p50", pct(to_start, 50)),
        ("start_p99", pct(to_start, 99)),
    ):
        h.record(f"{name}_{label}", "ms", value, **detail)
    if missing:
        h.log(f"warning: {name}: {missing} of {len(sent)} calls never arrived")
