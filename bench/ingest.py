"""Ingest workloads: the `floor` step (pgbench's single-row INSERT into a table shaped like
`messages`) and the `m1` step (one client's sequential POSTs, the same against M1's stack
floor bench/bare_app.py, 16 clients with wrk, and the batch endpoint)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from bench import sql
from bench.common import CpuMeter, Proc, free_port, payload, payload_bytes
from bench.harness import SEND, SEND_BATCH, Harness, Skipped, wait_tcp
from bench.httpclient import RawClient, build_post
from bench.wrk import run_wrk

# Floor ------------------------------------------------------------------------------------


def _pg_env(db_url: str) -> dict[str, str]:
    """The caller's environment with the database's address as libpq's PG* variables."""
    info = conninfo_to_dict(db_url)
    env = dict(os.environ)
    for key, var in (
        ("host", "PGHOST"),
        ("port", "PGPORT"),
        ("user", "PGUSER"),
        ("password", "PGPASSWORD"),
        ("dbname", "PGDATABASE"),
    ):
        if info.get(key):
            env[var] = str(info[key])
    return env


def floor(h: Harness, rep: int) -> None:
    if not h.pgbench:
        raise Skipped("pgbench not found (PATH, /usr/lib/postgresql/*/bin)")
    script = h.outdir / "floor_insert.sql"
    script.write_text(sql.FLOOR_SCRIPT)
    env = _pg_env(h.db.url)
    for clients in (1, 16):
        _floor_run(h, rep, script, env, clients)
    h.db.q("DROP TABLE IF EXISTS bench.floor_messages")


