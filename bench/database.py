"""The bench's database: a fresh one on the local PostgreSQL (or the given one, emptied
before each workload), the bench's own connection to it, and the chores between runs."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql as pgsql

from bench import sql

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


class Database:
    def __init__(self, stamp: str, log: Callable[[str], None]) -> None:
        self.stamp = stamp
        self.log = log
        self.created: str | None = None  # the name of a database this bench created
        self.admin_url = ""
        self.url = ""
        self.conn: psycopg.Connection[Any] | None = None
        self._columns: set[str] | None = None

    def create(self) -> str:
        """OUTBOX_BENCH_DATABASE_URL, or a new database named after the run; its URL."""
        given = os.environ.get("OUTBOX_BENCH_DATABASE_URL", "")
        if given:
            self.url = given
            self.log("OUTBOX_BENCH_DATABASE_URL given: its outbox tables are emptied (TRUNCATE)")
        else:
            name = f"outbox_bench_{self.stamp.replace('-', '_')}"
            self.admin_url = DEFAULT_SERVER
            with psycopg.connect(self.admin_url, autocommit=True) as admin:
                admin.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
            self.created = name
            self.url = DEFAULT_SERVER.rsplit("/", 1)[0] + "/" + name
        self.log(f"database {self.url}")
        return self.url

    def connect(self) -> None:
        """The bench's own connection (once migrated), with its helpers in schema `bench`."""
        self.conn = psycopg.connect(self.url, autocommit=True)
        self.conn.execute(sql.HELPERS)

    def drop(self, keep: bool) -> None:
        """Closes the connection; drops the database this bench created unless `keep`
        (a given database only loses schema `bench`)."""
        if self.conn is not None:
            if not self.created:
                with contextlib.suppress(psycopg.Error):
                    self.conn.execute("DROP SCHEMA IF EXISTS bench CASCADE")
            self.conn.close()
            self.conn = None
        if self.created and not keep:
            with psycopg.connect(self.admin_url, autocommit=True) as admin:
                admin.execute(
                    pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        pgsql.Identifier(self.created)
                    )
                )
            self.log(f"dropped database {self.created}")

    def q(self, query: Any, params: Any = None) -> Any:
        assert self.conn is not None
        return self.conn.execute(query, params)

    def scalar(self, query: Any, params: Any = None) -> Any:
        row = self.q(query, params).fetchone()
        return row[0] if row else None

    def has_column(self, name: str) -> bool:
        """Whether outbox.messages has this column: the bench also measures commits from
        before the order and priority columns (bench/README.md)."""
        if self._columns is None:
            rows = self.q(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'outbox' AND table_name = 'messages'"
            ).fetchall()
            self._columns = {name for (name,) in rows}
        return name in self._columns

    def count_messages(self) -> int:
        return int(self.scalar("SELECT count(*) FROM outbox.messages"))

    def reset(self) -> None:
        self.q(sql.TRUNCATE)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until no row arrives for 0.3 s: requests that wrk left in flight when it
        stopped still commit, and must not land after the next TRUNCATE."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            count = self.count_messages()
            if count == last:
                return
            last = count
            time.sleep(0.3)

    def vacuum(self) -> None:
        for statement in sql.VACUUM:
            self.q(statement)

    def checkpoint(self) -> None:
        self.q("CHECKPOINT")
