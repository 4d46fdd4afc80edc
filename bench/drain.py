"""Drain workloads: a backlog of due pending rows delivered by `outbox dispatch` — the
`m2_1p` / `m2_2p` steps (1 and 2 dispatchers against a provider that answers at once),
`m2_senders` (M2 with one dispatcher, the backlog spread round-robin over 100 stored `fake`
senders), `m2_users` (M2 with one dispatcher, the backlog from 1,000 users),
`m2_conversation` (one conversation of 2,000 ordered messages, one dispatcher: its calls
one at a time, checked to come in acceptance order), `m3` (a provider with 20 ms latency,
50 calls in flight) and `growth` (M2 with old rows in the table). Each row has its own
recipient but in `m2_conversation`. Each stops at the first 100 ms poll that finds
nothing left, as PROTOCOL.md times the peers."""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import pairwise
from typing import Any

from bench import sql
from bench.common import CpuMeter, Proc, wait_ready
from bench.harness import Harness


def m2_1p(h: Harness, rep: int) -> None:
    drain(h, "m2_1p", rep, h.cfg.m2_n, 1, _m2_env(h))


def m2_2p(h: Harness, rep: int) -> None:
    drain(h, "m2_2p", rep, h.cfg.m2_n, 2, _m2_env(h))


def m2_senders(h: Harness, rep: int) -> None:
    """M2 with one dispatcher, its rows spread round-robin over `m2_senders` stored senders
    (created before the dispatcher starts, removed after)."""
    senders = h.cfg.m2_senders
    h.db.q(sql.DROP_SENDERS)
    h.db.q(sql.STORE_SENDERS, {"senders": senders})
    try:
        drain(h, "m2_senders", rep, h.cfg.m2_n, 1, _m2_env(h), senders=senders)
    finally:
        h.db.q(sql.DROP_SENDERS)


