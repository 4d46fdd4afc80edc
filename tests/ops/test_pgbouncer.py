"""PgBouncer 1.18 (Debian's) in transaction mode between outbox and PostgreSQL: a real
pgbouncer process, a real uvicorn API and a real `outbox dispatch` subprocess whose
queries go through it (OUTBOX_DB_PGBOUNCER=true) while LISTEN stays direct."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from outbox import db
from outbox.api import create_app
from outbox.settings import Settings
from outbox.store import JOB_LOCK_NAMESPACE, Store
from tests.dispatch.conftest import DispatcherProcess, ScriptedProvider
from tests.gateway.conftest import next_event, open_feed
from tests.ops.conftest import PgBouncer
from tests.support import ServerThread, wait_for

StartBouncer = Callable[..., PgBouncer]


def _stats(bouncer: PgBouncer, dbname: str) -> dict[str, Any]:
    """SHOW STATS for the test database: counters of what went through PgBouncer."""
    return next((row for row in bouncer.admin("SHOW STATS") if row["database"] == dbname), {})


def test_send_to_sent_to_event_through_pgbouncer_in_transaction_mode(
    start_pgbouncer: StartBouncer,
    start_dispatcher: Callable[..., DispatcherProcess],
    provider: tuple[ScriptedProvider, str],
    settings: Settings,
    database_url: str,
    auth: Callable[..., dict[str, str]],
    token: Callable[..., str],
) -> None:
    # Few server connections for many clients: transactions really share them.
    bouncer = start_pgbouncer(pool_size=3)
    pooled = bouncer.url()
    dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    api_settings = Settings(
        **{
            **settings.model_dump(),
            "database_url": pooled,
            "listen_database_url": database_url,
            "db_pgbouncer": True,
        }
    )
    dispatcher = start_dispatcher(
        database_url=pooled, listen_database_url=database_url, db_pgbouncer="true"
    )
    scripted, _ = provider
    with (
        ServerThread(create_app(api_settings)) as api,
        httpx.Client(base_url=api.url, timeout=10) as client,
    ):
        assert client.get("/readyz").json()["status"] == "ready"
        feed = open_feed(api, token("user-1"))
        try:
            # Enough sends that every statement runs past psycopg's prepare threshold (5).
            task_ids = []
            for n in range(8):
                reply = client.post(
                    "/api/v1/whatsapp/send/",
                    json={"to": "5511999999999", "type": "text", "text": f"hi {n}"},
                    headers=auth("user-1"),
                )
                assert reply.status_code == 202, reply.text
                task_ids.append(reply.json()["task_id"])

            def all_sent() -> bool:
                views = [
                    client.get(f"/api/v1/whatsapp/messages/{t}", headers=auth("user-1")).json()
                    for t in task_ids
                ]
                return all(view["status"] == "sent" for view in views)

            wait_for(all_sent, timeout=30, what="every message sent through pgbouncer")
            events = [next_event(feed, timeout=15) for _ in task_ids]
        finally:
            feed.close()
    assert sorted(e["data"]["message_id"] for e in events) == sorted(task_ids)
    assert {e["event"] for e in events} == {"message_sent"}
    assert {e["data"]["status"] for e in events} == {"queued"}
    assert sorted(c.task_id for c in scripted.calls) == sorted(task_ids)
    # The queries did go through PgBouncer, and nothing failed on the way.
    stats = _stats(bouncer, dbname)
    assert stats["total_xact_count"] >= 8 * 2, stats
    log = dispatcher.log()
    assert "prepared statement" not in log and '"level":"error"' not in log, log
    assert "prepared statement" not in bouncer.log.read_text()


def _twice_on_one_server_connection(url: str, kwargs: dict[str, Any]) -> None:
    """Two clients, each repeating a statement past psycopg's prepare threshold."""
    with psycopg.connect(url, **kwargs) as first, psycopg.connect(url, **kwargs) as second:
        for _ in range(8):
            first.execute("SELECT 1")
        for _ in range(8):
            second.execute("SELECT 2")


def test_without_the_setting_prepared_statements_collide_in_pgbouncer_1_18(
    start_pgbouncer: StartBouncer, settings: Settings
) -> None:
    """Why OUTBOX_DB_PGBOUNCER exists: PgBouncer 1.18 keeps no prepared statements per
    client in transaction mode, so psycopg's automatic ones (named _pg3_0, _pg3_1, … on
    every connection) meet on the shared server connection."""
    bouncer = start_pgbouncer(pool_size=1)  # one server connection: deterministic
    url = bouncer.url()
    direct = Settings(**{**settings.model_dump(), "db_pgbouncer": False})
    with pytest.raises(psycopg.errors.DuplicatePreparedStatement, match="_pg3_0"):
        _twice_on_one_server_connection(url, db.connection_kwargs(direct))
    pooled = Settings(**{**settings.model_dump(), "db_pgbouncer": True})
    assert db.connection_kwargs(pooled)["prepare_threshold"] is None
    _twice_on_one_server_connection(url, db.connection_kwargs(pooled))


def test_migrations_run_through_pgbouncer(
    start_pgbouncer: StartBouncer, empty_database_url: str
) -> None:
    """`outbox migrate` is one transaction with a transaction-scoped lock and no
    prepared statements, so even pointed at the pooler it applies every file once."""
    bouncer = start_pgbouncer(pool_size=1)
    url = psycopg.conninfo.make_conninfo(
        bouncer.url(), dbname=psycopg.conninfo.conninfo_to_dict(empty_database_url)["dbname"]
    )
    applied = db.migrate(url)
    assert len(applied) == len(db.find_migrations())
    assert db.migrate(url) == []


async def _run_that_dies(settings: Settings, session_conninfo: str) -> None:
    """A scheduled job run that dies half-way while holding the job's advisory lock."""
    pool = db.create_pool(settings)  # never opened: job_session makes its own connection
    store = Store(pool, session_conninfo=session_conninfo)
    with contextlib.suppress(RuntimeError):
        async with store.jobs.session("purge") as session:
            assert session is not None
            raise RuntimeError("the run dies")


def test_the_job_lock_is_taken_on_the_direct_connection(
    start_pgbouncer: StartBouncer, settings: Settings, database_url: str, sql_conn: Any
) -> None:
    """Closing the job's connection must release its session advisory lock; through a
    transaction pooler the server connection (and the lock) would outlive it."""
    bouncer = start_pgbouncer(pool_size=1)
    pooled = Settings(
        **{
            **settings.model_dump(),
            "database_url": bouncer.url(),
            "listen_database_url": database_url,
            "db_pgbouncer": True,
        }
    )

    def advisory_locks() -> int:
        row = sql_conn.execute(
            """SELECT count(*) FROM pg_locks
               WHERE locktype = 'advisory' AND granted
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
        ).fetchone()
        return int(row[0])

    # As `outbox dispatch` wires it (OUTBOX_LISTEN_DATABASE_URL): the lock goes with the run.
    asyncio.run(_run_that_dies(pooled, pooled.listen_database_url))
    wait_for(lambda: advisory_locks() == 0, timeout=10, what="the lock released")
    # Through the pooler instead: the lock stays on PgBouncer's server connection.
    asyncio.run(_run_that_dies(pooled, ""))
    assert advisory_locks() == 1
    held = sql_conn.execute(
        "SELECT pg_try_advisory_lock(%s, hashtext('purge'))", [JOB_LOCK_NAMESPACE]
    ).fetchone()
    assert held == (False,)
