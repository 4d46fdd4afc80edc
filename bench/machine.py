"""What a run was measured on: the machine, the versions of everything involved, and the
PostgreSQL server's settings; recorded in the results JSON and the table's heading."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import ROOT, tool_version
from bench.database import Database
from bench.harness import Harness

PG_SETTINGS = (
    "server_version",
    "autovacuum",
    "synchronous_commit",
    "fsync",
    "shared_buffers",
    "max_connections",
    "max_wal_size",
    "checkpoint_timeout",
)
PACKAGES = ("uvicorn", "starlette", "psycopg", "uvloop", "httptools", "orjson")


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip()


def _machine() -> dict[str, Any]:
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
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "memory_mb": mem_kb // 1024,
        "kernel": platform.release(),
        "hostname": socket.gethostname(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _postgres(db: Database) -> dict[str, Any]:
    """The server's version and settings, and the sessions busy on other databases."""
    pg: dict[str, Any] = {}
    if db.conn is None:
        return pg
    pg["version"] = db.scalar("SELECT version()")
    for setting in PG_SETTINGS:
        pg[setting] = db.scalar(
            "SELECT setting || coalesce(' ' || unit, '') FROM pg_settings WHERE name = %s",
            (setting,),
        )
    pg["other_sessions_at_start"] = db.q(
        "SELECT datname, state, count(*) FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
        "AND datname IS DISTINCT FROM current_database() GROUP BY 1, 2"
    ).fetchall()
    return pg


def _packages() -> dict[str, str | None]:
    packages: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            packages[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            packages[package] = None
    return packages


def environment(h: Harness) -> dict[str, Any]:
    pg = _postgres(h.db)
    dirty = _git("status", "--porcelain", "--", "outbox", "sql", "pyproject.toml")
    return {
        "machine": _machine(),
        "versions": {
            "python": platform.python_version(),
            "postgres": pg.get("server_version"),
            "outbox_git_sha": _git("rev-parse", "HEAD"),
            "outbox_worktree_dirty": bool(dirty),
            "outbox_dirty_files": dirty.splitlines(),
            "code_snapshot": str(h.src.relative_to(ROOT)),
            "pgbench": tool_version([h.pgbench, "--version"]) if h.pgbench else None,
            "wrk": tool_version([h.wrk, "-v"]) if h.wrk else None,
            "packages": _packages(),
        },
        "postgres": pg,
    }
