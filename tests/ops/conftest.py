"""Tools the ops tests need (Debian's pgbouncer and docker-compose), and a real PgBouncer
in transaction mode on a free port in front of the test's database."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

# The dispatcher tests' fixtures (a scripted provider, real `outbox dispatch` processes).
from tests.dispatch.conftest import dispatcher_env, provider, start_dispatcher  # noqa: F401
from tests.e2e.conftest import free_port
from tests.support import wait_for


def need(tool: str) -> str:
    """The tool's path; skip without it, except on CI (`CI` set), where .ci/run installs it."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path:
        return path
    reason = f"{tool} is not installed (Debian package: apt-get install {tool})"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run should have installed it")
    pytest.skip(reason)


class PgBouncer:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path, target: str) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self._target = target

    def url(self) -> str:
        """The test database's conninfo, through PgBouncer."""
        return make_conninfo(self._target, host="127.0.0.1", port=str(self.port))

    def admin(self, command: LiteralString) -> list[dict[str, Any]]:
        """A command on PgBouncer's admin console (which speaks only the simple query
        protocol: a client-side cursor)."""
        url = make_conninfo(self.url(), dbname="pgbouncer")
        with psycopg.connect(url, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
            cursor = conn.cursor(row_factory=dict_row)
            return cursor.execute(command).fetchall()


def _ini(target: dict[str, str | int | None], port: int, userlist: Path, pool_size: int) -> str:
    host, server_port = target.get("host") or "127.0.0.1", target.get("port") or 5432
    user = target.get("user") or "postgres"
    return f"""[databases]
* = host={host} port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {userlist}
admin_users = {user}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 200
ignore_startup_parameters = extra_float_digits,options
"""


@pytest.fixture
def start_pgbouncer(database_url: str, tmp_path: Path) -> Iterator[Callable[..., PgBouncer]]:
    """`start_pgbouncer(pool_size=N)`: a pgbouncer process, stopped at the end."""
    binary = need("pgbouncer")
    started: list[subprocess.Popen[bytes]] = []

    def start(pool_size: int = 10) -> PgBouncer:
        target = conninfo_to_dict(database_url)
        port = free_port()
        directory = tmp_path / f"pgbouncer-{len(started) + 1}"
        directory.mkdir()
        userlist = directory / "userlist.txt"
        userlist.write_text(f'"{target.get("user") or "postgres"}" ""\n')
        ini = directory / "pgbouncer.ini"
        ini.write_text(_ini(target, port, userlist, pool_size))
        # PgBouncer refuses to run as root; -u drops to an unprivileged user after it
        # has read its files and bound the port.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        log = directory / "pgbouncer.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([binary, *user, str(ini)], stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        bouncer = PgBouncer(proc, port, log, database_url)

        def answers() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                with psycopg.connect(bouncer.url(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                return False

        wait_for(answers, timeout=15, what="pgbouncer answering")
        return bouncer

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
