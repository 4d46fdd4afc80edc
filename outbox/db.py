"""Connections: the async pool, and the migration runner (whose statements are named
queries of sql/queries.sql too)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg.rows import scalar_row
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from outbox.settings import SQL_DIR, Settings
from outbox.store.database import QUERIES

# Every process that migrates takes this transaction-scoped advisory lock first,
# so two `outbox migrate` at once apply each file exactly once.
MIGRATION_LOCK_KEY = 0x6F7574626F78  # "outbox"

_MIGRATION_NAME = re.compile(r"^(\d+)_[\w-]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def find_migrations(directory: Path = SQL_DIR / "migrations") -> list[Migration]:
    found = []
    for path in directory.iterdir():
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), path.stem, path))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migration files share a version number in {directory}")
    return found


def latest_version() -> int:
    return find_migrations()[-1].version


def migrate(conninfo: str) -> list[str]:
    """Apply the missing migrations in order, in one transaction; return their names."""
    applied_now: list[str] = []
    # Never prepared, so the runner works through a transaction pooler too; the lock is
    # transaction-scoped and everything runs in one transaction (one server connection).
    with (
        psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as conn,
        conn.transaction(),
    ):
        conn.execute(QUERIES["migration_lock"], {"key": MIGRATION_LOCK_KEY})
        conn.execute(QUERIES["create_schema"])
        conn.execute(QUERIES["create_schema_migrations"])
        cursor = conn.cursor(row_factory=scalar_row)
        applied = set(cursor.execute(QUERIES["applied_migrations"]).fetchall())
        for migration in find_migrations():
            if migration.version in applied:
                continue
            conn.execute(migration.path.read_text())
            conn.execute(
                QUERIES["record_migration"],
                {"version": migration.version, "name": migration.name},
            )
            applied_now.append(migration.name)
    return applied_now


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """psycopg.connect() arguments for connections to OUTBOX_DATABASE_URL."""
    kwargs: dict[str, Any] = {"autocommit": True}
    if settings.db_pgbouncer:
        # A transaction pooler hands each transaction any server connection: a statement
        # prepared on one is missing (or already exists) on the next one.
        kwargs["prepare_threshold"] = None
    return kwargs


def create_pool(settings: Settings, *, min_size: int = 1) -> AsyncConnectionPool:
    """An autocommit pool, opened by the caller (`await pool.open()`)."""
    return AsyncConnectionPool(
        settings.database_url,
        min_size=min(min_size, settings.db_pool_size),
        max_size=settings.db_pool_size,
        timeout=settings.db_pool_timeout,
        kwargs=connection_kwargs(settings),
        configure=_configure_connection,
        open=False,
        name="outbox",
    )


async def _configure_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    # orjson reads and writes json/jsonb several times faster than the json module.
    set_json_loads(orjson.loads, conn)
    set_json_dumps(orjson.dumps, conn)


class PgCronUnavailable(Exception):
    """pg_cron is not installed, not preloaded, or not usable in this database."""


def register_pg_cron(conninfo: str, *, job_name: str, schedule: str, command: str) -> int:
    """Create the pg_cron extension if needed and (re)register the job; return its id.

    pg_cron runs jobs in the database named by its `cron.database_name` setting, which
    must be this one (that is where its `cron.job` table lives)."""
    with psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as conn:
        cursor = conn.cursor(row_factory=scalar_row)
        if not cursor.execute(QUERIES["pg_cron_available"]).fetchone():
            raise PgCronUnavailable(
                "the pg_cron extension is not installed on the server "
                "(e.g. the Debian package postgresql-15-cron)"
            )
        try:
            conn.execute(QUERIES["create_pg_cron"])
            params = {"name": job_name, "schedule": schedule, "command": command}
            job_id = cursor.execute(QUERIES["pg_cron_schedule"], params).fetchone()
        except psycopg.Error as exc:
            message = (exc.diag.message_primary or str(exc)).strip()
            hint = f" ({exc.diag.message_hint})" if exc.diag.message_hint else ""
            raise PgCronUnavailable(
                f"pg_cron cannot be used in this database: {message}{hint}; it needs "
                "shared_preload_libraries = 'pg_cron' and cron.database_name set to "
                "this database"
            ) from exc
    assert job_id is not None
    return int(job_id)
