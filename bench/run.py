"""`make bench`: the workloads of bench/README.md against the real `outbox serve` /
`outbox dispatch`.

A fresh database on the local PostgreSQL per run (or OUTBOX_BENCH_DATABASE_URL), logs and
the raw data under bench/results/<timestamp>/, the table on stdout and in
bench/results/<timestamp>.json. Knobs (environment): BENCH_QUICK=1 (small N, 1 repetition),
BENCH_REPS, BENCH_M1_N, BENCH_M2_N, BENCH_M2_SENDERS (default 100), BENCH_M3_N,
BENCH_M2_USERS (default 1,000: m2_users), BENCH_CONV_N (default 2,000: m2_conversation),
BENCH_M4_SECONDS, BENCH_LIMITED_N, BENCH_LIMITED_RATE (m2_limited: 10,000 rows from one
sender at 500/s), BENCH_CPU_N, BENCH_CPU_RATE, BENCH_CPU_SECONDS, BENCH_CPU_DISPATCHERS
(limited_cpu: 10,000 due rows from one sender at 20/s, 1 dispatcher, 20 s),
BENCH_OTP_CAMPAIGN, BENCH_OTP_LIMIT, BENCH_OTP_RATE, BENCH_OTP_SECONDS,
BENCH_OTP_DISPATCHERS (otp: `high` POSTs at 10/s for 10 s while a 10,000-row `low`
campaign drains through one sender at 500/s, 2 dispatchers), BENCH_RECEIPTS_N,
BENCH_RECEIPTS_BATCH, BENCH_RECEIPTS_CLIENTS, BENCH_RECEIPTS_SECONDS, BENCH_RECEIPTS_RATE,
BENCH_RECEIPTS_LATENCY_SECONDS (receipts: signed status webhooks of 100 statuses from 4
clients for 10 s over 150,000 sent messages into one serve, then single `read`s at 50/s
for 5 s timed to their event on a feed), BENCH_GROWTH_SENT,
BENCH_GROWTH_ERROR, BENCH_FLOOR_SECONDS, BENCH_BUDGET_S (default 840), BENCH_KEEP_DB=1,
BENCH_ONLY=floor,m1,m2_1p,m2_senders,m2_users,m2_conversation,m2_2p,m3,m4,m4_floor,
m2_limited,limited_cpu,otp,receipts,growth,ws (a subset of the steps; m1 includes M1's stack floor,
bench/bare_app.py; m2_senders and m2_users are judged against m2_1p of the same run),
BENCH_WS_CLIENTS (the `ws` step's idle feeds).
OUTBOX_* variables that the bench does not set itself (e.g. OUTBOX_DB_POOL_SIZE,
OUTBOX_DISPATCH_CONCURRENCY outside M3) are passed to the processes and recorded.

The harness (bench/harness.py) holds the database, the processes, the budget and the
figures; each step is a function of a workload module; bench/report.py renders the table.
"""

from __future__ import annotations

import json
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import drain, feeds, ingest, latency, limits, otp, receipts
from bench.common import BENCH_DIR, ROOT, payload_bytes, stop_all
from bench.config import Config
from bench.harness import Harness
from bench.machine import environment
from bench.report import Row, render, rows


@dataclass(frozen=True)
class Step:
    name: str  # as BENCH_ONLY names it
    run: Callable[[Harness, int], None]
    reps: int
    need: float = 0.0  # seconds of budget a repetition needs at least


def steps(cfg: Config) -> list[Step]:
    """Every step `make bench` runs, in order."""
    return [
        Step("floor", ingest.floor, cfg.reps),
        Step("m1", ingest.m1, cfg.reps),
        Step("m2_1p", drain.m2_1p, cfg.reps),
        Step("m2_senders", drain.m2_senders, cfg.reps),
        Step("m2_users", drain.m2_users, cfg.reps),
        Step("m2_conversation", drain.m2_conversation, cfg.reps),
        Step("m2_2p", drain.m2_2p, cfg.reps),
        Step("m3", drain.m3, cfg.reps),
        Step("m4", latency.m4, cfg.reps),
        Step("m4_floor", latency.m4_floor, cfg.reps),
        Step("m2_limited", limits.m2_limited, cfg.reps),
        Step("limited_cpu", limits.limited_cpu, 1),
        Step("otp", otp.otp, cfg.reps),
        Step("receipts", receipts.receipts, cfg.reps),
        Step("growth", drain.growth, 1, need=90 if cfg.growth_sent >= 500_000 else 0),
        Step("ws", feeds.ws, 1, need=60),
    ]


