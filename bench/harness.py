"""What every workload stands on: the run's directory and code snapshot, the database, the
environment of the processes, starting and stopping them, the time budget, recording
figures and running one step's repetitions."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from bench.common import (
    BENCH_DIR,
    ROOT,
    Proc,
    free_port,
    log_events,
    outbox_command,
    stop_all,
    summary,
    wait_http_ok,
    with_other,
)
from bench.config import Config
from bench.database import Database

SEND = "/api/v1/whatsapp/send/"
SEND_BATCH = "/api/v1/whatsapp/send/batch"
SENDERS = "/api/v1/whatsapp/senders/"

# Settings the bench owns; any other OUTBOX_* of the caller is passed through.
MANAGED = re.compile(
    r"^OUTBOX_(DATABASE_URL|LISTEN_DATABASE_URL|JWT_.*|PROVIDER.*|FAKE_.*|LOG_.*|HOST|PORT|"
    r"BENCH_.*|DISPATCHER_ID|DEV_DATA_DIR|SECRET_KEY)$"
)


class Skipped(Exception):
    """A figure that cannot be measured here (a missing tool); not an error of the bench."""


def find_pgbench() -> str | None:
    """pgbench on PATH, else the newest of the PostgreSQL packages' binaries."""
    return shutil.which("pgbench") or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)),
        None,
    )


