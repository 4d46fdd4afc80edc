"""`outbox dev`: every role in one process, on an embedded PostgreSQL unless a database is given."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shlex
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbox import db, process
from outbox.auth import mint_token
from outbox.log import configure_logging, get_logger
from outbox.settings import Settings

log = get_logger("outbox.dev")


def dev_jwt_secret(data_dir: Path, *, create: bool = True) -> str:
    """The dev signing secret, kept beside the embedded data so tokens survive restarts."""
    path = data_dir / "jwt-secret"
    if path.exists():
        return path.read_text().strip()
    if not create:
        return ""
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(secrets.token_urlsafe(32))
    path.chmod(0o600)
    return path.read_text().strip()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def forget_dead_handles(pgdata: Path) -> None:
    """pgserver stops the server when the last process that holds it lets go, counting
    them in a file: a process killed with SIGKILL stays listed, and the server would then
    outlive every later `outbox dev`. Keep only the processes still alive."""
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


@contextlib.contextmanager
def embedded_postgres(data_dir: Path, *, announce: bool = True) -> Iterator[str]:
    """Start (or join) the embedded server under <data_dir>/pg; on exit, stop it unless
    another process still uses it."""
    from pgserver import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    forget_dead_handles(data_dir / "pg")
    server = get_server(data_dir / "pg", cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        if announce:
            print("outbox dev: embedded PostgreSQL stopped", flush=True)


def without_password(conninfo: str) -> str:
    """A connection string fit to print: its password, if any, replaced by `***`."""
    if "://" not in conninfo:
        if "password" not in conninfo_to_dict(conninfo):
            return conninfo
        return make_conninfo(conninfo, password="***")
    parts = urlsplit(conninfo)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not parts.password and not any(k == "password" for k, _ in query):
        return conninfo  # none to hide (the embedded server's `postgres:@` has none)
    netloc = parts.netloc
    if parts.password:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = [(k, "***" if k == "password" else v) for k, v in query]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*/")))


def _banner(settings: Settings, token: str) -> str:
    base = f"http://{settings.host}:{settings.port}"
    body = '{"to": "5511999999999", "type": "text", "text": "Hello from outbox"}'
    curl = (
        f"curl -sS -X POST {base}/api/v1/whatsapp/send/ -H 'Content-Type: application/json' "
        f"-H 'Authorization: Bearer {token}' -d {shlex.quote(body)}"
    )
    return "\n".join(
        [
            "",
            f"outbox dev is serving on {base}  (Ctrl-C stops everything)",
            f"database: {without_password(settings.database_url)}",
            "",
            "dev token (user dev-user, admin, 24 h):",
            f"  {token}",
            "",
            f"dashboard (paste the token): {base}/dashboard",
            "",
            "send a message:",
            f"  {curl}",
            "",
        ]
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # as Ctrl-C: the embedded database is stopped on the way out


def run_dev(settings: Settings, sockets: list[socket.socket]) -> None:
    """Every role in one process on `sockets` (bound already: outbox/bind.py)."""
    configure_logging(settings)
    # SIGTERM during start-up (the embedded database starting, migrations) unwinds like
    # Ctrl-C; once serving, the event loop's handlers take over.
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.ExitStack() as stack:
        if not settings.database_url:
            settings.database_url = stack.enter_context(embedded_postgres(settings.dev_data_dir))
            settings.listen_database_url = settings.database_url
        if not settings.jwt_secret and not settings.jwt_public_key:
            settings.jwt_secret = dev_jwt_secret(settings.dev_data_dir)
        db.migrate(settings.database_url)
        banner = None
        if settings.jwt_secret:
            token = mint_token(
                settings.jwt_secret,
                "dev-user",
                admin=True,
                ttl=86400,
                role_claim=settings.jwt_admin_claim,
                admin_value=settings.jwt_admin_value,
            )
            banner = _banner(settings, token)
        # Printed once this process's own sockets accept connections, so its curl works.
        announce = None if banner is None else functools.partial(print, banner, flush=True)
        process.run(process.serve(settings, sockets, with_dispatcher=True, on_started=announce))
