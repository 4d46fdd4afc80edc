"""`outbox migrate`: in order, once, under an advisory lock; readyz follows the schema."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import psycopg
from psycopg.types.json import Jsonb

from outbox import db
from outbox.store import QUERIES
from tests.integration.conftest import ClientFactory
from tests.support import wait_for


def versions(conninfo: str) -> list[tuple[int, str]]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT version, name FROM outbox.schema_migrations ORDER BY 1")
        return [(int(v), str(n)) for v, n in rows.fetchall()]


def expected_versions() -> list[tuple[int, str]]:
    return [(m.version, m.name) for m in db.find_migrations()]


def schema_snapshot(conninfo: str) -> list[tuple[str, ...]]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            """SELECT c.relname, c.relkind::text, a.attname, format_type(a.atttypid, a.atttypmod)
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'outbox'
               LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
               ORDER BY 1, 3"""
        ).fetchall()
    return [tuple(str(value) for value in row) for row in rows]


def test_migrate_applies_every_file_once_and_a_second_run_is_a_no_op(
    empty_database_url: str,
) -> None:
    applied = db.migrate(empty_database_url)
    assert applied == [name for _, name in expected_versions()]
    assert versions(empty_database_url) == expected_versions()
    before = schema_snapshot(empty_database_url)
    assert any(row[0] == "messages" for row in before)
    with psycopg.connect(empty_database_url) as conn:
        stamps = conn.execute("SELECT applied_at FROM outbox.schema_migrations").fetchall()
    assert db.migrate(empty_database_url) == []
    assert versions(empty_database_url) == expected_versions()
    assert schema_snapshot(empty_database_url) == before
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT applied_at FROM outbox.schema_migrations").fetchall() == stamps


def test_the_schema_has_what_the_issue_asks_for(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        indexes = dict(
            conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'outbox'"
            ).fetchall()
        )
        event_id = conn.execute(
            """SELECT data_type, column_default FROM information_schema.columns
               WHERE table_schema = 'outbox' AND table_name = 'events' AND column_name = 'id'"""
        ).fetchone()
    unique = [d for d in indexes.values() if "UNIQUE" in d and "client_message_id" in d]
    assert len(unique) == 1 and "user_id" in unique[0] and "IS NOT NULL" in unique[0]
    assert any("next_attempt_at" in d and "'pending'" in d for d in indexes.values())
    assert event_id is not None and event_id[0] == "bigint" and "nextval" in str(event_id[1])


def migrate_before(conninfo: str, version: int) -> None:
    """Apply the migrations older than `version`, as `outbox migrate` would have then."""
    with psycopg.connect(conninfo, autocommit=True) as conn, conn.transaction():
        conn.execute(QUERIES["create_schema"])
        conn.execute(QUERIES["create_schema_migrations"])
        for migration in db.find_migrations():
            if migration.version >= version:
                break
            conn.execute(migration.path.read_text())
            conn.execute(
                QUERIES["record_migration"],
                {"version": migration.version, "name": migration.name},
            )


def test_the_sender_limits_migration_keeps_each_senders_pause_and_limit(
    empty_database_url: str,
) -> None:
    # Pauses and limits stored before the senders' state existed carry over to it, and
    # `default` gets a state of its own (it can be paused since).
    migrate_before(empty_database_url, 16)
    paused = {"reason": "by hand", "code": None, "since": "2026-01-01T00:00:00Z"}
    paused |= {"until": None, "manual": True}
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO outbox.senders (id, provider, users, rate_limit, paused)
               VALUES ('gw-a', 'fake', '{*}', 20, %s), ('gw-b', 'fake', '{*}', NULL, NULL)""",
            [Jsonb(paused)],
        )
    assert "016_sender_limits" in db.migrate(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        states = conn.execute(
            "SELECT id, rate_limit, paused FROM outbox.sender_state ORDER BY id"
        ).fetchall()
        columns = conn.execute(
            """SELECT column_name FROM information_schema.columns
               WHERE table_schema = 'outbox' AND table_name = 'senders'"""
        ).fetchall()
    assert states == [("default", None, None), ("gw-a", 20.0, paused), ("gw-b", None, None)]
    assert ("paused",) not in columns  # one place for a pause: the state


def test_two_processes_migrating_at_once_apply_each_file_once(empty_database_url: str) -> None:
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": empty_database_url,
        "OUTBOX_LOG_FORMAT": "json",
    }
    env.pop("OUTBOX_LISTEN_DATABASE_URL", None)
    command = [sys.executable, "-m", "outbox", "migrate"]
    # Hold the migration lock so that both processes start and queue behind it, then
    # let them go together: a real race, not two runs one after the other.
    with psycopg.connect(empty_database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [db.MIGRATION_LOCK_KEY])
        procs = [
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        try:

            def both_waiting() -> bool:
                row = holder.execute(
                    """SELECT count(*) FROM pg_locks
                       WHERE locktype = 'advisory' AND NOT granted AND database =
                             (SELECT oid FROM pg_database WHERE datname = current_database())"""
                ).fetchone()
                if any(p.poll() is not None for p in procs):
                    raise AssertionError("a migrate process ended before the lock was free")
                return row is not None and row[0] == 2

            wait_for(both_waiting, timeout=30, what="both migrations to wait on the lock")
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", [db.MIGRATION_LOCK_KEY])
        outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    assert versions(empty_database_url) == expected_versions()
    # Exactly one of them applied the files; the other found nothing to do.
    applied = sorted(err.decode().count("001_") for _, err in outputs)
    assert applied[0] == 0 and applied[1] >= 1, outputs


def test_readyz_is_503_before_migrate_and_200_after(
    client_with: ClientFactory, empty_database_url: str
) -> None:
    with client_with(database_url=empty_database_url) as http:
        before = http.get("/readyz")
        assert before.status_code == 503, before.text
        assert before.json()["error"]["code"] == "unavailable"
        assert before.headers["retry-after"]
        assert http.get("/healthz").status_code == 200
        db.migrate(empty_database_url)
        after = http.get("/readyz")
        assert after.status_code == 200, after.text
        assert after.json()["schema_version"] == db.latest_version()


def test_readyz_is_503_when_the_schema_is_behind(
    client_with: ClientFactory, database_url: str
) -> None:
    with client_with() as http:
        assert http.get("/readyz").status_code == 200
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "DELETE FROM outbox.schema_migrations WHERE version = %s", [db.latest_version()]
            )
        behind = http.get("/readyz")
        assert behind.status_code == 503, behind.text
        assert "migrate" in behind.json()["error"]["message"]


def test_readyz_stays_200_when_the_schema_is_ahead(
    client_with: ClientFactory, database_url: str
) -> None:
    """Old processes stay ready after `outbox migrate` ran for newer code."""
    with client_with() as http:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO outbox.schema_migrations (version, name) VALUES (%s, 'future')",
                [db.latest_version() + 1],
            )
        ahead = http.get("/readyz")
        assert ahead.status_code == 200, ahead.text
        assert ahead.json()["schema_version"] == db.latest_version() + 1


def test_readyz_answers_200_on_a_migrated_database(client: httpx.Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "schema_version": db.latest_version()}
