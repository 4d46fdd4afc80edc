"""A pytest-free self-check of the bench's own pieces (no PostgreSQL needed):
`.venv/bin/python -m bench.selfcheck`. The end-to-end check is `BENCH_QUICK=1 make bench`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from bench import provider_server
from bench.common import (
    CpuMeter,
    payload,
    payload_bytes,
    pct,
    postgres_cpu_seconds,
    proc_cpu_seconds,
    summary,
    vm_hwm_mb,
    with_other,
)
from bench.config import Config
from bench.httpclient import RawClient, build_post
from bench.limits import busiest_second, span_rate
from bench.report import ROWS, Row, render, rows
from bench.sql import (
    DROP_SENDERS,
    FLOOR_SCRIPT,
    PREFILL_CAMPAIGN,
    PREFILL_OLD_ERROR,
    PREFILL_OLD_SENT,
    PREFILL_PENDING,
    PREFILL_PENDING_FROM,
    PREFILL_PENDING_SENDERS,
    PREFILL_PENDING_USERS,
    STORE_SENDERS,
    prefill_conversation,
)
from bench.wrk import run_wrk


def check_stats() -> None:
    xs = [float(v) for v in range(1, 101)]  # 1..100
    assert pct(xs, 50) == 51.0, pct(xs, 50)  # nearest rank of 49.5 rounds to 50 → 51
    assert pct(xs, 99) == 99.0 and pct(xs, 100) == 100.0 and pct(xs, 0) == 1.0
    assert pct([3.0], 99) == 3.0
    assert summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert summary([]) is None
    # Windows (t - 1, t]: 0.0 and 1.0 are a second apart, never in one window.
    assert busiest_second([0.0, 0.5, 0.99, 1.0, 1.2]) == 4
    assert busiest_second([0.0, 1.0, 2.0]) == 1 and busiest_second([]) == 0
    assert span_rate([0.0, 0.5, 1.0]) == 2.0 and span_rate([1.0]) == 0.0


def check_report() -> None:
    assert Row("a", "x/s", [10, 12, 11], threshold=10).verdict() == (1.1, "PASS")
    assert Row("a", "x/s", [9, 8, 9.5], threshold=10).verdict()[1] == "FAIL"
    rss = Row("r", "MB", [90, 160, 100], threshold=150, higher_is_better=False, judge_on="max")
    assert rss.verdict()[1] == "FAIL"  # judged on the worst process, not the median
    assert Row("n", "ms", []).verdict() == (None, "n/a")
    assert Row("m", "ms", [1.0]).verdict() == (None, "")
    assert Row("w", "x/s", [509], threshold=500, within=0.02).verdict()[1] == "PASS"
    assert Row("w", "x/s", [489], threshold=500, within=0.02).verdict()[1] == "FAIL"
    assert Row("w", "x/s", [511], threshold=500, within=0.02).verdict()[1] == "FAIL"
    table = render([Row("a", "x/s", [1234.5], bar="≥ 1,000", threshold=1000), Row("b", "ms", [])])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1, table
    assert "PASS" in lines[2] and "n/a" in lines[3]


def check_rows() -> None:
    """The table's row spec renders with no figure at all and with every one."""
    cfg = Config.from_env()
    empty = rows({}, {"serve": [], "dispatch": []}, cfg)
    assert len(empty) == len(ROWS) and all(row.verdict()[1] == "n/a" for row in empty)
    names = {spec.source for spec in ROWS if not spec.source.startswith("rss:")}
    figures = {
        name: {"unit": "x", "values": [2.0, 4.0], "runs": [{"value": 2.0, "cpu": {"other": 12.0}}]}
        for name in (*names, "ws_rss_before")
    }
    full = rows(figures, {"serve": [{"peak_rss_mb": 90.0}], "dispatch": []}, cfg)
    by_figure = {row.figure: row for row in full}
    assert "{" not in render(full), "a format field left in the table"
    assert by_figure["M1 ingest, 1 client sequential"].note == "1.00× floor@1; 1.00× bare app"
    m2_2p = f"M2 drain, 2 dispatchers ({cfg.m2_concurrency} in flight each)"
    assert by_figure[m2_2p].threshold == 3.0  # 1× the median of m2_1p
    senders = f"M2 over {cfg.m2_senders} senders, 1 dispatcher ({cfg.m2_concurrency} in flight)"
    assert by_figure[senders].threshold == 0.9 * 3.0  # 0.9× the median of m2_1p
    assert by_figure[senders].note.startswith("1.00× M2 1 disp.")
    users = (
        f"M2 from {cfg.m2_users:,} users × {max(1, cfg.m2_n // cfg.m2_users)}, 1 dispatcher "
        f"({cfg.m2_concurrency} in flight)"
    )
    assert by_figure[users].threshold == 0.9 * 3.0  # 0.9× the median of m2_1p
    otp_p99 = by_figure["OTP under campaign: p99"]
    assert otp_p99.threshold == 100 and otp_p99.verdict()[1] == "PASS", otp_p99
    conversation = f"M2 one conversation of {cfg.conv_n:,} ordered messages, 1 dispatcher"
    assert by_figure[conversation].threshold is None
    assert by_figure[conversation].note.endswith("one call at a time, in seq order")
    before = {**figures, "m2_conversation": {"values": [1.0], "runs": [{"schema_ordered": False}]}}
    row = {r.figure: r for r in rows(before, {"serve": [], "dispatch": []}, cfg)}[conversation]
    assert "no order columns" in row.note, row.note
    assert by_figure["peak RSS, serve (each process)"].note == "1 processes"
    assert by_figure["M4 latency p50"].cpu == "other 12"
    limited = (
        f"M2 limited: 1 sender at {cfg.limited_rate:g}/s, 2 dispatchers, {cfg.limited_n:,} messages"
    )
    assert by_figure[limited].threshold == cfg.limited_rate
    peak = by_figure["M2 limited: most calls in any 1 s"]
    assert peak.threshold == cfg.limited_rate * (1 + cfg.sender_burst), peak