def _warn_if_busy(h: Harness, env_info: dict[str, Any]) -> None:
    load1 = float(env_info["machine"]["loadavg_at_start"][0])
    others = [r for r in env_info["postgres"]["other_sessions_at_start"] if r[1] == "active"]
    if load1 > 0.5 or others:
        h.log(
            f"warning: the machine is not idle (load {load1:.2f}, active sessions on other "
            f"databases: {others or 'none'}); figures will be noisy"
        )


def run_steps(h: Harness) -> dict[str, Any]:
    """Set-up, the selected steps, teardown; what the run was measured on."""
    env_info: dict[str, Any] = {}
    try:
        h.setup()
        env_info = environment(h)
        _warn_if_busy(h, env_info)
        for step in steps(h.cfg):
            if h.cfg.wants(step.name):
                h.step(step.name, step.run, step.reps, need=step.need)
    except Exception as exc:
        h.errors.append({"step": "setup", "rep": "-", "error": f"{type(exc).__name__}: {exc}"})
        h.log(f"FAILED: {type(exc).__name__}: {exc}")
        (h.outdir / "error-setup.txt").write_text(traceback.format_exc())
    finally:
        stop_all()
        try:
            h.teardown()
        except Exception as exc:
            h.log(f"warning: could not drop the bench database: {exc}")
    return env_info


def write_results(
    h: Harness, env_info: dict[str, Any], table_rows: list[Row], duration: float
) -> Path:
    """bench/results/<timestamp>.json; its path."""
    result = {
        "started_at": h.started_at.isoformat(),
        "duration_s": round(duration, 1),
        **env_info,
        "config": asdict(h.cfg),
        "passthrough_env": h.passthrough,
        "payload_bytes": len(payload_bytes("c-0000000000")),
        "table": [row.as_dict() for row in table_rows],
        "figures": h.figures,
        "rss": h.rss,
        "errors": h.errors,
        "logs": str(h.outdir.relative_to(ROOT)),
    }
    json_path = BENCH_DIR / "results" / f"{h.stamp}.json"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return json_path


def print_heading(h: Harness, env_info: dict[str, Any], duration: float) -> None:
    cfg = h.cfg
    machine = env_info.get("machine", {})
    versions = env_info.get("versions", {})
    print()
    print(
        f"outbox bench {h.started_at:%Y-%m-%d %H:%M} UTC, "
        f"{machine.get('cpu_model', '?')} × {machine.get('cores', '?')} cores, "
        f"PostgreSQL {versions.get('postgres', '?')}, Python {versions.get('python', '?')}, "
        f"outbox {str(versions.get('outbox_git_sha', '?'))[:10]}"
        f"{'+dirty' if versions.get('outbox_worktree_dirty') else ''}; "
        f"{cfg.reps} repetition(s){' (BENCH_QUICK)' if cfg.quick else ''}, "
        f"{duration / 60:.1f} min"
    )
    print("median (min–max); CPU % of one core (gen = load generator, pg = all postgres)")


def print_problems(h: Harness) -> None:
    """Figures taken while something else used the CPU, and the steps that failed."""
    busy = []
    for name, fig in h.figures.items():
        others = [r["cpu"]["other"] for r in fig["runs"] if "other" in (r.get("cpu") or {})]
        if others and statistics.median(others) >= 25:
            busy.append(f"{name} {statistics.median(others):.0f}%")
    if busy:
        print(
            "\nwarning: something else used the CPU during these measurements (`other`, % of "
            "one core): " + ", ".join(busy) + ". Those figures are not comparable; re-run on "
            "an idle machine."
        )
    if h.errors:
        print("\nproblems:")
        for err in h.errors:
            print(f"  {err['step']} rep {err['rep']}: {err['error']}")


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    cfg = Config.from_env()
    h = Harness(cfg)
    h.log(f"results in {h.outdir} ({'quick, ' if cfg.quick else ''}{cfg.reps} repetition(s))")
    env_info = run_steps(h)
    table_rows = rows(h.figures, h.rss, cfg)
    duration = time.monotonic() - h.started
    table = render(table_rows)
    json_path = write_results(h, env_info, table_rows, duration)
    (h.outdir / "table.md").write_text(table + "\n")
    print_heading(h, env_info, duration)
    print(table)
    print_problems(h)
    print(f"\n{json_path.relative_to(ROOT)}; logs in {h.outdir.relative_to(ROOT)}/")
    return 1 if any(not e["error"].startswith("skipped") for e in h.errors) else 0


if __name__ == "__main__":
    sys.exit(main())
