"""The `otp` step, "OTP under campaign": a `low` campaign of `otp_campaign` rows (10,000,
each its own recipient) drains through one stored sender limited to `otp_limit` (500/s)
while `high` messages from that sender are POSTed at `otp_rate` (10/s) for `otp_seconds`;
their latency from the POST answered to the call's arrival at the bench's provider
server (the sender is an `http` one calling it: the `fake` provider cannot stamp its
calls), as M4 times it, and to the call's start (`attempts.started_at`). Goal: p99 under
100 ms. BENCH_OTP_PROVIDER=fake: a `fake` sender, the calls timed by their start only
(the claim's share, without the HTTP client's queue).

Where the API has no `priority` field yet (a 422 on it), the `high` rows are INSERTed
(priority 0, with the insert's NOTIFY) and timed from that commit's return instead.
Skipped on a schema without the priority column."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench import sql
from bench.common import CpuMeter, Proc, pct, recipient, wait_ready
from bench.harness import SEND, Harness, Skipped
from bench.httpclient import RawClient, build_post
from bench.latency import WARM, paced, record_latency
from bench.limits import _dispatchers, arrival_times, claims_made, span_rate

SENDER = "bench-otp"
TEXT = "Your code is 482913. It expires in 10 minutes."

# A `high` message as the API would insert it (no live earlier one to its number: no
# check_order), when the API has no `priority` field; its id.
INSERT_HIGH = """
INSERT INTO outbox.messages (id, user_id, "to", type, payload, request_hash, max_attempts,
                             next_attempt_at, sender, priority)
VALUES (%(id)s, 'bench', %(to)s, 'text', %(payload)s, sha256(convert_to(%(to)s, 'UTF8')), 4,
        now(), %(sender)s, 0)
