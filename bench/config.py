"""The bench's knobs, read once from the environment (see bench/run.py for the list)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from outbox.settings import parse_duration


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
    m2_senders: int
    m2_users: int
    conv_n: int
    m3_n: int
    m3_latency_ms: float
    m3_concurrency: int
    m4_rate: float
    m4_seconds: float
    growth_sent: int
    growth_error: int
    floor_seconds: int
    ws_clients: int
    limited_n: int
    limited_rate: float
    cpu_n: int
    cpu_rate: float
    cpu_seconds: float
    cpu_dispatchers: int
    otp_campaign: int
    otp_limit: float
    otp_rate: float
    otp_seconds: float
    otp_dispatchers: int
    otp_provider: str  # otp's sender: http (calls timed at the provider server) or fake
    limited_provider: str  # the limited senders' provider: fake, or http (the provider server)
    receipts_n: int  # receipts: sent messages whose statuses are POSTed (two passes)
    receipts_batch: int  # statuses per webhook POST
    receipts_clients: int  # concurrent webhook clients
    receipts_seconds: float  # the ingestion window
    receipts_rate: float  # single `read` POSTs per second, timed to their event on a feed
    receipts_latency_seconds: float
    sender_burst: float  # OUTBOX_SENDER_BURST as the processes get it (passed through)
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
            # The m2_senders step: M2's backlog spread round-robin over this many senders.
            m2_senders=_env_int("BENCH_M2_SENDERS", 100),
            # m2_users: M2's backlog from this many users (m2_n / m2_users each).
            m2_users=_env_int("BENCH_M2_USERS", 1_000),
            # m2_conversation: one conversation of this many ordered messages (its calls go
            # one at a time).
            conv_n=_env_int("BENCH_CONV_N", 500 if quick else 2_000),
            m3_n=_env_int("BENCH_M3_N", 1_000 if quick else 5_000),
            m3_latency_ms=20.0,
            m3_concurrency=50,
            m4_rate=100.0,
            m4_seconds=_env_float("BENCH_M4_SECONDS", 5 if quick else 20),
            growth_sent=_env_int("BENCH_GROWTH_SENT", 100_000 if quick else 1_000_000),
            growth_error=_env_int("BENCH_GROWTH_ERROR", 10_000 if quick else 100_000),
            floor_seconds=_env_int("BENCH_FLOOR_SECONDS", 3 if quick else 15),
            ws_clients=_env_int("BENCH_WS_CLIENTS", 2_000 if quick else 10_000),
            # m2_limited: a backlog from one sender limited to this rate, 2 dispatchers.
            # 10,000 even when quick: the first claim's full bucket (0.2 s worth) lifts
            # the rate over the run by 1 % at 10,000, by 5 % at 2,000.
            limited_n=_env_int("BENCH_LIMITED_N", 10_000),
            limited_rate=_env_float("BENCH_LIMITED_RATE", 500),
            # limited_cpu: the CPU that a slow sender's due backlog costs, over a window.
            cpu_n=_env_int("BENCH_CPU_N", 10_000),
            cpu_rate=_env_float("BENCH_CPU_RATE", 20),
            cpu_seconds=_env_float("BENCH_CPU_SECONDS", 5 if quick else 20),
            cpu_dispatchers=_env_int("BENCH_CPU_DISPATCHERS", 1),
            # otp: `high` messages POSTed at otp_rate/s for otp_seconds while a `low`
            # campaign of otp_campaign rows drains through one sender limited to otp_limit.
            otp_campaign=_env_int("BENCH_OTP_CAMPAIGN", 10_000),
            otp_limit=_env_float("BENCH_OTP_LIMIT", 500),
            otp_rate=_env_float("BENCH_OTP_RATE", 10),
            otp_seconds=_env_float("BENCH_OTP_SECONDS", 5 if quick else 10),
            otp_dispatchers=_env_int("BENCH_OTP_DISPATCHERS", 2),
            otp_provider=os.environ.get("BENCH_OTP_PROVIDER") or "http",
            limited_provider=os.environ.get("BENCH_LIMITED_PROVIDER") or "fake",
            # receipts: signed POSTs of receipts_batch statuses from receipts_clients
            # clients for receipts_seconds over receipts_n sent messages (delivered, then
            # read: each status a change; 16,000-18,500 statuses/s on the 2-core VM:
            # 150,000 rows last the 10 s); then single `read`s at receipts_rate/s for
            # receipts_latency_seconds, timed to their `message_status` on a feed.
            receipts_n=_env_int("BENCH_RECEIPTS_N", 60_000 if quick else 150_000),
            receipts_batch=_env_int("BENCH_RECEIPTS_BATCH", 100),
            receipts_clients=_env_int("BENCH_RECEIPTS_CLIENTS", 4),
            receipts_seconds=_env_float("BENCH_RECEIPTS_SECONDS", 5 if quick else 10),
            receipts_rate=_env_float("BENCH_RECEIPTS_RATE", 50),
            receipts_latency_seconds=_env_float("BENCH_RECEIPTS_LATENCY_SECONDS", 5),
            sender_burst=float(parse_duration(os.environ.get("OUTBOX_SENDER_BURST") or 0.2)),
            run_timeout=_env_float("BENCH_RUN_TIMEOUT", 180),
            budget_s=_env_float("BENCH_BUDGET_S", 840),
            keep_db=os.environ.get("BENCH_KEEP_DB", "") not in ("", "0"),
            only=tuple(s.strip() for s in os.environ.get("BENCH_ONLY", "").split(",") if s.strip()),
        )

    def wants(self, step: str) -> bool:
        """Whether BENCH_ONLY (empty: every step) selects this step."""
        return not self.only or step in self.only
