"""`make bench`: issue 5's workloads against the real `outbox serve` / `outbox dispatch`.

A fresh database on the local PostgreSQL per run (or OUTBOX_BENCH_DATABASE_URL), logs and
the raw data under bench/results/<timestamp>/, the table on stdout and in
bench/results/<timestamp>.json. Knobs (environment): BENCH_QUICK=1 (small N, 1 repetition),
BENCH_REPS, BENCH_M1_N, BENCH_M2_N, BENCH_M3_N, BENCH_M4_SECONDS, BENCH_GROWTH_SENT,
BENCH_GROWTH_ERROR, BENCH_FLOOR_SECONDS, BENCH_BUDGET_S (default 840), BENCH_KEEP_DB=1,
BENCH_ONLY=floor,m1,m2_1p,m2_2p,m3,m4,m4_floor,growth,ws (a subset of the steps; m1 includes
M1's stack floor, bench/bare_app.py), BENCH_WS_CLIENTS (the `ws` step's idle feeds).
OUTBOX_* variables that the bench does not set itself (e.g. OUTBOX_DB_POOL_SIZE,
OUTBOX_DISPATCH_CONCURRENCY outside M3) are passed to the processes and recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from bench import m4_floor, sql, ws_idle, ws_latency
from bench.common import (
    BENCH_DIR,
    ROOT,
    TEXT,
    TO,
    CpuMeter,
    Proc,
    free_port,
    log_events,
    outbox_command,
    payload,
    payload_bytes,
    pct,
    stop_all,
    summary,
    tool_version,
    vm_rss_mb,
    wait_http_ok,
    wait_ready,
    with_other,
)
from bench.httpclient import RawClient, build_post
from bench.report import Row, render
from bench.wrk import run_wrk

T = TypeVar("T")

SEND = "/api/v1/whatsapp/send/"
SEND_BATCH = "/api/v1/whatsapp/send/batch"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"

# Settings the bench owns; any other OUTBOX_* of the caller is passed through.
MANAGED = re.compile(
    r"^OUTBOX_(DATABASE_URL|LISTEN_DATABASE_URL|JWT_.*|PROVIDER.*|FAKE_.*|LOG_.*|HOST|PORT|"
    r"BENCH_.*|DISPATCHER_ID|DEV_DATA_DIR)$"
)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@dataclass
class Config:
    quick: bool
    reps: int
    m1_n: int
    m1_batch: int
    m1_clients: int
    m2_n: int
    m2_concurrency: int
    m3_n: int
    m3_latency_ms: float
    m3_concurrency: int
    m4_rate: float
    m4_seconds: float
    growth_sent: int
    growth_error: int
    floor_seconds: int
    ws_clients: int
    run_timeout: float
    budget_s: float
    keep_db: bool
    only: tuple[str, ...]  # steps to run (BENCH_ONLY=m1,m3); empty: all

    @classmethod
    def from_env(cls) -> Config:
        quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
        return cls(
            quick=quick,
            reps=_env_int("BENCH_REPS", 1 if quick else 3),
            m1_n=_env_int("BENCH_M1_N", 2_000 if quick else 10_000),
            m1_batch=1_000,
            m1_clients=16,
            m2_n=_env_int("BENCH_M2_N", 5_000 if quick else 20_000),
            # PROTOCOL.md runs each system's drain "at its best concurrency setting".
            m2_concurrency=_env_int("BENCH_M2_CONCURRENCY", 256),
            m3_n=_env_int("BENCH_M3_N", 1_000 if quick else 5_000),
            m3_latency_ms=20.0,
            m3_concurrency=50,
            m4_rate=100.0,
            m4_seconds=_env_float("BENCH_M4_SECONDS", 5 if quick else 20),
            growth_sent=_env_int("BENCH_GROWTH_SENT", 100_000 if quick else 1_000_000),
            growth_error=_env_int("BENCH_GROWTH_ERROR", 10_000 if quick else 100_000),
            floor_seconds=_env_int("BENCH_FLOOR_SECONDS", 3 if quick else 15),
            ws_clients=_env_int("BENCH_WS_CLIENTS", 2_000 if quick else 10_000),
            run_timeout=_env_float("BENCH_RUN_TIMEOUT", 180),
            budget_s=_env_float("BENCH_BUDGET_S", 840),
            keep_db=os.environ.get("BENCH_KEEP_DB", "") not in ("", "0"),
            only=tuple(s.strip() for s in os.environ.get("BENCH_ONLY", "").split(",") if s.strip()),
        )


class Skipped(Exception):
    """A figure that cannot be measured here (a missing tool); not an error of the bench."""


class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC)
        self.stamp = self.started_at.strftime("%Y%m%d-%H%M%S")
        self.outdir = BENCH_DIR / "results" / self.stamp
        self.outdir.mkdir(parents=True, exist_ok=True)
        # Every process runs this copy of outbox/ and sql/, taken now: edits made to the
        # checkout while the bench runs (new migrations, half-saved files) cannot mix versions.
        self.src = self.outdir / "src"
        for part in ("outbox", "sql"):
            shutil.copytree(
                ROOT / part, self.src / part, ignore=shutil.ignore_patterns("__pycache__")
            )
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "outbox", "sql"], cwd=ROOT, capture_output=True
        )
        (self.outdir / "src.diff").write_bytes(diff.stdout)  # uncommitted changes measured
        self.figures: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, str]] = []
        self.rss: dict[str, list[dict[str, Any]]] = {"serve": [], "dispatch": []}
        self.secret = os.urandom(24).hex()
        self.passthrough = {
            k: v for k, v in os.environ.items() if k.startswith("OUTBOX_") and not MANAGED.match(k)
        }
        self.created_db: str | None = None
        self.admin_url = ""
        self.db_url = ""
        self.conn: psycopg.Connection[Any] | None = None
        self.token = ""
        self.wrk = shutil.which("wrk")
        self.pgbench = shutil.which("pgbench") or next(
            (
                str(p)
                for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)
            ),
            None,
        )

    # Set-up ---------------------------------------------------------------------------

    def log(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[bench {elapsed:6.1f}s] {text}", flush=True)

    def setup_database(self) -> None:
        given = os.environ.get("OUTBOX_BENCH_DATABASE_URL", "")
        if given:
            self.db_url = given
            self.log("OUTBOX_BENCH_DATABASE_URL given: its outbox tables are emptied (TRUNCATE)")
        else:
            name = f"outbox_bench_{self.stamp.replace('-', '_')}"
            self.admin_url = DEFAULT_SERVER
            with psycopg.connect(self.admin_url, autocommit=True) as admin:
                admin.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
            self.created_db = name
            self.db_url = DEFAULT_SERVER.rsplit("/", 1)[0] + "/" + name
        self.log(f"database {self.db_url}")
        migrate = subprocess.run(
            [*outbox_command(), "migrate"],
            env=self.env(),
            cwd=self.src,
            capture_output=True,
            text=True,
            timeout=120,
        )
        (self.outdir / "migrate.log").write_text(migrate.stdout + migrate.stderr)
        if migrate.returncode != 0:
            raise RuntimeError(f"outbox migrate failed: {migrate.stderr.strip()[-500:]}")
        self.conn = psycopg.connect(self.db_url, autocommit=True)
        self.conn.execute(sql.HELPERS)
        token = subprocess.run(
            [*outbox_command(), "token", "--sub", "bench", "--ttl", "2h"],
            env=self.env(),
            cwd=self.src,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        self.token = token.stdout.strip()

    def teardown_database(self) -> None:
        if self.conn is not None:
            if not self.created_db:
                with contextlib.suppress(psycopg.Error):
                    self.conn.execute("DROP SCHEMA IF EXISTS bench CASCADE")
            self.conn.close()
            self.conn = None
        if self.created_db and not self.cfg.keep_db:
            with psycopg.connect(self.admin_url, autocommit=True) as admin:
                admin.execute(
                    pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        pgsql.Identifier(self.created_db)
                    )
                )
            self.log(f"dropped database {self.created_db}")

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        env.update(self.passthrough)
        env.update(
            PYTHONPATH=str(self.src),
            OUTBOX_DATABASE_URL=self.db_url,
            OUTBOX_JWT_SECRET=self.secret,
            OUTBOX_LOG_FORMAT="json",  # the level stays the default (info)
            OUTBOX_PROVIDER="fake",
            OUTBOX_FAKE_LATENCY_MS="0",
        )
        env.update(overrides)
        return env

    # Database helpers -----------------------------------------------------------------

    def q(self, query: Any, params: Any = None) -> Any:
        assert self.conn is not None
        return self.conn.execute(query, params)

    def scalar(self, query: Any, params: Any = None) -> Any:
        row = self.q(query, params).fetchone()
        return row[0] if row else None

    def reset(self) -> None:
        self.q(sql.TRUNCATE)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until no row arrives for 0.3 s: requests that wrk left in flight when it
        stopped still commit, and must not land after the next TRUNCATE."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            count = self.scalar("SELECT count(*) FROM outbox.messages")
            if count == last:
                return
            last = count
            time.sleep(0.3)

    def vacuum(self) -> None:
        for statement in sql.VACUUM:
            self.q(statement)

    def checkpoint(self) -> None:
        self.q("CHECKPOINT")

    # Processes ------------------------------------------------------------------------

    def start_serve(self, tag: str) -> tuple[Proc, int]:
        port = free_port()
        proc = Proc(
            f"serve-{tag}",
            [*outbox_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            self.env(),
            self.outdir / f"serve-{tag}.log",
            cwd=self.src,
        )
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc)
        return proc, port

    def start_dispatchers(self, tag: str, n: int, **overrides: str) -> list[Proc]:
        return [
            Proc(
                f"dispatch-{tag}-{k}",
                [*outbox_command(), "dispatch"],
                self.env(**overrides),
                self.outdir / f"dispatch-{tag}-{k}.log",
                cwd=self.src,
            )
            for k in range(n)
        ]

    def stop(self, proc: Proc, role: str) -> None:
        status = proc.stop()
        if role in self.rss:
            self.rss[role].append(
                {"process": proc.name, "peak_rss_mb": proc.peak_rss_mb, "exit": status}
            )
        if status not in (0, None, -signal.SIGTERM):
            self.log(f"warning: {proc.name} exited with status {status}, see {proc.log_path}")

    # Recording ------------------------------------------------------------------------

    def record(self, name: str, unit: str, value: float | None, **detail: Any) -> None:
        if isinstance(detail.get("cpu"), dict):
            with_other(detail["cpu"])
        fig = self.figures.setdefault(name, {"unit": unit, "values": [], "runs": []})
        if value is not None:
            fig["values"].append(value)
        fig["runs"].append({"value": value, **detail})
        shown = "n/a" if value is None else f"{value:,.1f}"
        self.log(f"{name}: {shown} {unit}")

    def values(self, name: str) -> list[float]:
        return list(self.figures.get(name, {}).get("values", []))

    def median(self, name: str) -> float | None:
        s = summary(self.values(name))
        return s["median"] if s else None

    def remaining(self) -> float:
        return self.cfg.budget_s - (time.monotonic() - self.started)

    def over_budget(self, need: float = 0.0) -> bool:
        return self.remaining() < need

    def step(self, name: str, fn: Callable[[int], None], reps: int, need: float = 0.0) -> None:
        """`need`: seconds a repetition needs at least; skipped when the budget has less."""
        for rep in range(1, reps + 1):
            if self.over_budget(need):
                self.errors.append({"step": name, "rep": str(rep), "error": "time budget spent"})
                self.log(f"{name} rep {rep}: skipped, time budget ({self.cfg.budget_s:.0f} s)")
                return
            self.log(f"{name} rep {rep}/{reps}")
            try:
                fn(rep)
            except Skipped as exc:
                self.errors.append({"step": name, "rep": str(rep), "error": f"skipped: {exc}"})
                self.log(f"{name}: skipped: {exc}")
                return
            except Exception as exc:
                self.errors.append(
                    {"step": name, "rep": str(rep), "error": f"{type(exc).__name__}: {exc}"}
                )
                self.log(f"{name} rep {rep} FAILED: {type(exc).__name__}: {exc}")
                (self.outdir / f"error-{name}-{rep}.txt").write_text(traceback.format_exc())
            finally:
                stop_all()  # anything a failed step left running

    # Floor ----------------------------------------------------------------------------

    def floor(self, rep: int) -> None:
        if not self.pgbench:
            raise Skipped("pgbench not found (PATH, /usr/lib/postgresql/*/bin)")
        script = self.outdir / "floor_insert.sql"
        script.write_text(sql.FLOOR_SCRIPT)
        info = conninfo_to_dict(self.db_url)
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
        for clients in (1, 16):
            self.q(sql.FLOOR_TABLE)
            self.checkpoint()
            args = [
                self.pgbench,
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
                str(self.cfg.floor_seconds),
            ]
            out_path = self.outdir / f"floor-c{clients}-{rep}.txt"
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
            rows = self.scalar("SELECT count(*) FROM bench.floor_messages")
            gen = 100 * (usage.ru_utime + usage.ru_stime) / self.cfg.floor_seconds
            self.record(
                f"floor_c{clients}",
                "tx/s",
                float(tps.group(1)),
                clients=clients,
                failed=int(failed.group(1)) if failed else None,
                rows=rows,
                cpu={"pgbench": round(gen, 1), **cpu},
            )
        self.q("DROP TABLE IF EXISTS bench.floor_messages")

    # M1 -------------------------------------------------------------------------------

    def m1(self, rep: int) -> None:
        self.reset()
        serve, port = self.start_serve(f"m1-{rep}")
        try:
            self._m1_warm_up(port)
            self.reset()
            self.checkpoint()
            self._m1_single(serve, port, "m1_single")
            self.reset()
            self.checkpoint()
            self._m1_bare(rep)
            self.reset()
            self.checkpoint()
            try:
                self._m1_concurrent(serve, port, rep)
            except Skipped as exc:
                self.errors.append({"step": "m1_16", "rep": str(rep), "error": f"skipped: {exc}"})
                self.log(f"m1_16: skipped: {exc}")
            self.settle()
            self.reset()
            self.checkpoint()
            self._m1_batch(serve, port, rep)
        finally:
            self.stop(serve, "serve")

    def _m1_warm_up(self, port: int) -> None:
        """Pool connections, imports and caches warm, outside every timed region."""
        host = f"127.0.0.1:{port}"
        with RawClient("127.0.0.1", port) as client:
            for i in range(200):
                body = payload_bytes(f"warm-{i:06d}")
                status, _ = client.request(build_post(SEND, host, self.token, body))
                if status != 202:
                    raise RuntimeError(f"warm-up POST answered {status}")
            batch = json.dumps({"messages": [payload(f"warmb-{i:06d}") for i in range(1000)]})
            status, _ = client.request(build_post(SEND_BATCH, host, self.token, batch.encode()))
            if status != 202:
                raise RuntimeError(f"warm-up batch answered {status}")
        if self.wrk:
            self._wrk(port, per_thread=250, label="warm")
            self.settle()

    def _m1_bare(self, rep: int) -> None:
        """The same sequential client against bench/bare_app.py (M1's stack floor)."""
        port = free_port()
        bare = Proc(
            f"bare-{rep}",
            [
                *(sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--loop", "uvloop"),
                *("--http", "httptools", "--no-access-log", "--log-level", "warning"),
                *("--host", "127.0.0.1", "--port", str(port)),
            ],
            self.env(),
            self.outdir / f"bare-{rep}.log",
        )
        try:
            _wait_tcp(port, bare)
            host = f"127.0.0.1:{port}"
            with RawClient("127.0.0.1", port) as client:
                for i in range(200):
                    status, _ = client.request(
                        build_post(SEND, host, self.token, payload_bytes(f"warm-{i:06d}"))
                    )
                    if status != 202:
                        raise RuntimeError(f"bare app: warm-up POST answered {status}")
            self.reset()
            self.checkpoint()
            self._m1_single(bare, port, "m1_bare")
        finally:
            bare.stop()

    def _m1_single(self, serve: Proc, port: int, name: str) -> None:
        n = self.cfg.m1_n
        host = f"127.0.0.1:{port}"
        requests = [
            build_post(SEND, host, self.token, payload_bytes(f"c-{i:010d}")) for i in range(n)
        ]
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
        rows = self.scalar("SELECT count(*) FROM outbox.messages")
        if bad or rows != n:
            raise RuntimeError(f"M1 single: non-202 answers {bad}, {rows} rows for {n} POSTs")
        cpu["loadgen"] = cpu.pop("bench")
        self.record(name, "req/s", n / elapsed, seconds=elapsed, rows=rows, cpu=cpu)

    def _wrk(self, port: int, per_thread: int, label: str) -> tuple[dict[str, Any], float, float]:
        if not self.wrk:
            raise Skipped("wrk not installed (as root: apt-get install -y wrk)")
        result, cpu_seconds, wall = run_wrk(
            self.wrk,
            f"http://127.0.0.1:{port}{SEND}",
            self.token,
            per_thread=per_thread,
            threads=2,
            connections=self.cfg.m1_clients,
            out_path=self.outdir / f"wrk-{label}.txt",
            max_seconds=int(self.cfg.run_timeout),
        )
        errors = {k: v for k, v in result["errors"].items() if v}
        if errors or result["non_202"]:
            raise RuntimeError(f"wrk: {result['non_202']} non-202 answers, errors {errors}")
        return result, cpu_seconds, wall

    def _m1_concurrent(self, serve: Proc, port: int, rep: int) -> None:
        n = self.cfg.m1_n
        meter = CpuMeter({"serve": [serve.pid]})
        result, gen_cpu, wall = self._wrk(port, per_thread=n // 2, label=f"m1-{rep}")
        cpu = meter.stop()
        seconds = result["duration_us"] / 1e6
        cpu["loadgen"] = round(100 * gen_cpu / wall, 1)
        rows = self.scalar("SELECT count(*) FROM outbox.messages")
        self.record(
            "m1_16",
            "req/s",
            result["answered"] / seconds,
            seconds=seconds,
            answered=result["answered"],
            rows=rows,  # a few more than answered: requests in flight when a thread stopped
            latency_us=result["latency_us"],
            cpu=cpu,
        )

    def _m1_batch(self, serve: Proc, port: int, rep: int) -> None:
        n, size = self.cfg.m1_n, self.cfg.m1_batch
        host = f"127.0.0.1:{port}"
        requests = []
        for start in range(0, n, size):
            items = [payload(f"c-{i:010d}") for i in range(start, min(n, start + size))]
            body = json.dumps({"messages": items}, separators=(",", ":")).encode()
            requests.append(build_post(SEND_BATCH, host, self.token, body))
        with RawClient("127.0.0.1", port) as client:
            meter = CpuMeter({"serve": [serve.pid]}, self_cpu=True)
            t0 = time.perf_counter()
            answers = [client.request(data) for data in requests]
            elapsed = time.perf_counter() - t0
            cpu = meter.stop()
        bad = [status for status, _ in answers if status != 202]
        rows = self.scalar("SELECT count(*) FROM outbox.messages")
        if bad or rows != n:
            raise RuntimeError(f"M1 batch: non-202 answers {bad}, {rows} rows for {n} messages")
        cpu["loadgen"] = cpu.pop("bench")
        self.record(
            "m1_batch", "msg/s", n / elapsed, seconds=elapsed, requests=len(requests), cpu=cpu
        )

    # M2, M3, cost growth: drains --------------------------------------------------------

    def prefill_pending(self, n: int) -> None:
        self.q(sql.PREFILL_PENDING, {"n": n})

    def prefill_old(self) -> dict[str, float]:
        took = {}
        for label, query, n in (
            ("sent", sql.PREFILL_OLD_SENT, self.cfg.growth_sent),
            ("error", sql.PREFILL_OLD_ERROR, self.cfg.growth_error),
            ("attempts", sql.PREFILL_OLD_ATTEMPTS, None),
            ("events", sql.PREFILL_OLD_EVENTS, None),
        ):
            t0 = time.monotonic()
            self.q(query, {"n": n} if n is not None else None)
            took[label] = round(time.monotonic() - t0, 1)
            self.log(f"cost growth pre-fill: {label} in {took[label]} s")
        return took

    def drain(
        self, name: str, rep: int, n: int, nproc: int, old_rows: bool = False, **env: str
    ) -> None:
        self.reset()
        extra: dict[str, Any] = {}
        if old_rows:
            extra["prefill_seconds"] = self.prefill_old()
            self.vacuum()
        self.prefill_pending(n)
        self.vacuum()  # autovacuum is off here: visibility map and statistics by hand
        self.checkpoint()
        if old_rows:
            extra["table_rows"] = self.scalar("SELECT count(*) FROM outbox.messages")
            extra["database_mb"] = round(
                self.scalar("SELECT pg_database_size(current_database())") / 2**20
            )
        procs = self.start_dispatchers(f"{name}-{rep}", nproc, **env)
        try:
            ready = wait_ready(procs)
            meter = CpuMeter({"dispatch": [p.pid for p in procs]})
            t0 = min(ready)
            limit = min(self.cfg.run_timeout, max(30.0, self.remaining()))
            deadline = time.time() + limit
            polls = 0
            while True:
                polls += 1
                if not self.scalar(sql.UNFINISHED):
                    t1 = time.time()
                    break
                if time.time() > deadline:
                    left = self.scalar(
                        "SELECT count(*) FROM outbox.messages WHERE status IN "
                        "('pending', 'in_flight')"
                    )
                    raise TimeoutError(f"drain not finished after {limit:.0f} s: {left} left")
                for proc in procs:
                    if not proc.alive():
                        raise RuntimeError(f"{proc.name} exited, see {proc.log_path}")
                time.sleep(0.1)
            cpu = meter.stop()
        finally:
            for proc in procs:
                self.stop(proc, "dispatch")
        counts = dict(
            self.q(
                "SELECT status, count(*) FROM outbox.messages WHERE user_id = 'bench' "
                "GROUP BY status"
            ).fetchall()
        )
        attempts = self.scalar(
            "SELECT count(*) FROM outbox.attempts WHERE dispatcher <> 'old-dispatcher'"
        )
        if counts.get("sent") != n:
            raise RuntimeError(f"{name}: statuses after the drain {counts}, expected {n} sent")
        self.record(
            name,
            "msg/s",
            n / (t1 - t0),
            seconds=t1 - t0,
            ready_spread=max(ready) - min(ready),
            polls=polls,
            attempts_rows=attempts,
            cpu=cpu,
            **extra,
        )

    def m2_env(self) -> dict[str, str]:
        return {"OUTBOX_DISPATCH_CONCURRENCY": str(self.cfg.m2_concurrency)}

    def m2_1p(self, rep: int) -> None:
        self.drain("m2_1p", rep, self.cfg.m2_n, 1, **self.m2_env())

    def m2_2p(self, rep: int) -> None:
        self.drain("m2_2p", rep, self.cfg.m2_n, 2, **self.m2_env())

    def m3(self, rep: int) -> None:
        self.drain(
            "m3",
            rep,
            self.cfg.m3_n,
            1,
            OUTBOX_FAKE_LATENCY_MS=str(self.cfg.m3_latency_ms),
            OUTBOX_DISPATCH_CONCURRENCY=str(self.cfg.m3_concurrency),
        )

    def growth(self, rep: int) -> None:
        self.drain("growth", rep, self.cfg.m2_n, 1, old_rows=True, **self.m2_env())

    # M4 -------------------------------------------------------------------------------

    def start_provider(self, tag: str) -> tuple[Proc, int, Path]:
        """The bench's provider server, which stamps each call's arrival in a file."""
        arrivals = self.outdir / f"{tag}-arrivals.txt"
        arrivals.unlink(missing_ok=True)
        port = free_port()
        provider = Proc(
            f"provider-{tag}",
            [
                *(sys.executable, "-m", "bench.provider_server"),
                *("--port", str(port), "--out", str(arrivals)),
            ],
            self.env(),
            self.outdir / f"provider-{tag}.log",
        )
        _wait_tcp(port, provider)
        return provider, port, arrivals

    def paced(
        self, enqueue: Callable[[int], T], key_of: Callable[[T], str]
    ) -> tuple[list[tuple[str, float, float]], int]:
        """M4's producer: `enqueue(i)` at a steady rate (scheduled at t0 + i/rate, no
        catch-up bursts), each awaited; (key, call, return) epochs, the return stamped
        before `key_of` reads the answer, and how many calls were late."""
        sent: list[tuple[str, float, float]] = []
        late = 0
        t0 = time.time() + 0.2
        for i in range(int(self.cfg.m4_rate * self.cfg.m4_seconds)):
            delay = t0 + i / self.cfg.m4_rate - time.time()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.005:
                late += 1
            t_call = time.time()
            answer = enqueue(i)
            t_ret = time.time()
            sent.append((key_of(answer), t_call, t_ret))
        return sent, late

    def m4(self, rep: int) -> None:
        self.reset()
        self.checkpoint()
        provider, provider_port, arrivals = self.start_provider(f"m4-{rep}")
        serve: Proc | None = None
        dispatcher: Proc | None = None
        try:
            serve, port = self.start_serve(f"m4-{rep}")
            (dispatcher,) = self.start_dispatchers(
                f"m4-{rep}",
                1,
                OUTBOX_PROVIDER="http",
                OUTBOX_PROVIDER_URL=f"http://127.0.0.1:{provider_port}/send",
                OUTBOX_PROVIDER_SECRET=self.secret,  # signed, as a deployment's calls are
            )
            wait_ready([dispatcher])
            host = f"127.0.0.1:{port}"
            requests = [
                build_post(SEND, host, self.token, payload_bytes(f"c-{i:010d}"))
                for i in range(int(self.cfg.m4_rate * self.cfg.m4_seconds))
            ]
            with RawClient("127.0.0.1", port) as client:
                warm = 10
                for i in range(warm):  # pool, provider connection: set up before timing
                    client.request(build_post(SEND, host, self.token, payload_bytes(f"w-{i}")))
                _wait_lines(arrivals, warm, 15)
                time.sleep(1.0)  # the dispatcher idles for 1 s, as in PROTOCOL.md
                meter = CpuMeter(
                    {
                        "serve": [serve.pid],
                        "dispatch": [dispatcher.pid],
                        "provider": [provider.pid],
                    },
                    self_cpu=True,
                )

                def task_id(answer: tuple[int, bytes]) -> str:
                    status, body = answer
                    if status != 202:
                        raise RuntimeError(f"M4 POST answered {status}: {body[:200]!r}")
                    return str(json.loads(body)["task_id"])

                sent, late = self.paced(lambda i: client.request(requests[i]), task_id)
            _wait_lines(arrivals, warm + len(sent), 15)
            cpu = meter.stop()
            cpu["loadgen"] = cpu.pop("bench")
        finally:
            if dispatcher is not None:
                self.stop(dispatcher, "dispatch")
            if serve is not None:
                self.stop(serve, "serve")
            provider.stop()
        # PROTOCOL.md times the peers to their handler's first statement; the same
        # moment here is the attempt's start as the dispatcher records it (its clock,
        # just before the call; the `attempt started` line is written a moment later).
        started = {
            message_id: float(epoch)
            for message_id, epoch in self.q(
                "SELECT message_id::text, extract(epoch FROM started_at) "
                "FROM outbox.attempts WHERE attempt = 1"
            ).fetchall()
        }
        post_ms = [1000 * (t_ret - t_call) for _, t_call, t_ret in sent]
        self.record_latency(
            "m4",
            sent,
            arrivals,
            started,
            late_posts=late,
            post_p50_ms=round(pct(post_ms, 50), 3),
            post_p99_ms=round(pct(post_ms, 99), 3),
            cpu=cpu,
        )

    def m4_floor(self, rep: int) -> None:
        """M4's path with the thinnest client (bench/m4_floor.py), in the same run."""
        self.q(m4_floor.TABLE)
        self.checkpoint()
        provider, provider_port, arrivals = self.start_provider(f"m4floor-{rep}")
        starts = self.outdir / f"m4floor-{rep}-starts.txt"
        worker = Proc(
            f"m4floor-{rep}",
            [
                *(sys.executable, "-m", "bench.m4_floor", "--db", self.db_url),
                *("--port", str(provider_port), "--out", str(starts)),
            ],
            self.env(),
            self.outdir / f"m4floor-{rep}.log",
        )
        try:
            _wait_lines(worker.log_path, 1, 15)
            if worker.log_path.read_text().strip() != "ready":
                raise RuntimeError(f"{worker.name} did not start, see {worker.log_path}")
            with psycopg.connect(self.db_url, autocommit=True) as producer:
                args = {"to": TO, "payload": Jsonb({"body": TEXT, "preview_url": False})}

                def enqueue(_i: int) -> tuple[Any, ...] | None:
                    return producer.execute(m4_floor.ENQUEUE, args).fetchone()

                def row_id(row: tuple[Any, ...] | None) -> str:
                    assert row is not None
                    return str(row[0])

                warm = 10
                for i in range(warm):
                    enqueue(i)
                _wait_lines(arrivals, warm, 15)
                time.sleep(1.0)
                meter = CpuMeter(
                    {"worker": [worker.pid], "provider": [provider.pid]}, self_cpu=True
                )
                sent, late = self.paced(enqueue, row_id)
                _wait_lines(arrivals, warm + len(sent), 15)
                cpu = meter.stop()
                cpu["loadgen"] = cpu.pop("bench")
        finally:
            worker.stop()
            provider.stop()
        started = {}
        for line in starts.read_text().splitlines():
            key, _, stamp = line.partition(" ")
            started[key] = float(stamp)
        self.record_latency("m4floor", sent, arrivals, started, late_posts=late, cpu=cpu)

    def record_latency(
        self,
        name: str,
        sent: list[tuple[str, float, float]],
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
            self.record(f"{name}_{label}", "ms", value, **detail)
        if missing:
            self.log(f"warning: {name}: {missing} of {len(sent)} calls never arrived")

    # ws: idle status feeds ------------------------------------------------------------

    def ws(self, rep: int) -> None:
        """BENCH_WS_CLIENTS idle feeds on one `serve` (bench/ws_idle.py, a process of its
        own): serve's RSS with them, the POST→event latency at M4's rate meanwhile, and
        serve's RSS once they have left. Its serve stays out of the `peak RSS, serve` row."""
        n = self.cfg.ws_clients
        ws_idle.raise_fd_limit(n + 2000)  # serve inherits it: one descriptor per feed
        self.reset()
        self.checkpoint()
        serve, port = self.start_serve(f"ws-{rep}")
        (dispatcher,) = self.start_dispatchers(f"ws-{rep}", 1)
        idle: Proc | None = None
        try:
            wait_ready([dispatcher])
            # Pool, imports and the feed's path warm, outside the measurements.
            asyncio.run(ws_latency.measure(port, self.token, 20, self.cfg.m4_rate))
            before = vm_rss_mb(serve.pid)
            idle = Proc(
                f"ws-idle-{rep}",
                [sys.executable, "-m", "bench.ws_idle", "--port", str(port), "--count", str(n)],
                self.env(),
                self.outdir / f"ws-idle-{rep}.log",
            )
            _wait_lines(idle.log_path, 1, 300)
            opened = idle.log_path.read_text().strip()
            if not opened.startswith(f"open {n} "):
                raise RuntimeError(f"{idle.name}: {opened[-300:]!r}, see {idle.log_path}")
            _wait_feeds(port, n, serve)
            held = vm_rss_mb(serve.pid)
            meter = CpuMeter({"serve": [serve.pid], "dispatch": [dispatcher.pid]}, self_cpu=True)
            count = int(self.cfg.m4_rate * self.cfg.m4_seconds)
            latencies = asyncio.run(ws_latency.measure(port, self.token, count, self.cfg.m4_rate))
            cpu = meter.stop()
            cpu["loadgen"] = cpu.pop("bench")
            idle.stop()
            _wait_feeds(port, 0, serve)
            trimmed = _wait_log(serve, "heap trimmed after websocket clients left", 15)
            after = vm_rss_mb(serve.pid)
        finally:
            if idle is not None:
                idle.stop()
            self.stop(dispatcher, "dispatch")
            peak = serve.read_peak_rss()
            serve.stop()
        if before is None or held is None or after is None:
            raise RuntimeError("serve's RSS could not be read (/proc)")
        detail = {"clients": n, "connect": opened.split()[-1], "peak_rss_mb": peak}
        self.record("ws_rss_before", "MB", before, **detail)
        per_feed = round(1024 * (held - before) / n, 1)  # KB
        self.record("ws_rss", "MB", held, kb_per_feed=per_feed, **detail)
        self.record("ws_rss_after", "MB", after, heap_trimmed=trimmed, **detail)
        for label, p in (("p50", 50), ("p99", 99)):
            self.record(f"ws_{label}", "ms", pct(latencies, p), n=len(latencies), cpu=cpu)

    # Report ---------------------------------------------------------------------------

    def rows(self) -> list[Row]:
        floor1 = self.median("floor_c1")
        floor16 = self.median("floor_c16")
        m2_1 = self.median("m2_1p")

        def cpu(name: str, keys: list[tuple[str, str]]) -> str:
            runs = self.figures.get(name, {}).get("runs", [])
            parts = []
            for key, label in [*keys, ("other", "other")]:
                vals = [r["cpu"][key] for r in runs if r.get("cpu") and key in r["cpu"]]
                if vals and (key != "other" or statistics.median(vals) >= 10):
                    parts.append(f"{label} {statistics.median(vals):.0f}")
            return " / ".join(parts)

        def of(value: float | None, base: float | None, what: str, percent: bool = False) -> str:
            if value is None or not base:
                return ""
            if percent:
                return f"{100 * value / base:.0f}% of {what}"
            return f"{value / base:.2f}× {what}"

        gen = [("loadgen", "gen"), ("serve", "serve"), ("postgres", "pg")]
        drain = [("dispatch", "disp"), ("postgres", "pg")]
        m3_ceiling = 1000 / self.cfg.m3_latency_ms * self.cfg.m3_concurrency
        growth = self.median("growth")
        old = self.cfg.growth_sent + self.cfg.growth_error
        old_rows = f"{old / 1e6:.1f} M" if old >= 1e6 else f"{old / 1e3:.0f} k"
        rss_serve = [r["peak_rss_mb"] for r in self.rss["serve"] if r["peak_rss_mb"]]
        rss_disp = [r["peak_rss_mb"] for r in self.rss["dispatch"] if r["peak_rss_mb"]]
        m4 = [
            ("loadgen", "gen"),
            ("serve", "serve"),
            ("dispatch", "disp"),
            ("provider", "prov"),
            ("postgres", "pg"),
        ]
        ws_n = f"{self.cfg.ws_clients:,}"
        return [
            Row(
                "floor: pgbench INSERT, 1 client",
                "tx/s",
                self.values("floor_c1"),
                cpu=cpu("floor_c1", [("pgbench", "pgbench"), ("postgres", "pg")]),
            ),
            Row(
                "floor: pgbench INSERT, 16 clients",
                "tx/s",
                self.values("floor_c16"),
                cpu=cpu("floor_c16", [("pgbench", "pgbench"), ("postgres", "pg")]),
            ),
            Row(
                "M1 ingest, 1 client sequential",
                "req/s",
                self.values("m1_single"),
                bar="≥ 0.4× floor@1",
                threshold=0.4 * floor1 if floor1 else None,
                note="; ".join(
                    part
                    for part in (
                        of(self.median("m1_single"), floor1, "floor@1"),
                        of(self.median("m1_single"), self.median("m1_bare"), "bare app"),
                    )
                    if part
                ),
                cpu=cpu("m1_single", gen),
            ),
            Row(
                "M1 floor: bare ASGI app, same INSERT, 1 client",
                "req/s",
                self.values("m1_bare"),
                note=of(self.median("m1_bare"), floor1, "floor@1"),
                cpu=cpu("m1_bare", gen),
            ),
            Row(
                f"M1 ingest, {self.cfg.m1_clients} clients (wrk), 1 serve",
                "req/s",
                self.values("m1_16"),
                bar="≥ 5,000",
                threshold=5000,
                note=of(self.median("m1_16"), floor16, "floor@16"),
                cpu=cpu("m1_16", gen),
            ),
            Row(
                f"M1 ingest, batch of {self.cfg.m1_batch:,}",
                "msg/s",
                self.values("m1_batch"),
                bar="≥ 40,000",
                threshold=40000,
                note=of(self.median("m1_batch"), floor1, "floor@1"),
                cpu=cpu("m1_batch", gen),
            ),
            Row(
                f"M2 drain, 1 dispatcher ({self.cfg.m2_concurrency} in flight)",
                "msg/s",
                self.values("m2_1p"),
                bar="≥ 12,000",
                threshold=12000,
                cpu=cpu("m2_1p", drain),
            ),
            Row(
                f"M2 drain, 2 dispatchers ({self.cfg.m2_concurrency} in flight each)",
                "msg/s",
                self.values("m2_2p"),
                bar="≥ 1× M2 1 disp.",
                threshold=m2_1,
                note=of(self.median("m2_2p"), m2_1, "M2 1 disp."),
                cpu=cpu("m2_2p", drain),
            ),
            Row(
                f"M3 provider {self.cfg.m3_latency_ms:.0f} ms, {self.cfg.m3_concurrency} in flight",
                "msg/s",
                self.values("m3"),
                bar=f"≥ 94% of {m3_ceiling:,.0f}",
                threshold=0.94 * m3_ceiling,
                note=of(self.median("m3"), m3_ceiling, "ceiling", percent=True),
                cpu=cpu("m3", drain),
            ),
            Row("M4 latency p50", "ms", self.values("m4_p50"), cpu=cpu("m4_p50", m4)),
            Row("M4 latency p95", "ms", self.values("m4_p95")),
            Row("M4 latency p99", "ms", self.values("m4_p99")),
            Row("M4 latency max", "ms", self.values("m4_max")),
            Row(
                "M4 to the call's start (PROTOCOL.md), p50",
                "ms",
                self.values("m4_start_p50"),
                note="peers: to the handler",
            ),
            Row("M4 to the call's start (PROTOCOL.md), p99", "ms", self.values("m4_start_p99")),
            Row(
                "M4 floor: thinnest client, p50",
                "ms",
                self.values("m4floor_p50"),
                note="sync psycopg + raw socket",
                cpu=cpu("m4floor_p50", [("loadgen", "gen"), ("worker", "worker"), *m4[-2:]]),
            ),
            Row("M4 floor: thinnest client, p99", "ms", self.values("m4floor_p99")),
            Row("M4 floor: to the claim's return, p50", "ms", self.values("m4floor_start_p50")),
            Row(
                f"cost growth: M2 1 disp. + {old_rows} old rows",
                "msg/s",
                self.values("growth"),
                bar="≥ 0.9× M2 1 disp.",
                threshold=0.9 * m2_1 if m2_1 else None,
                note=of(growth, m2_1, "M2 1 disp."),
                cpu=cpu("growth", drain),
            ),
            Row(
                f"ws: serve RSS, {ws_n} idle feeds",
                "MB",
                self.values("ws_rss"),
                bar="< 300",
                threshold=300,
                higher_is_better=False,
                note=f"{self.median('ws_rss_before') or 0:.0f} MB before they came",
            ),
            Row("ws: serve RSS once they left", "MB", self.values("ws_rss_after")),
            Row(
                f"ws: POST→event p50 at {self.cfg.m4_rate:.0f}/s, {ws_n} feeds open",
                "ms",
                self.values("ws_p50"),
                cpu=cpu("ws_p50", m4[:3]),
            ),
            Row(f"ws: POST→event p99, {ws_n} feeds open", "ms", self.values("ws_p99")),
            Row(
                "peak RSS, serve (each process)",
                "MB",
                rss_serve,
                bar="≤ 200",
                threshold=200,
                higher_is_better=False,
                judge_on="max",
                note=f"{len(rss_serve)} processes",
            ),
            Row(
                "peak RSS, dispatch (each process)",
                "MB",
                rss_disp,
                bar="≤ 150",
                threshold=150,
                higher_is_better=False,
                judge_on="max",
                note=f"{len(rss_disp)} processes",
            ),
        ]

    def environment(self) -> dict[str, Any]:
        cpu_model = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            (
                int(line.split()[1])
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")
            ),
            0,
        )

        def git(*args: str) -> str:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
            return out.stdout.strip()

        pg: dict[str, Any] = {}
        if self.conn is not None:
            pg["version"] = self.scalar("SELECT version()")
            for setting in (
                "server_version",
                "autovacuum",
                "synchronous_commit",
                "fsync",
                "shared_buffers",
                "max_connections",
                "max_wal_size",
                "checkpoint_timeout",
            ):
                pg[setting] = self.scalar(
                    "SELECT setting || coalesce(' ' || unit, '') FROM pg_settings WHERE name = %s",
                    (setting,),
                )
            pg["other_sessions_at_start"] = self.q(
                "SELECT datname, state, count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
                "AND datname IS DISTINCT FROM current_database() GROUP BY 1, 2"
            ).fetchall()
        packages = {}
        for package in ("uvicorn", "starlette", "psycopg", "uvloop", "httptools", "orjson"):
            try:
                packages[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                packages[package] = None
        dirty = git("status", "--porcelain", "--", "outbox", "sql", "pyproject.toml")
        return {
            "machine": {
                "cpu_model": cpu_model,
                "cores": os.cpu_count(),
                "memory_mb": mem_kb // 1024,
                "kernel": platform.release(),
                "hostname": socket.gethostname(),
                "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
            },
            "versions": {
                "python": platform.python_version(),
                "postgres": pg.get("server_version"),
                "outbox_git_sha": git("rev-parse", "HEAD"),
                "outbox_worktree_dirty": bool(dirty),
                "outbox_dirty_files": dirty.splitlines(),
                "code_snapshot": str(self.src.relative_to(ROOT)),
                "pgbench": tool_version([self.pgbench, "--version"]) if self.pgbench else None,
                "wrk": tool_version([self.wrk, "-v"]) if self.wrk else None,
                "packages": packages,
            },
            "postgres": pg,
        }


def _wait_tcp(port: int, proc: Proc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early, see {proc.log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{proc.name} is not listening on {port}")


def _wait_lines(path: Path, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        try:
            count = path.read_bytes().count(b"\n")
        except OSError:
            count = 0
        if count >= n:
            break
        time.sleep(0.05)
    return count


def _wait_feeds(port: int, n: int, serve: Proc, timeout: float = 120.0) -> None:
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


def _wait_log(proc: Proc, event: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_events(proc.log_path, event):
            return True
        time.sleep(0.1)
    return False


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    cfg = Config.from_env()
    bench = Bench(cfg)
    bench.log(
        f"results in {bench.outdir} ({'quick, ' if cfg.quick else ''}{cfg.reps} repetition(s))"
    )
    env_info: dict[str, Any] = {}
    try:
        bench.setup_database()
        env_info = bench.environment()
        load1 = float(env_info["machine"]["loadavg_at_start"][0])
        others = [r for r in env_info["postgres"]["other_sessions_at_start"] if r[1] == "active"]
        if load1 > 0.5 or others:
            bench.log(
                f"warning: the machine is not idle (load {load1:.2f}, active sessions on other "
                f"databases: {others or 'none'}); figures will be noisy"
            )
        steps: list[tuple[str, Callable[[int], None], int, float]] = [
            ("floor", bench.floor, cfg.reps, 0),
            ("m1", bench.m1, cfg.reps, 0),
            ("m2_1p", bench.m2_1p, cfg.reps, 0),
            ("m2_2p", bench.m2_2p, cfg.reps, 0),
            ("m3", bench.m3, cfg.reps, 0),
            ("m4", bench.m4, cfg.reps, 0),
            ("m4_floor", bench.m4_floor, cfg.reps, 0),
            ("growth", bench.growth, 1, 90 if cfg.growth_sent >= 500_000 else 0),
            ("ws", bench.ws, 1, 60),
        ]
        for name, fn, reps, need in steps:
            if not cfg.only or name in cfg.only:
                bench.step(name, fn, reps, need=need)
    except Exception as exc:
        bench.errors.append({"step": "setup", "rep": "-", "error": f"{type(exc).__name__}: {exc}"})
        bench.log(f"FAILED: {type(exc).__name__}: {exc}")
        (bench.outdir / "error-setup.txt").write_text(traceback.format_exc())
    finally:
        stop_all()
        try:
            bench.teardown_database()
        except Exception as exc:
            bench.log(f"warning: could not drop the bench database: {exc}")

    rows = bench.rows()
    duration = time.monotonic() - bench.started
    table = render(rows)
    result = {
        "started_at": bench.started_at.isoformat(),
        "duration_s": round(duration, 1),
        **env_info,
        "config": asdict(cfg),
        "passthrough_env": bench.passthrough,
        "payload_bytes": len(payload_bytes("c-0000000000")),
        "table": [row.as_dict() for row in rows],
        "figures": bench.figures,
        "rss": bench.rss,
        "errors": bench.errors,
        "logs": str(bench.outdir.relative_to(ROOT)),
    }
    json_path = BENCH_DIR / "results" / f"{bench.stamp}.json"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    (bench.outdir / "table.md").write_text(table + "\n")

    machine = env_info.get("machine", {})
    versions = env_info.get("versions", {})
    print()
    print(
        f"outbox bench {bench.started_at:%Y-%m-%d %H:%M} UTC, "
        f"{machine.get('cpu_model', '?')} × {machine.get('cores', '?')} cores, "
        f"PostgreSQL {versions.get('postgres', '?')}, Python {versions.get('python', '?')}, "
        f"outbox {str(versions.get('outbox_git_sha', '?'))[:10]}"
        f"{'+dirty' if versions.get('outbox_worktree_dirty') else ''}; "
        f"{cfg.reps} repetition(s){' (BENCH_QUICK)' if cfg.quick else ''}, "
        f"{duration / 60:.1f} min"
    )
    print("median (min–max); CPU % of one core (gen = load generator, pg = all postgres)")
    print(table)
    busy = []
    for name, fig in bench.figures.items():
        others = [r["cpu"]["other"] for r in fig["runs"] if "other" in (r.get("cpu") or {})]
        if others and statistics.median(others) >= 25:
            busy.append(f"{name} {statistics.median(others):.0f}%")
    if busy:
        print(
            "\nwarning: something else used the CPU during these measurements (`other`, % of "
            "one core): " + ", ".join(busy) + ". Those figures are not comparable; re-run on "
            "an idle machine."
        )
    if bench.errors:
        print("\nproblems:")
        for err in bench.errors:
            print(f"  {err['step']} rep {err['rep']}: {err['error']}")
    print(f"\n{json_path.relative_to(ROOT)}; logs in {bench.outdir.relative_to(ROOT)}/")
    return 1 if any(not e["error"].startswith("skipped") for e in bench.errors) else 0


if __name__ == "__main__":
    sys.exit(main())
