"""A PostgreSQL cluster of a test's own, for what the shared server must never suffer
(stopping it, crashing it, unusual settings): the local binaries in a temporary
directory, on a free port, trust authentication.

initdb and pg_ctl refuse to run as root: as root, they run as the `postgres` user.

    from tests.private_pg import private_cluster  # noqa: F401  (the fixture)

    def test_x(private_cluster: PrivateCluster) -> None:
        url = private_cluster.create_database("outbox")
        private_cluster.stop()  # immediate: a crash, as far as clients can tell
        private_cluster.start()
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

PG_BIN = Path(os.environ.get("OUTBOX_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_cluster_owner() -> tuple[list[str], int | None, int | None]:
    """The command prefix (and owner ids) to run the server binaries as non-root."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres user to own a cluster")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser to start a cluster as postgres")
    return [runuser, "-u", "postgres", "--"], owner.pw_uid, owner.pw_gid


class PrivateCluster:
    """One initdb'd cluster; `start`, `stop` and `start` again keep its data and port."""

    def __init__(self, base: Path, options: str = "") -> None:
        self._prefix, uid, gid = _as_cluster_owner()
        self.base = base
        if uid is not None and gid is not None:
            os.chown(base, uid, gid)
        self.data = base / "data"
        self.port = _free_port()
        self.options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={base} "
            + options
        )
        self.running = False
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._prefix, *args], check=True, capture_output=True, timeout=120)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        log = str(self.base / "log")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", self.options,
                  "-w", "start")  # fmt: skip
        self.running = True

    def stop(self, mode: str = "immediate") -> None:
        """`immediate`: every backend killed at once, no checkpoint (a crash for clients)."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        path = self.base / "log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def private_cluster() -> Iterator[PrivateCluster]:
    """A started cluster of this test's own, stopped and removed at the end."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL binaries in {PG_BIN} (set OUTBOX_TEST_PG_BIN)")
    base = Path(tempfile.mkdtemp(prefix="outbox-private-pg-"))
    try:
        cluster = PrivateCluster(base)
        cluster.start()
        try:
            yield cluster
        finally:
            if cluster.running:
                cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