def m2_users(h: Harness, rep: int) -> None:
    """M2 with one dispatcher, its rows from `m2_users` users (bench-u0000, …), each with
    m2_n / m2_users of them: the claim's round-robin over the users."""
    users = h.cfg.m2_users
    per_user = max(1, h.cfg.m2_n // users)
    n = users * per_user
    drain(
        h,
        "m2_users",
        rep,
        n,
        1,
        _m2_env(h),
        fill=(sql.PREFILL_PENDING_USERS, {"per_user": per_user}),
        detail={"users": users, "per_user": per_user},
    )


def m2_conversation(h: Harness, rep: int) -> None:
    """One conversation (one sender, one `to`) of `conv_n` ordered messages, `check_order`
    as the insert sets it (all but the first), one dispatcher: the calls go one at a
    time, and must come in acceptance order (`seq`), each after the previous one ended.
    On a schema without the order columns the rows are only to one number, and the
    order is reported, not required."""
    ordered = h.db.has_column("check_order") and h.db.has_column("seq")
    drain(
        h,
        "m2_conversation",
        rep,
        h.cfg.conv_n,
        1,
        _m2_env(h),
        fill=(sql.prefill_conversation(ordered), {}),
        check=lambda h: _call_order(h, required=ordered),
        detail={"schema_ordered": ordered},
    )


def _call_order(h: Harness, required: bool) -> dict[str, Any]:
    """The calls (attempts) by their start against the messages' acceptance order (`seq`,
    else the client_message_id of the pre-fill): how many came before an earlier
    message's call, and how many started before the previous call had ended. Raises
    when `required` and either happened."""
    key = "m.seq" if required else "m.client_message_id"
    rows = h.db.q(
        f"SELECT {key}, extract(epoch FROM a.started_at), extract(epoch FROM a.finished_at) "
        "FROM outbox.attempts a JOIN outbox.messages m ON m.id = a.message_id "
        "ORDER BY a.started_at, a.finished_at"
    ).fetchall()
    inversions = sum(1 for a, b in pairwise(rows) if b[0] < a[0])
    overlaps = sum(1 for a, b in pairwise(rows) if b[1] < a[2])
    found = {
        "calls": len(rows),
        "out_of_order": inversions,
        "overlapping": overlaps,
        "order_key": key.split(".")[1],
    }
    if required and (inversions or overlaps or len(rows) != h.cfg.conv_n):
        raise RuntimeError(f"m2_conversation: calls not one at a time in order: {found}")
    if not required:
        h.log(f"m2_conversation: no order columns here, order not required: {found}")
    return found


def m3(h: Harness, rep: int) -> None:
    drain(
        h,
        "m3",
        rep,
        h.cfg.m3_n,
        1,
        {
            "OUTBOX_FAKE_LATENCY_MS": str(h.cfg.m3_latency_ms),
            "OUTBOX_DISPATCH_CONCURRENCY": str(h.cfg.m3_concurrency),
        },
    )


def growth(h: Harness, rep: int) -> None:
    drain(h, "growth", rep, h.cfg.m2_n, 1, _m2_env(h), old_rows=True)


def _m2_env(h: Harness) -> dict[str, str]:
    return {"OUTBOX_DISPATCH_CONCURRENCY": str(h.cfg.m2_concurrency)}


def prefill_old(h: Harness) -> dict[str, float]:
    """Cost growth's history (sent and failed rows, their attempts and events); seconds each."""
    took = {}
    for label, query, n in (
        ("sent", sql.PREFILL_OLD_SENT, h.cfg.growth_sent),
        ("error", sql.PREFILL_OLD_ERROR, h.cfg.growth_error),
        ("attempts", sql.PREFILL_OLD_ATTEMPTS, None),
        ("events", sql.PREFILL_OLD_EVENTS, None),
    ):
        t0 = time.monotonic()
        h.db.q(query, {"n": n} if n is not None else None)
        took[label] = round(time.monotonic() - t0, 1)
        h.log(f"cost growth pre-fill: {label} in {took[label]} s")
    return took


Fill = tuple[str, dict[str, Any]]  # a pre-fill query over %(n)s, and its other parameters


def _prepare(h: Harness, n: int, old_rows: bool, senders: int, fill: Fill | None) -> dict[str, Any]:
    """The table as the drain starts it: n due pending rows (after the history, if asked),
    from `default`, or spread over `senders` stored senders, or as `fill` inserts them."""
    h.db.reset()
    extra: dict[str, Any] = {}
    if old_rows:
        extra["prefill_seconds"] = prefill_old(h)
        h.db.vacuum()
    if fill:
        query, params = fill
        h.db.q(query, {"n": n, **params})
    elif senders:
        h.db.q(sql.PREFILL_PENDING_SENDERS, {"n": n, "senders": senders})
        extra["senders"] = senders
    else:
        h.db.q(sql.PREFILL_PENDING, {"n": n})
    h.db.vacuum()  # autovacuum is off here: visibility map and statistics by hand
    h.db.checkpoint()
    if old_rows:
        extra["table_rows"] = h.db.count_messages()
        extra["database_mb"] = round(
            h.db.scalar("SELECT pg_database_size(current_database())") / 2**20
        )
    return extra


def drain(
    h: Harness,
    name: str,
    rep: int,
    n: int,
    nproc: int,
    env: dict[str, str],
    *,
    old_rows: bool = False,
    senders: int = 0,
    fill: Fill | None = None,
    check: Callable[[Harness], dict[str, Any]] | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """n rows delivered by nproc dispatchers started with `env`, timed from the first
    `ready` to the poll that finds none left; `old_rows`: cost growth's history first;
    `senders`: the rows spread over that many stored senders (see m2_senders); `fill`:
    the rows inserted by that query instead; `check`: run once they are all sent, its
    findings (or its exception) recorded with the figure, as `detail` is."""
    extra = {**(detail or {}), **_prepare(h, n, old_rows, senders, fill)}
    procs = h.start_dispatchers(f"{name}-{rep}", nproc, **env)
    try:
        ready = wait_ready(procs)
        meter = CpuMeter({"dispatch": [p.pid for p in procs]})
        t0 = min(ready)
        t1, polls = until_drained(h, procs)
        cpu = meter.stop()
    finally:
        for proc in procs:
            h.stop(proc, "dispatch")
    counts = dict(
        h.db.q(
            "SELECT status, count(*) FROM outbox.messages "
            "WHERE NOT starts_with(user_id, 'old-') GROUP BY status"
        ).fetchall()
    )
    attempts = h.db.scalar(
        "SELECT count(*) FROM outbox.attempts WHERE dispatcher <> 'old-dispatcher'"
    )
    if counts.get("sent") != n:
        raise RuntimeError(f"{name}: statuses after the drain {counts}, expected {n} sent")
    if check is not None:
        extra.update(check(h))
    h.record(
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


def until_drained(h: Harness, procs: list[Proc]) -> tuple[float, int]:
    """Polls every 100 ms until no row is left to deliver: (that poll's epoch, polls)."""
    limit = min(h.cfg.run_timeout, max(30.0, h.remaining()))
    deadline = time.time() + limit
    polls = 0
    while True:
        polls += 1
        if not h.db.scalar(sql.UNFINISHED):
            return time.time(), polls
        if time.time() > deadline:
            left = h.db.scalar(
                "SELECT count(*) FROM outbox.messages WHERE status IN ('pending', 'in_flight')"
            )
            raise TimeoutError(f"drain not finished after {limit:.0f} s: {left} left")
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited, see {proc.log_path}")
        time.sleep(0.1)