def _floor_run(h: Harness, rep: int, script: Path, env: dict[str, str], clients: int) -> None:
    assert h.pgbench is not None
    h.db.q(sql.FLOOR_TABLE)
    h.db.checkpoint()
    args = [
        h.pgbench,
        "-n",
        "-M",
        "prepared",
        "-f",
        str(script),
        "-c",
        str(clients),
        "-j",
        str(min(2, clients)),
        "-T",
        str(h.cfg.floor_seconds),
    ]
    out_path = h.outdir / f"floor-c{clients}-{rep}.txt"
    meter = CpuMeter({})
    with open(out_path, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = meter.stop()
    text = out_path.read_text()
    tps = re.search(r"^tps = ([0-9.]+)", text, re.M)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    if proc.returncode != 0 or not tps:
        raise RuntimeError(f"pgbench failed ({proc.returncode}), see {out_path}")
    rows = h.db.scalar("SELECT count(*) FROM bench.floor_messages")
    gen = 100 * (usage.ru_utime + usage.ru_stime) / h.cfg.floor_seconds
    h.record(
        f"floor_c{clients}",
        "tx/s",
        float(tps.group(1)),
        clients=clients,
        failed=int(failed.group(1)) if failed else None,
        rows=rows,
        cpu={"pgbench": round(gen, 1), **cpu},
    )


# M1 ---------------------------------------------------------------------------------------


def _fresh(h: Harness) -> None:
    """An empty queue and a checkpoint between two measurements."""
    h.db.reset()
    h.db.checkpoint()


def m1(h: Harness, rep: int) -> None:
    h.db.reset()
    serve, port = h.start_serve(f"m1-{rep}")
    try:
        _warm_up(h, port)
        _fresh(h)
        _single(h, serve, port, "m1_single")
        _fresh(h)
        _bare(h, rep)
        _fresh(h)
        try:
            _concurrent(h, serve, port, rep)
        except Skipped as exc:
            h.skipped("m1_16", rep, exc)
        h.db.settle()
        _fresh(h)
        _batch(h, serve, port)
    finally:
        h.stop(serve, "serve")


def _warm_up(h: Harness, port: int) -> None:
    """Pool connections, imports and caches warm, outside every timed region."""
    host = f"127.0.0.1:{port}"
    with RawClient("127.0.0.1", port) as client:
        for i in range(200):
            body = payload_bytes(f"warm-{i:06d}")
            status, _ = client.request(build_post(SEND, host, h.token, body))
            if status != 202:
                raise RuntimeError(f"warm-up POST answered {status}")
        batch = json.dumps({"messages": [payload(f"warmb-{i:06d}") for i in range(1000)]})
        status, _ = client.request(build_post(SEND_BATCH, host, h.token, batch.encode()))
        if status != 202:
            raise RuntimeError(f"warm-up batch answered {status}")
    if h.wrk:
        _wrk(h, port, per_thread=250, label="warm")
        h.db.settle()


def _bare(h: Harness, rep: int) -> None:
    """The same sequential client against bench/bare_app.py (M1's stack floor)."""
    port = free_port()
    bare = h.start_python(
        f"bare-{rep}",
        *("-m", "uvicorn", "bench.bare_app:app", "--loop", "uvloop"),
        *("--http", "httptools", "--no-access-log", "--log-level", "warning"),
        *("--host", "127.0.0.1", "--port", str(port)),
    )
    try:
        wait_tcp(port, bare)
        host = f"127.0.0.1:{port}"
        with RawClient("127.0.0.1", port) as client:
            for i in range(200):
                status, _ = client.request(
                    build_post(SEND, host, h.token, payload_bytes(f"warm-{i:06d}"))
                )
                if status != 202:
                    raise RuntimeError(f"bare app: warm-up POST answered {status}")
        _fresh(h)
        _single(h, bare, port, "m1_bare")
    finally:
        bare.stop()


def _single(h: Harness, serve: Proc, port: int, name: str) -> None:
    n = h.cfg.m1_n
    host = f"127.0.0.1:{port}"
    requests = [build_post(SEND, host, h.token, payload_bytes(f"c-{i:010d}")) for i in range(n)]
    bad: dict[int, int] = {}
    with RawClient("127.0.0.1", port) as client:  # connection set-up not timed
        meter = CpuMeter({"serve": [serve.pid]}, self_cpu=True)
        t0 = time.perf_counter()
        for data in requests:
            status, _ = client.request(data)
            if status != 202:
                bad[status] = bad.get(status, 0) + 1
        elapsed = time.perf_counter() - t0
        cpu = meter.stop()
    rows = h.db.count_messages()
    if bad or rows != n:
        raise RuntimeError(f"M1 single: non-202 answers {bad}, {rows} rows for {n} POSTs")
    cpu["loadgen"] = cpu.pop("bench")
    h.record(name, "req/s", n / elapsed, seconds=elapsed, rows=rows, cpu=cpu)


def _wrk(h: Harness, port: int, per_thread: int, label: str) -> tuple[dict[str, Any], float, float]:
    if not h.wrk:
        raise Skipped("wrk not installed (as root: apt-get install -y wrk)")
    result, cpu_seconds, wall = run_wrk(
        h.wrk,
        f"http://127.0.0.1:{port}{SEND}",
        h.token,
        per_thread=per_thread,
        threads=2,
        connections=h.cfg.m1_clients,
        out_path=h.outdir / f"wrk-{label}.txt",
        max_seconds=int(h.cfg.run_timeout),
    )
    errors = {k: v for k, v in result["errors"].items() if v}
    if errors or result["non_202"]:
        raise RuntimeError(f"wrk: {result['non_202']} non-202 answers, errors {errors}")
    return result, cpu_seconds, wall


def _concurrent(h: Harness, serve: Proc, port: int, rep: int) -> None:
    meter = CpuMeter({"serve": [serve.pid]})
    result, gen_cpu, wall = _wrk(h, port, per_thread=h.cfg.m1_n // 2, label=f"m1-{rep}")
    cpu = meter.stop()
    seconds = result["duration_us"] / 1e6
    cpu["loadgen"] = round(100 * gen_cpu / wall, 1)
    rows = h.db.count_messages()
    h.record(
        "m1_16",
        "req/s",
        result["answered"] / seconds,
        seconds=seconds,
        answered=result["answered"],
        rows=rows,  # a few more than answered: requests in flight when a thread stopped
        latency_us=result["latency_us"],
        cpu=cpu,
    )


def _batch(h: Harness, serve: Proc, port: int) -> None:
    n, size = h.cfg.m1_n, h.cfg.m1_batch
    host = f"127.0.0.1:{port}"
    requests = []
    for start in range(0, n, size):
        items = [payload(f"c-{i:010d}") for i in range(start, min(n, start + size))]
        body = json.dumps({"messages": items}, separators=(",", ":")).encode()
        requests.append(build_post(SEND_BATCH, host, h.token, body))
    with RawClient("127.0.0.1", port) as client:
        meter = CpuMeter({"serve": [serve.pid]}, self_cpu=True)
        t0 = time.perf_counter()
        answers = [client.request(data) for data in requests]
        elapsed = time.perf_counter() - t0
        cpu = meter.stop()
    bad = [status for status, _ in answers if status != 202]
    rows = h.db.count_messages()
    if bad or rows != n:
        raise RuntimeError(f"M1 batch: non-202 answers {bad}, {rows} rows for {n} messages")
    cpu["loadgen"] = cpu.pop("bench")
    h.record("m1_batch", "msg/s", n / elapsed, seconds=elapsed, requests=len(requests), cpu=cpu)