def check_payload_and_sql() -> None:
    body = json.loads(payload_bytes("c-0000000001"))
    assert set(body) == {"to", "type", "text", "client_message_id"}  # no "tenant": see common
    assert len(payload_bytes("c-0000000001")) == 185
    # Each message its own recipient (one number would make them one conversation).
    tos = {payload(f"c-{i}")["to"] for i in range(100)}
    assert len(tos) == 100 and {len(to) for to in tos} == {13}, tos
    assert "%(n)s" in PREFILL_PENDING and "%(n)s" in PREFILL_OLD_SENT
    queries = (
        PREFILL_PENDING,
        PREFILL_OLD_SENT,
        PREFILL_OLD_ERROR,
        PREFILL_PENDING_SENDERS,
        PREFILL_PENDING_FROM,
        PREFILL_PENDING_USERS,
        PREFILL_CAMPAIGN,
        prefill_conversation(True),
        prefill_conversation(False),
        STORE_SENDERS,
    )
    for query in queries:
        bare = query
        for name in ("n", "senders", "sender", "per_user"):
            bare = bare.replace(f"%({name})s", "")
        assert "%" not in bare, "a bare % breaks psycopg"  # psycopg placeholders only
    for query in (PREFILL_PENDING, PREFILL_OLD_SENT, PREFILL_OLD_ERROR, PREFILL_CAMPAIGN):
        assert "lpad(i::text, 9, '0')" in query, "each row its own recipient"
    assert "check_order" in prefill_conversation(True)
    assert "check_order" not in prefill_conversation(False)  # a schema from before
    assert "%(senders)s" in PREFILL_PENDING_SENDERS and "%(senders)s" in STORE_SENDERS
    assert "%" not in DROP_SENDERS  # run without parameters: no placeholder to escape
    assert FLOOR_SCRIPT.startswith("\\set cid") and FLOOR_SCRIPT.count(";") == 1


def check_proc() -> None:
    meter = CpuMeter({"self": [os.getpid()]})
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    cpu = with_other(meter.stop())
    assert cpu["self"] > 20, cpu  # a busy loop shows up (as % of one core)
    assert proc_cpu_seconds(os.getpid()) > 0
    assert (vm_hwm_mb(os.getpid()) or 0) > 1
    assert proc_cpu_seconds(2**22 + 1) == 0.0  # no such process
    assert postgres_cpu_seconds() >= 0


def check_http(tmp: Path) -> None:
    out = (tmp / "arrivals.txt").open("a")
    provider_server.Handler.out = out
    server = provider_server.Server(("127.0.0.1", 0), provider_server.Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    port = server.server_address[1]
    try:
        trips = []
        with RawClient("127.0.0.1", port) as client:  # keep-alive: three on one socket
            for i in range(3):
                data = build_post("/send", f"127.0.0.1:{port}", "t", b"{}")
                data = data.replace(b"\r\n\r\n", f"\r\nIdempotency-Key: k{i}\r\n\r\n".encode(), 1)
                sent = time.time()
                status, body = client.request(data)
                trips.append((sent, time.time()))
                assert status == 200 and json.loads(body) == {"id": f"bench-k{i}"}, body
        out.flush()
        lines = [line.split() for line in (tmp / "arrivals.txt").read_text().splitlines()]
        assert [key for key, _ in lines] == ["k0", "k1", "k2"], lines
        for (_, stamp), (sent, answered) in zip(lines, trips, strict=True):
            assert sent <= float(stamp) <= answered, (sent, stamp, answered)  # this call's
        wrk = shutil.which("wrk")
        if wrk:  # the Lua script and the SIGINT hand-over; this server answers 200, not 202
            result, cpu_seconds, wall = run_wrk(
                wrk,
                f"http://127.0.0.1:{port}/send",
                "t",
                per_thread=50,
                threads=2,
                connections=4,
                out_path=tmp / "wrk.txt",
                max_seconds=60,
            )
            assert wall < 30, f"wrk was not stopped after its requests ({wall:.1f} s)"
            assert result["answered"] >= 100 and result["non_202"] == result["answered"], result
            assert cpu_seconds >= 0
        else:
            print("  (wrk not installed: its check skipped)")
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        out.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        checks = (check_stats, check_report, check_rows, check_payload_and_sql, check_proc)
        for check in checks:
            check()
            print(f"ok {check.__name__}")
        check_http(Path(tmp))
        print("ok check_http")


if __name__ == "__main__":
    main()