RETURNING id::text
"""

_otp_numbers = itertools.count(1)


def otp_to() -> str:
    """A number of the OTPs' own: area 21, never one of the campaign's (area 11), whose
    live message to the same number would hold the OTP back (its order)."""
    return recipient(next(_otp_numbers), area="21")


def otp_body() -> bytes:
    return json.dumps(
        {"to": otp_to(), "type": "text", "text": TEXT, "sender": SENDER, "priority": "high"},
        separators=(",", ":"),
    ).encode()


class Producer:
    """The OTPs' way in: POSTs on one kept-alive connection, or, when the API refuses
    the `priority` field, INSERTs of priority 0 on one autocommit connection."""

    def __init__(self, h: Harness, port: int) -> None:
        self.h = h
        self.host = f"127.0.0.1:{port}"
        self.client = RawClient("127.0.0.1", port)
        self.conn: psycopg.Connection[Any] | None = None
        self.via = "api"

    def __enter__(self) -> Producer:
        self.client.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.__exit__(None, None, None)
        if self.conn is not None:
            self.conn.close()

    def send(self, _i: int = 0) -> str:
        """One OTP, its task id once answered (committed)."""
        if self.via == "sql":
            return self._insert()
        status, body = self.client.request(build_post(SEND, self.host, self.h.token, otp_body()))
        if status == 422 and b"priority" in body:  # an API without the field: by SQL
            self.h.log("otp: the API has no `priority` field: high rows INSERTed instead")
            self.via = "sql"
            self.conn = psycopg.connect(self.h.db.url, autocommit=True)
            return self._insert()
        if status != 202:
            raise RuntimeError(f"otp: POST answered {status}: {body[:300]!r}")
        return str(json.loads(body)["task_id"])

    def _insert(self) -> str:
        assert self.conn is not None
        row = self.conn.execute(
            INSERT_HIGH,
            {
                "id": uuid.uuid4(),
                "to": otp_to(),
                "payload": Jsonb({"body": TEXT, "preview_url": False}),
                "sender": SENDER,
            },
        ).fetchone()
        assert row is not None
        return str(row[0])


@dataclass
class Arrivals:
    """Where the sender's calls are timed: at the bench's provider server (an `http`
    sender; the stamp of each call's arrival) or, with BENCH_OTP_PROVIDER=fake, at their
    start as the dispatcher records it (`attempts.started_at`), written to a file of the
    same form once the run is over (`close`)."""

    h: Harness
    path: Path
    provider: Proc | None = None
    port: int = 0

    @classmethod
    def start(cls, h: Harness, tag: str) -> Arrivals:
        if h.cfg.otp_provider == "fake":
            return cls(h, h.outdir / f"{tag}-starts.txt")
        provider, port, path = h.start_provider(tag)
        return cls(h, path, provider, port)

    @property
    def timed_by(self) -> str:
        return "arrivals" if self.provider else "attempts.started_at"

    def sender(self) -> dict[str, Any]:
        """The sender's body for `PUT /senders/{id}`."""
        body: dict[str, Any] = {"rate_limit": self.h.cfg.otp_limit, "users": ["*"]}
        if self.provider is None:
            return {"provider": "fake", "settings": {"latency_ms": 0}, **body}
        url = f"http://127.0.0.1:{self.port}/send"
        return {"provider": "http", "settings": {"url": url, "secret": self.h.secret}, **body}

    def pids(self) -> dict[str, list[int]]:
        return {"provider": [self.provider.pid]} if self.provider else {}

    def count(self) -> int:
        if self.provider is None:
            return int(self.h.db.scalar("SELECT count(*) FROM outbox.attempts"))
        try:
            return self.path.read_bytes().count(b"\n")
        except OSError:
            return 0

    def keys(self) -> set[str]:
        if self.provider is None:
            rows = self.h.db.q("SELECT message_id::text FROM outbox.attempts").fetchall()
            return {key for (key,) in rows}
        try:
            return {line.partition(" ")[0] for line in self.path.read_text().splitlines()}
        except OSError:
            return set()

    def wait_count(self, n: int, timeout: float) -> int:
        """Until n calls have been timed (or the timeout); how many have."""
        deadline = time.monotonic() + timeout
        while (count := self.count()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return count

    def missing(self, keys: set[str], timeout: float) -> set[str]:
        """Until every key's call has been timed (or the timeout); those not."""
        deadline = time.monotonic() + timeout
        missing = set(keys)
        while missing:
            missing -= self.keys()
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return missing

    def close(self) -> None:
        """The provider server stopped; or the attempts' starts written out."""
        if self.provider is not None:
            self.provider.stop()
            return
        rows = self.h.db.q(
            "SELECT message_id::text, extract(epoch FROM started_at) FROM outbox.attempts "
            "ORDER BY started_at"
        ).fetchall()
        self.path.write_text("".join(f"{key} {float(t):.6f}\n" for key, t in rows))


def _campaign_left(h: Harness) -> int:
    return int(
        h.db.scalar(
            "SELECT count(*) FROM outbox.messages WHERE user_id = 'campaign' "
            "AND status IN ('pending', 'in_flight')"
        )
    )


def otp(h: Harness, rep: int) -> None:
    if not h.db.has_column("priority"):
        raise Skipped("no priority column in outbox.messages (a schema before priorities)")
    cfg = h.cfg
    tag = f"otp-{rep}"
    h.db.reset()
    h.db.q(sql.DROP_SENDERS)
    calls = Arrivals.start(h, tag)
    serve: Proc | None = None
    procs: list[Proc] = []
    try:
        serve, port = h.start_serve(tag)
        stored = h.put_sender(port, SENDER, calls.sender())
        if stored.get("rate_limit") != cfg.otp_limit:
            raise RuntimeError(f"{SENDER} stored with rate_limit {stored.get('rate_limit')}")
        h.db.q(sql.PREFILL_CAMPAIGN, {"n": cfg.otp_campaign, "sender": SENDER})
        h.db.vacuum()  # autovacuum is off here: visibility map and statistics by hand
        h.db.checkpoint()
        procs, ports = _dispatchers(h, tag, cfg.otp_dispatchers)
        ready = wait_ready(procs)
        # The campaign under way (its first second of calls), then the OTPs' warm-up:
        # the connection, serve's pool; they go through the campaign like the others.
        calls.wait_count(min(cfg.otp_campaign, int(cfg.otp_limit)), 30)
        pids = {"serve": [serve.pid], "dispatch": [p.pid for p in procs], **calls.pids()}
        with Producer(h, port) as producer:
            warm = {producer.send() for _ in range(WARM)}
            if missing := calls.missing(warm, 15):
                raise RuntimeError(f"otp: {len(missing)} of {WARM} warm-up calls never arrived")
            left_at_start = _campaign_left(h)
            arrived_at_start = time.time()
            claims0 = sum(claims_made(p) for p in ports)
            meter = CpuMeter(pids, self_cpu=True)
            sent, late = paced(h, producer.send, str, cfg.otp_rate, cfg.otp_seconds)
            left_at_end = _campaign_left(h)
            missing = calls.missing({key for key, _, _ in sent}, 15)
            cpu = meter.stop()
            claims = sum(claims_made(p) for p in ports) - claims0
            via = producer.via
    finally:
        for proc in procs:
            h.stop(proc, "dispatch")
        if serve is not None:
            h.stop(serve, "serve")
    try:
        calls.close()
        started = {
            message_id: float(epoch)
            for message_id, epoch in h.db.q(
                "SELECT message_id::text, extract(epoch FROM started_at) "
                "FROM outbox.attempts WHERE attempt = 1"
            ).fetchall()
        }
    finally:
        h.db.reset()
        h.db.q(sql.DROP_SENDERS)
    if left_at_end == 0:
        raise RuntimeError(
            "otp: the campaign had drained before the last OTP: not under campaign "
            "(a larger BENCH_OTP_CAMPAIGN or a shorter BENCH_OTP_SECONDS)"
        )
    # The pace of the calls (the campaign's, the OTPs' among them) while the OTPs went.
    t_end = sent[-1][2] if sent else arrived_at_start
    window = [t for t in arrival_times(calls.path) if arrived_at_start <= t <= t_end]
    cpu["loadgen"] = cpu.pop("bench")
    record_latency(
        h,
        "otp",
        sent,
        calls.path,
        started,
        via=via,
        timed_by=calls.timed_by,
        timed_from="POST answered" if via == "api" else "INSERT committed",
        limit=cfg.otp_limit,
        campaign=cfg.otp_campaign,
        campaign_left_at_start=left_at_start,
        campaign_left_at_end=left_at_end,
        calls_per_s_meanwhile=round(span_rate(window), 1),
        claims=claims,
        dispatchers=cfg.otp_dispatchers,
        late_posts=late,
        post_p50_ms=round(pct([1000 * (r - c) for _, c, r in sent], 50), 3),
        ready_spread=round(max(ready) - min(ready), 3),
        cpu=cpu,
    )
    h.log(
        f"otp ({via}): {len(sent)} high at {cfg.otp_rate:g}/s, campaign {left_at_start:,} → "
        f"{left_at_end:,} left of {cfg.otp_campaign:,}, calls {span_rate(window):,.0f}/s "
        f"meanwhile (limit {cfg.otp_limit:g}/s); {len(missing)} OTPs never arrived"
    )
