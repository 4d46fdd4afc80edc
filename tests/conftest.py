"""Fixtures: a real PostgreSQL (found in DEVELOPERS.md order), a database per test cloned
from a migrated template, and a real uvicorn server running the API."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox import db
from outbox.api import create_app
from outbox.auth import mint_token
from outbox.settings import Settings
from tests.support import ServerThread

JWT_SECRET = "test-secret-that-is-long-enough-for-hs256!"
LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def _answers(conninfo: str) -> bool:
    try:
        with psycopg.connect(conninfo, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1)
            sock.connect("/var/run/docker.sock")
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A superuser connection string: env var, local server, embedded server, container."""
    explicit = os.environ.get("OUTBOX_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    if _answers(LOCAL_SERVER):
        yield LOCAL_SERVER
        return
    try:
        from pgserver import get_server
    except ImportError:
        get_server = None
    if get_server is not None:
        # One embedded server shared by every xdist worker (pgserver counts its users).
        server = get_server(
            Path(tempfile.gettempdir()) / "outbox-test-pgserver", cleanup_mode="stop"
        )
        try:
            yield server.get_uri()
        finally:
            server.cleanup()
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    pytest.exit("no PostgreSQL found: set OUTBOX_TEST_DATABASE_URL", returncode=3)


def _admin_execute(admin_url: str, statement: sql.Composable) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str, worker_id: str) -> Iterator[str]:
    """A migrated database that each test clones (CREATE DATABASE … TEMPLATE)."""
    name = f"outbox_tpl_{worker_id}_{os.getpid()}"
    _admin_execute(pg_admin_url, sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    _admin_execute(pg_admin_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db.migrate(make_conninfo(pg_admin_url, dbname=name))
    yield name
    _admin_execute(
        pg_admin_url,
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
    )


@pytest.fixture
def empty_database_url(pg_admin_url: str) -> Iterator[str]:
    """A database of its own, not migrated."""
    name = f"outbox_test_{uuid.uuid4().hex[:16]}"
    _admin_execute(pg_admin_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_conninfo(pg_admin_url, dbname=name)
    _admin_execute(
        pg_admin_url,
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
    )


@pytest.fixture
def database_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A migrated database of its own, cloned from the template."""
    name = f"outbox_test_{uuid.uuid4().hex[:16]}"
    _admin_execute(
        pg_admin_url,
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template_db)
        ),
    )
    yield make_conninfo(pg_admin_url, dbname=name)
    _admin_execute(
        pg_admin_url,
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
    )


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        jwt_secret=JWT_SECRET,
        log_format="json",
        db_pool_size=4,
    )


@pytest.fixture
def api(settings: Settings) -> Iterator[ServerThread]:
    with ServerThread(create_app(settings)) as server:
        yield server


@pytest.fixture
def client(api: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=10) as http:
        yield http


@pytest.fixture
def token() -> Callable[..., str]:
    def make(sub: str = "user-1", *, admin: bool = False, ttl: float = 3600) -> str:
        return mint_token(JWT_SECRET, sub, admin=admin, ttl=ttl)

    return make


@pytest.fixture
def auth(token: Callable[..., str]) -> Callable[..., dict[str, str]]:
    def headers(sub: str = "user-1", *, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(sub, admin=admin)}"}

    return headers


@pytest.fixture
def sql_conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn
