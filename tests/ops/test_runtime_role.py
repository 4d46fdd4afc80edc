"""compose.yaml's runtime role (deploy/runtime-role.sql) on a real PostgreSQL: `serve`,
`dispatch` and `purge` do all their work as it, and it can change no schema."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox import db
from outbox.auth import mint_token
from tests.conftest import JWT_SECRET
from tests.e2e.conftest import OUTBOX, Process, clean_env, free_port
from tests.support import wait_for

ROLE_SQL = Path(__file__).resolve().parents[2] / "deploy" / "runtime-role.sql"
SEND = "/api/v1/whatsapp/send/"


@pytest.fixture
def app_role(pg_admin_url: str) -> Iterator[str]:
    """A role name of this test's own; dropped after the test's database (which holds its
    grants) is gone, so request it before the database."""
    name = f"outbox_app_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_serve_dispatch_and_purge_work_as_the_runtime_role_which_changes_no_schema(
    app_role: str, empty_database_url: str
) -> None:
    created = subprocess.run(
        ["psql", "-X", "-q", "-d", empty_database_url, "-v", f"app_role={app_role}",
         "-v", "app_password=not-checked-by-trust-auth", "-f", str(ROLE_SQL)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    db.migrate(empty_database_url)  # as the owner, after the role: default privileges apply
    as_app = make_conninfo(empty_database_url, user=app_role)

    port = free_port()
    env = clean_env(
        OUTBOX_DATABASE_URL=as_app,
        OUTBOX_JWT_SECRET=JWT_SECRET,
        OUTBOX_PORT=str(port),
        OUTBOX_LOG_FORMAT="json",
        OUTBOX_METRICS_PORT="0",
        OUTBOX_PROVIDER="fake",
    )
    processes = [Process(["serve"], env), Process(["dispatch"], env)]
    try:
        dispatcher = processes[1]
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {mint_token(JWT_SECRET, 'user-1')}"}

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=30, what="serve ready as the runtime role")
        with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
            sent = http.post(SEND, json={"to": "5511999999999", "type": "text", "text": "hi"})
            assert sent.status_code == 202, sent.text
            task_id = sent.json()["task_id"]
            wait_for(
                lambda: http.get(f"/api/v1/whatsapp/messages/{task_id}").json()["status"] == "sent",
                timeout=30,
                what="the message sent by a dispatcher running as the runtime role",
            )
            tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
            later = http.post(SEND, json={"to": "5511999999999", "type": "text", "text": "x",
                                          "send_at": tomorrow})  # fmt: skip
            assert later.status_code == 202, later.text
            cancelled = http.delete(f"/api/v1/whatsapp/messages/{later.json()['task_id']}")
            assert cancelled.status_code == 200, cancelled.text
        purged = subprocess.run(
            [*OUTBOX, "purge"], env=clean_env(OUTBOX_DATABASE_URL=as_app), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert purged.returncode == 0, purged.stderr
        assert dispatcher.popen.poll() is None, "\n".join(dispatcher.stderr)
    finally:
        for process in processes:
            process.kill()

    with psycopg.connect(as_app, autocommit=True) as conn:
        for statement in (
            "CREATE TABLE outbox.intruder (id int)",
            "DROP TABLE outbox.messages",
            "ALTER TABLE outbox.messages ADD COLUMN intruder int",
            "TRUNCATE outbox.messages",
            "CREATE TABLE public.intruder (id int)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]
