"""Running `wrk` with wrk_post.lua for a fixed number of requests (not a fixed duration)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

LUA = Path(__file__).resolve().parent / "wrk_post.lua"


def run_wrk(
    wrk: str,
    url: str,
    token: str,
    *,
    per_thread: int,
    threads: int,
    connections: int,
    out_path: Path,
    max_seconds: int,
) -> tuple[dict[str, Any], float, float]:
    """(wrk's JSON summary, wrk's own CPU seconds, wall seconds) for threads × per_thread
    POSTs over `connections` keep-alive connections."""
    marks = out_path.with_suffix(".d")
    marks.mkdir(parents=True, exist_ok=True)
    for old in marks.iterdir():
        old.unlink()
    args = [
        wrk,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max_seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(LUA),
        url,
        "--",
        token,
        str(per_thread),
        str(marks),
    ]
    with open(out_path, "w") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=LUA.parent)
        # wrk's main thread sleeps for -d whatever its threads do: once every thread has
        # sent its share, a SIGINT ends that sleep and wrk reports (a few ms late at most).
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if len(list(marks.iterdir())) >= threads:
                proc.send_signal(signal.SIGINT)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
    text = out_path.read_text()
    match = re.search(r"^BENCH_JSON (.*)$", text, re.M)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({proc.returncode}), see {out_path}")
    return json.loads(match.group(1)), usage.ru_utime + usage.ru_stime, wall
