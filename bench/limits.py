"""Senders' limits: the `m2_limited` step (a backlog from one sender limited to
`limited_rate`, 500/s, delivered by 2 dispatchers: the achieved rate and the busiest
one-second window of calls and of claims) and the `limited_cpu` step (one sender
limited to `cpu_rate`, 20/s, with `cpu_n` due messages: what the dispatchers and
PostgreSQL spend waiting on its tokens, over a window of `cpu_seconds`).

Each sender is stored through the admin API (`PUT /senders/{id}` on a `serve` started
for it): a `fake` one, or with BENCH_LIMITED_PROVIDER=http an `http` one calling the
bench's provider server (see `Calls`); the bench's `default` sender stays unlimited, as
every other step has it."""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import sql
from bench.common import CpuMeter, Proc, free_port, proc_cpu_seconds, wait_ready
from bench.database import Database
from bench.drain import until_drained
from bench.harness import Harness, wait_lines

LIMITED = "bench-limited"
SLOW = "bench-slow"
CLAIMS = re.compile(r"^outbox_claim_batch_messages_count(?:\{[^}]*\})? ([0-9.e+]+)$", re.M)
EMPTY_CLAIMS = re.compile(r'^outbox_claim_batch_messages_bucket\{le="0\.0"\} ([0-9.e+]+)$', re.M)


def m2_limited(h: Harness, rep: int) -> None:
    """`limited_n` due rows from one sender at `limited_rate`, 2 dispatchers, timed by
    the calls' starts (`attempts.started_at`) or, through the provider server, their
    arrivals there; and by the claims' own clock, where the bucket counts its tokens."""
    rate, n = h.cfg.limited_rate, h.cfg.limited_n
    tag = f"limited-{rep}"
    calls = Calls.start(h, tag)
    procs: list[Proc] = []
    try:
        _prepare(h, tag, LIMITED, calls.sender(h, rate), n)
        h.db.q(sql.CLAIM_TIMES_ON)
        procs, ports = _dispatchers(h, tag, 2)
        ready = wait_ready(procs)
        meter = CpuMeter({"dispatch": [p.pid for p in procs], **calls.pids()})
        t1, polls = until_drained(h, procs)
        cpu = meter.stop()
        claims = sum(claims_made(port) for port in ports)
    finally:
        for proc in procs:
            h.stop(proc, "dispatch")
        calls.stop(n)
        h.db.q(sql.CLAIM_TIMES_OFF)
    try:
        counts = dict(
            h.db.q("SELECT status, count(*) FROM outbox.messages GROUP BY status").fetchall()
        )
        if counts.get("sent") != n:
            raise RuntimeError(f"m2_limited: statuses after the drain {counts}, expected {n} sent")
        outcomes = dict(
            h.db.q("SELECT outcome, count(*) FROM outbox.attempts GROUP BY outcome").fetchall()
        )
        started = started_times(h.db)
        claimed = [float(t) for (t,) in h.db.q(sql.CLAIM_TIMES).fetchall()]
    finally:
        h.db.q(sql.DROP_SENDERS)
    for label, stamps in (("starts", started), ("claims", claimed)):  # the raw data
        (h.outdir / f"{tag}-{label}.txt").write_text("".join(f"{t:.6f}\n" for t in stamps))
    times = calls.times(started)
    if len(times) < n:
        raise RuntimeError(f"m2_limited: {len(times)} of {n} calls arrived")
    achieved = span_rate(times)
    peak, peak_end = busiest_second(times), busiest_end(times)
    cap = rate * (1 + h.cfg.sender_burst)
    detail: dict[str, Any] = {
        "n": n,
        "limit": rate,
        "cap": cap,
        "provider": h.cfg.limited_provider,
        "timed_by": calls.timed_by,
        "calls": len(times),
        "seconds": round(times[-1] - times[0], 3),
        "first_call_after_ready": round(times[0] - min(ready), 3),
        "drained_after_last_call": round(t1 - times[-1], 3),
        # The first second holds the full bucket: the pace after it, apart.
        "steady_rate": round(span_rate([t for t in times if t >= times[0] + 1]), 1),
        # Where the busiest window ends, from the first call (s).
        "busiest_ends_at": round(peak_end - times[0], 3),
        "started_rate": round(span_rate(started), 1),
        "started_busiest_second": busiest_second(started),
        "claimed_rate": round(span_rate(claimed), 1),
        "claimed_busiest_second": busiest_second(claimed),
        "claimed_busiest_ends_at": round(busiest_end(claimed) - claimed[0], 3) if claimed else None,
        "outcomes": outcomes,
        "claims": claims,
        "ready_spread": round(max(ready) - min(ready), 3),
        "polls": polls,
        "cpu": cpu,
    }
    h.record("m2_limited", "msg/s", achieved, **detail)
    h.record("m2_limited_peak", "calls", peak, **detail)
    h.record("m2_limited_claimed_peak", "rows", detail["claimed_busiest_second"], **detail)
    h.log(
        f"m2_limited ({h.cfg.limited_provider}, {calls.timed_by}): {achieved:,.1f} msg/s = "
        f"{achieved / rate:.3f}× the limit of {rate:g}/s (after the first second "
        f"{detail['steady_rate']:,.1f}); busiest 1 s: {peak} calls (ending "
        f"{detail['busiest_ends_at']:.2f} s in), {detail['claimed_busiest_second']} rows "
        f"claimed (cap {cap:,.0f}); {claims:.0f} claims; dispatchers {cpu['dispatch']:.0f} % "
        "of a core"
    )


def limited_cpu(h: Harness, rep: int) -> None:
    """One sender at `cpu_rate` with `cpu_n` due rows and `cpu_dispatchers` dispatchers:
    their CPU and PostgreSQL's over `cpu_seconds` once the pace is reached."""
    rate, n, nproc = h.cfg.cpu_rate, h.cfg.cpu_n, h.cfg.cpu_dispatchers
    tag = f"limitedcpu-{rep}"
    calls = Calls.start(h, tag)
    procs: list[Proc] = []
    try:
        _prepare(h, tag, SLOW, calls.sender(h, rate), n)
        procs, ports = _dispatchers(h, tag, nproc)
        wait_ready(procs)
        # Past the first bucket and a few refills: the steady pace.
        warm = int(2 * rate) + 1
        if wait_attempts(h.db, warm, 30) < warm:
            raise RuntimeError(f"limited_cpu: fewer than {warm} calls within 30 s")
        claims0 = sum(claims_made(port) for port in ports)
        empty0 = sum(claims_made(port, EMPTY_CLAIMS) for port in ports)
        meter = CpuMeter(
            {
                "dispatch": [p.pid for p in procs],
                **{f"dispatch-{k}": [p.pid] for k, p in enumerate(procs)},
                **calls.pids(),
            }
        )
        backends = BackendCpu(h.db)
        t0 = time.time()
        time.sleep(h.cfg.cpu_seconds)  # the measured window: nothing of the bench's runs
        t1 = time.time()
        pg = backends.stop()
        cpu = meter.stop()
        claims = sum(claims_made(port) for port in ports) - claims0
        empty = sum(claims_made(port, EMPTY_CLAIMS) for port in ports) - empty0
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited, see {proc.log_path}")
    finally:
        for proc in procs:
            h.stop(proc, "dispatch")
        calls.stop(0)
    try:
        started = started_times(h.db)
    finally:
        h.db.reset()
        h.db.q(sql.DROP_SENDERS)
    window = t1 - t0
    each = max(cpu[f"dispatch-{k}"] for k in range(nproc))
    detail: dict[str, Any] = {
        "dispatchers": nproc,
        "limit": rate,
        "due": n,
        "provider": h.cfg.limited_provider,
        "seconds": round(window, 2),
        "calls_per_s": round(sum(t0 <= t < t1 for t in started) / window, 2),
        "claims_per_s": round(claims / window, 2),
        "empty_claims_per_s": round(empty / window, 2),
        "pg_backends": pg,
        "cpu": cpu,
    }
    h.record("limited_cpu_disp", "% core", each, **detail)
    h.record("limited_cpu_pg", "% core", pg["percent"], **detail)
    h.log(
        f"limited_cpu ({h.cfg.limited_provider}): {nproc} dispatcher(s), a sender at "
        f"{rate:g}/s with {n:,} due, {window:.1f} s: dispatcher {each:.1f} % of a core "
        f"(each), PostgreSQL (the database's backends) {pg['percent']:.1f} % (whole cluster, "
        f"others' included, {cpu['postgres']:.1f}); {detail['calls_per_s']:.1f} calls/s, "
        f"{detail['claims_per_s']:.1f} claims/s ({detail['empty_claims_per_s']:.1f} empty)"
    )


# Pieces -------------------------------------------------------------------------------