def snapshot_code(outdir: Path) -> Path:
    """Every process runs this copy of outbox/ and sql/, taken now: edits made to the
    checkout while the bench runs (new migrations, half-saved files) cannot mix versions."""
    src = outdir / "src"
    for part in ("outbox", "sql"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    diff = subprocess.run(
        ["git", "diff", "HEAD", "--", "outbox", "sql"], cwd=ROOT, capture_output=True
    )
    (outdir / "src.diff").write_bytes(diff.stdout)  # uncommitted changes measured
    return src


class Harness:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC)
        self.stamp = self.started_at.strftime("%Y%m%d-%H%M%S")
        self.outdir = BENCH_DIR / "results" / self.stamp
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.src = snapshot_code(self.outdir)
        self.figures: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, str]] = []
        self.rss: dict[str, list[dict[str, Any]]] = {"serve": [], "dispatch": []}
        self.secret = os.urandom(24).hex()
        # Once a sender is stored (the m2_senders step), serve and dispatch need a key to
        # start: every process gets this run's own.
        self.secret_key = Fernet.generate_key().decode()
        self.passthrough = {
            k: v for k, v in os.environ.items() if k.startswith("OUTBOX_") and not MANAGED.match(k)
        }
        self.db = Database(self.stamp, self.log)
        self.token = ""
        self._admin_token = ""
        self.wrk = shutil.which("wrk")
        self.pgbench = find_pgbench()

    def log(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[bench {elapsed:6.1f}s] {text}", flush=True)

    # Set-up ---------------------------------------------------------------------------

    def setup(self) -> None:
        """The database created and migrated by this snapshot's `outbox`; a token minted."""
        self.db.create()
        migrate = self.outbox("migrate", timeout=120)
        (self.outdir / "migrate.log").write_text(migrate.stdout + migrate.stderr)
        if migrate.returncode != 0:
            raise RuntimeError(f"outbox migrate failed: {migrate.stderr.strip()[-500:]}")
        self.db.connect()
        token = self.outbox("token", "--sub", "bench", "--ttl", "2h", timeout=60)
        token.check_returncode()
        self.token = token.stdout.strip()

    def admin_token(self) -> str:
        """A token with the admin role (minted on first use: few steps need one)."""
        if not self._admin_token:
            token = self.outbox(
                "token", "--sub", "bench-admin", "--admin", "--ttl", "2h", timeout=60
            )
            token.check_returncode()
            self._admin_token = token.stdout.strip()
        return self._admin_token

    def put_sender(self, port: int, sender_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """`PUT /senders/{id}` through a `serve` listening on `port`, as an admin; its answer."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{SENDERS}{sender_id}",
            data=json.dumps(body).encode(),
            method="PUT",
            headers={
                "Authorization": f"Bearer {self.admin_token()}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
        return answer

    def teardown(self) -> None:
        self.db.drop(keep=self.cfg.keep_db)

    def outbox(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """One `outbox` command of the snapshot, to its end."""
        return subprocess.run(
            [*outbox_command(), *args],
            env=self.env(),
            cwd=self.src,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        env.update(self.passthrough)
        env.update(
            PYTHONPATH=str(self.src),
            OUTBOX_DATABASE_URL=self.db.url,
            OUTBOX_JWT_SECRET=self.secret,
            OUTBOX_SECRET_KEY=self.secret_key,
            OUTBOX_LOG_FORMAT="json",  # the level stays the default (info)
            OUTBOX_PROVIDER="fake",
            OUTBOX_FAKE_LATENCY_MS="0",
        )
        env.update(overrides)
        return env

    # Processes ------------------------------------------------------------------------

    def start_serve(self, tag: str, **overrides: str) -> tuple[Proc, int]:
        port = free_port()
        proc = Proc(
            f"serve-{tag}",
            [*outbox_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            self.env(**overrides),
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

    def start_python(self, name: str, *args: str) -> Proc:
        """`python -m <args>` of the bench's own (a helper process), logging to <name>.log."""
        return Proc(name, [sys.executable, *args], self.env(), self.outdir / f"{name}.log")

    def start_provider(self, tag: str) -> tuple[Proc, int, Path]:
        """The bench's provider server, which stamps each call's arrival in a file."""
        arrivals = self.outdir / f"{tag}-arrivals.txt"
        arrivals.unlink(missing_ok=True)
        port = free_port()
        provider = self.start_python(
            f"provider-{tag}",
            *("-m", "bench.provider_server", "--port", str(port), "--out", str(arrivals)),
        )
        wait_tcp(port, provider)
        return provider, port, arrivals

    def stop(self, proc: Proc, role: str) -> None:
        """Stops an outbox process; a `serve` or `dispatch` adds its peak RSS to its row."""
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

    def skipped(self, step: str, rep: int, reason: Any) -> None:
        """A figure left out because a tool is missing (the step goes on without it)."""
        self.errors.append({"step": step, "rep": str(rep), "error": f"skipped: {reason}"})
        self.log(f"{step}: skipped: {reason}")

    def values(self, name: str) -> list[float]:
        return list(self.figures.get(name, {}).get("values", []))

    def median(self, name: str) -> float | None:
        s = summary(self.values(name))
        return s["median"] if s else None

    # Budget and steps -----------------------------------------------------------------

    def remaining(self) -> float:
        return self.cfg.budget_s - (time.monotonic() - self.started)

    def over_budget(self, need: float = 0.0) -> bool:
        return self.remaining() < need

    def step(
        self, name: str, fn: Callable[[Harness, int], None], reps: int, need: float = 0.0
    ) -> None:
        """`need`: seconds a repetition needs at least; skipped when the budget has less."""
        for rep in range(1, reps + 1):
            if self.over_budget(need):
                self.errors.append({"step": name, "rep": str(rep), "error": "time budget spent"})
                self.log(f"{name} rep {rep}: skipped, time budget ({self.cfg.budget_s:.0f} s)")
                return
            self.log(f"{name} rep {rep}/{reps}")
            try:
                fn(self, rep)
            except Skipped as exc:
                self.skipped(name, rep, exc)
                return
            except Exception as exc:
                self.errors.append(
                    {"step": name, "rep": str(rep), "error": f"{type(exc).__name__}: {exc}"}
                )
                self.log(f"{name} rep {rep} FAILED: {type(exc).__name__}: {exc}")
                (self.outdir / f"error-{name}-{rep}.txt").write_text(traceback.format_exc())
            finally:
                stop_all()  # anything a failed step left running


# Waits ------------------------------------------------------------------------------------


def wait_tcp(port: int, proc: Proc, timeout: float = 15.0) -> None:
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


def wait_lines(path: Path, n: int, timeout: float) -> int:
    """Until the file has n lines (or the timeout); how many it has."""
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


def wait_log(proc: Proc, event: str, timeout: float) -> bool:
    """Until the process has logged `event`; whether it did in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_events(proc.log_path, event):
            return True
        time.sleep(0.1)
    return False
