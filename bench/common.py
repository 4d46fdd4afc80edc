"""Shared helpers: the payload, statistics, /proc readings, and the processes we start."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# PROTOCOL.md's 201-byte payload, minus `"tenant":"acme"`: the outbox API rejects unknown
# fields (422), so the outbox body is this one (185 bytes with a 10-digit id).
TEXT = (
    "Hello! Your order #48213 has shipped and should arrive tomorrow. "
    "Track it at https://example.com/t/48213"
)
# Each message its own recipient: messages to one number are one conversation, sent one
# after another (ordered by default), which is not what the throughput workloads measure.
# 13 digits like 5511999999999, so the payload keeps its size.
_RECIPIENTS = itertools.count(1)


def recipient(k: int, area: str = "11") -> str:
    """The k-th distinct number of an area (the SQL pre-fills spell area 11's
    '5511' || lpad(k, 9, '0'))."""
    return f"55{area}{k % 10**9:09d}"


def next_recipient() -> str:
    """A number no earlier call of this process returned."""
    return recipient(next(_RECIPIENTS))


def payload(client_message_id: str) -> dict[str, Any]:
    return {
        "to": next_recipient(),
        "type": "text",
        "text": TEXT,
        "client_message_id": client_message_id,
    }


def payload_bytes(client_message_id: str) -> bytes:
    return json.dumps(payload(client_message_id), separators=(",", ":")).encode()


# Statistics ---------------------------------------------------------------------------


def pct(xs: Iterable[float], p: float) -> float:
    """Nearest-rank percentile, exactly as the peers' harness (`common.pct`) computes it."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def summary(values: list[float]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


# /proc readings -----------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # fields[0] is `state` (field 3)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (seconds); 0 if it is gone."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else 0.0


def postgres_cpu_seconds() -> float:
    """CPU time of the PostgreSQL server: every live `postgres` process, plus the children
    that the postmaster has reaped (its cutime + cstime), so that a backend that ends inside
    a measured window still counts."""
    procs: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        fields = _stat_fields(int(entry.name))
        if fields:
            procs[int(entry.name)] = fields
    ticks = 0
    for fields in procs.values():
        ticks += int(fields[11]) + int(fields[12])
        if int(fields[1]) not in procs:  # the postmaster: add its reaped children
            ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in parts[:8]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


def _status_mb(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of a live process, in MB."""
    return _status_mb(pid, "VmHWM:")


def vm_rss_mb(pid: int) -> float | None:
    """Resident set size now (VmRSS) of a live process, in MB."""
    return _status_mb(pid, "VmRSS:")


class CpuMeter:
    """CPU used by named processes (and PostgreSQL, and the machine) over a window.

    Percentages are of one core (100 % = one core busy for the whole window).
    """

    def __init__(self, pids: dict[str, list[int]], self_cpu: bool = False) -> None:
        self.pids = pids
        self.self_cpu = self_cpu
        self._all: dict[int, tuple[str, float]] = {}
        self._start = self._sample()
        self._all_start = self._all

    def _sample(self) -> dict[str, float]:
        self._all = all_processes_cpu()
        sample = {name: sum(proc_cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}
        sample["postgres"] = postgres_cpu_seconds()
        if self.self_cpu:
            sample["bench"] = time.process_time()
        busy, total = machine_cpu()
        sample["_busy"], sample["_total"] = busy, total
        sample["_wall"] = time.monotonic()
        return sample

    def stop(self) -> dict[str, Any]:
        end = self._sample()
        wall = end["_wall"] - self._start["_wall"]
        out: dict[str, Any] = {}
        for key, value in end.items():
            if not key.startswith("_"):
                out[key] = round(100 * (value - self._start[key]) / max(wall, 1e-9), 1)
        total = end["_total"] - self._start["_total"]
        if total > 0:  # whole machine, as a share of all cores
            cores = os.cpu_count() or 1
            out["machine"] = round(100 * cores * (end["_busy"] - self._start["_busy"]) / total, 1)
        # The busiest processes we did not start (to tell a test run from a kernel thread).
        ours = {pid for pids in self.pids.values() for pid in pids} | {os.getpid()}
        others = []
        for pid, (comm, cpu) in self._all.items():
            if pid in ours or comm == "postgres":
                continue
            used = cpu - self._all_start.get(pid, (comm, 0.0))[1]
            if used > 0.02 * wall:
                others.append((round(100 * used / wall), f"{comm}[{pid}]"))
        out["top_other"] = [f"{name} {share}" for share, name in sorted(others, reverse=True)[:3]]
        return out


def all_processes_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (comm, CPU seconds) of every process on the machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            found[int(entry.name)] = (comm, proc_cpu_seconds(int(entry.name)))
    return found


def with_other(cpu: dict[str, Any]) -> dict[str, Any]:
    """Adds `other`: machine CPU not used by any process we measured (something else ran)."""
    if "machine" in cpu:
        known = sum(
            v for k, v in cpu.items() if k not in ("machine", "other") and isinstance(v, float)
        )
        cpu["other"] = round(max(0.0, cpu["machine"] - known), 1)
    return cpu


# Processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def outbox_command() -> list[str]:
    """The console script: its sys.path starts with .venv/bin and then PYTHONPATH, so that a
    snapshot of the code on PYTHONPATH wins over the editable install (`python -m` would put
    the working directory first)."""
    script = Path(sys.executable).with_name("outbox")
    return [str(script)] if script.exists() else [sys.executable, "-m", "outbox"]


@dataclass
class Proc:
    """A process this bench started; stopped by its own pid only."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path = ROOT
    popen: subprocess.Popen[bytes] = field(init=False)
    peak_rss_mb: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            self.popen = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # a Ctrl-C on the bench does not hit it first
            )
        finally:
            log.close()
        RUNNING.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def read_peak_rss(self) -> float | None:
        peak = vm_hwm_mb(self.pid)
        if peak is not None:
            self.peak_rss_mb = peak
        return self.peak_rss_mb

    def stop(self, grace: float = 20.0) -> int | None:
        if self.alive():
            self.read_peak_rss()
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self in RUNNING:
            RUNNING.remove(self)
        return self.popen.returncode


RUNNING: list[Proc] = []


def stop_all() -> None:
    for proc in list(RUNNING):
        proc.stop(grace=10)


def wait_http_ok(url: str, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited early (status {proc.popen.returncode}), see {proc.log_path}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name}: {url} did not answer within {timeout:.0f} s")


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of one file whose `event` is `event`."""
    found: list[dict[str, Any]] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        if f'"{event}"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


def wait_ready(procs: list[Proc], timeout: float = 60.0) -> list[float]:
    """Epoch times of each dispatcher's `ready` log line (its `timestamp`)."""
    deadline = time.monotonic() + timeout
    while True:
        times = []
        for proc in procs:
            events = log_events(proc.log_path, "ready")
            if events:
                times.append(datetime.fromisoformat(events[0]["timestamp"]).timestamp())
            elif not proc.alive():
                raise RuntimeError(f"{proc.name} exited before `ready`, see {proc.log_path}")
        if len(times) == len(procs):
            return times
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(times)}/{len(procs)} dispatchers logged `ready`")
        time.sleep(0.01)


def tool_version(args: list[str]) -> str | None:
    if shutil.which(args[0]) is None and not Path(args[0]).exists():
        return None
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None