@dataclass
class Calls:
    """Where the limited sender's calls go: the `fake` provider (its calls timed by their
    `attempts.started_at`, the dispatcher's clock as each starts) or, with
    BENCH_LIMITED_PROVIDER=http, the bench's provider server (timed by their arrival)."""

    provider: Proc | None = None
    port: int = 0
    arrivals: Path | None = None

    @classmethod
    def start(cls, h: Harness, tag: str) -> Calls:
        if h.cfg.limited_provider != "http":
            return cls()
        return cls(*h.start_provider(tag))

    @property
    def timed_by(self) -> str:
        return "arrivals" if self.arrivals else "attempts.started_at"

    def sender(self, h: Harness, rate: float) -> dict[str, Any]:
        """The sender's body for `PUT /senders/{id}`, limited to `rate`."""
        if self.provider is None:
            return {"provider": "fake", "settings": {"latency_ms": 0}, "rate_limit": rate}
        return {
            "provider": "http",
            "settings": {"url": f"http://127.0.0.1:{self.port}/send", "secret": h.secret},
            "rate_limit": rate,
        }

    def pids(self) -> dict[str, list[int]]:
        return {"provider": [self.provider.pid]} if self.provider else {}

    def stop(self, wait_for: int) -> None:
        """Stops the provider server once `wait_for` calls have arrived (15 s at most)."""
        if self.provider is None:
            return
        if self.arrivals is not None and wait_for:
            wait_lines(self.arrivals, wait_for, 15)
        self.provider.stop()

    def times(self, started: list[float]) -> list[float]:
        return arrival_times(self.arrivals) if self.arrivals else started


def _dispatchers(h: Harness, tag: str, n: int) -> tuple[list[Proc], list[int]]:
    """n dispatchers, each with a metrics port of its own (read for its claims)."""
    procs: list[Proc] = []
    ports: list[int] = []
    for k in range(n):
        ports.append(free_port())
        procs += h.start_dispatchers(f"{tag}-{k}", 1, OUTBOX_METRICS_PORT=str(ports[-1]))
    return procs, ports


def _prepare(h: Harness, tag: str, sender_id: str, body: dict[str, Any], n: int) -> None:
    """An empty table, the sender stored through the admin API (a `serve` started for
    it), then n due rows from it."""
    h.db.reset()
    h.db.q(sql.DROP_SENDERS)
    serve, port = h.start_serve(tag)
    try:
        stored = h.put_sender(port, sender_id, body)
    finally:
        h.stop(serve, "serve")
    if stored.get("rate_limit") != body["rate_limit"]:
        raise RuntimeError(f"{sender_id} stored with rate_limit {stored.get('rate_limit')}")
    h.db.q(sql.PREFILL_PENDING_FROM, {"n": n, "sender": sender_id})
    h.db.vacuum()  # autovacuum is off here: visibility map and statistics by hand
    h.db.checkpoint()


def started_times(db: Database) -> list[float]:
    """Every attempt's start (epoch seconds), in order."""
    rows = db.q(
        "SELECT extract(epoch FROM started_at) FROM outbox.attempts ORDER BY started_at"
    ).fetchall()
    return [float(t) for (t,) in rows]


def wait_attempts(db: Database, n: int, timeout: float) -> int:
    """Until n attempts have started (or the timeout); how many have."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = int(db.scalar("SELECT count(*) FROM outbox.attempts"))
        if count >= n:
            break
        time.sleep(0.1)
    return count


def arrival_times(path: Path) -> list[float]:
    """The provider server's arrival stamps, sorted (epoch seconds)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return sorted(float(line.rpartition(" ")[2]) for line in lines if line.strip())


def span_rate(times: list[float]) -> float:
    """Events per second from the first to the last of sorted `times` (0 with fewer than 2)."""
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])


def busiest_second(times: list[float]) -> int:
    """The most of sorted `times` that any one-second window (t - 1, t] holds."""
    best = 0
    first = 0
    for last, t in enumerate(times):
        while times[first] <= t - 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best


def busiest_end(times: list[float]) -> float:
    """The end t of the first busiest window (t - 1, t] of sorted `times` (0 if none)."""
    best, end, first = 0, 0.0, 0
    for last, t in enumerate(times):
        while times[first] <= t - 1.0:
            first += 1
        if last - first + 1 > best:
            best, end = last - first + 1, t
    return end


def claims_made(port: int, pattern: re.Pattern[str] = CLAIMS) -> float:
    """The dispatcher's claim statements so far (EMPTY_CLAIMS: those that claimed
    nothing), from its /metrics (0 if unreadable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


class BackendCpu:
    """CPU of the PostgreSQL backends serving the bench database (the processes'
    connections, not the bench's own), over a window: the server's share of this
    workload, apart from other databases of the same cluster. A backend that ends
    inside the window loses its time (counted in `gone`)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.started = time.monotonic()
        self.start = self._sample()

    def _sample(self) -> dict[int, float]:
        pids = self.db.q(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        return {pid: proc_cpu_seconds(pid) for (pid,) in pids}

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.started
        end = self._sample()
        used = sum(seconds - self.start.get(pid, 0.0) for pid, seconds in end.items())
        return {
            "percent": round(100 * used / wall, 2),
            "seconds": round(wall, 2),
            "backends": len(end),
            "new": len(set(end) - set(self.start)),
            "gone": len(set(self.start) - set(end)),
        }
