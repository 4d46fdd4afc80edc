"""`make fuzz`: schemathesis against a real `outbox serve` on a fresh database.

Every phase (examples, coverage, fuzzing, stateful) and every check, as a user and as an
admin, from the published /openapi.json; prints the totals and exits 1 on any failure,
any 5xx, or fewer than 20 % of the generated sends answered 202.

FUZZ_EXAMPLES (cases per operation and phase, default 100) and FUZZ_SEED (default 1)
tune the run; OUTBOX_TEST_DATABASE_URL names the PostgreSQL server (default: the local
one on 127.0.0.1:5432), where a database of its own is made and dropped.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg
from cryptography.fernet import Fernet
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox import db
from outbox.auth import mint_token
from tests.fuzz.runner import run
from tests.support import wait_for

MIN_ACCEPTED_SENDS = 0.20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _admin(admin_url: str, statement: sql.Composable) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(statement)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> int:
    admin_url = os.environ.get(
        "OUTBOX_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    examples = int(os.environ.get("FUZZ_EXAMPLES", "100"))
    seed = int(os.environ.get("FUZZ_SEED", "1"))
    name = f"outbox_fuzz_{uuid.uuid4().hex[:12]}"
    secret = secrets.token_urlsafe(32)
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="outbox-fuzz-"))
    _admin(admin_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    database_url = make_conninfo(admin_url, dbname=name)
    serve: subprocess.Popen[bytes] | None = None
    try:
        db.migrate(database_url)
        env = {key: value for key, value in os.environ.items() if not key.startswith("OUTBOX_")}
        env.update(
            OUTBOX_DATABASE_URL=database_url,
            OUTBOX_JWT_SECRET=secret,
            OUTBOX_PORT=str(port),
            OUTBOX_LOG_FORMAT="json",
            OUTBOX_SECRET_KEY=Fernet.generate_key().decode(),  # senders can be stored
        )
        with (workdir / "serve.log").open("wb") as log:
            serve = subprocess.Popen(
                [sys.executable, "-m", "outbox", "serve"], env=env, stdout=log, stderr=log
            )
        base_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(f"{base_url}/readyz"), timeout=30, what="outbox serve ready")
        identities = {
            "user": mint_token(secret, "fuzz-user", ttl=24 * 3600),
            "admin": mint_token(secret, "fuzz-admin", admin=True, ttl=24 * 3600),
        }
        started = time.monotonic()
        totals = run(
            base_url,
            identities,
            max_examples=examples,
            seed=seed,
            phases="examples,coverage,fuzzing,stateful",
            workdir=workdir,
            timeout=3600,
        )
        elapsed = time.monotonic() - started
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(timeout=30)
        _admin(
            admin_url,
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
        )
    print(totals.summary())
    accepted, sends = totals.sends()
    server_errors = sum(n for status, n in totals.statuses().items() if status and status >= 500)
    ok = not totals.failures and not server_errors and accepted >= MIN_ACCEPTED_SENDS * sends
    print(f"seed {seed}, {examples} examples per operation and phase, {elapsed:.0f} s")
    if ok:
        shutil.rmtree(workdir)
        print("fuzz: OK")
        return 0
    print(f"fuzz: FAILED (the reports and the server's log are in {workdir})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
