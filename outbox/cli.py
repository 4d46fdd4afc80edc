"""The `outbox` command: serve, dispatch, migrate, purge, status, token, dev."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from pydantic import ValidationError

from outbox import db
from outbox.auth import mint_token
from outbox.log import configure_logging, flush_logs, get_logger
from outbox.settings import Settings, describe_error, parse_duration
from outbox.store import PurgeCounts, SenderStatus, StatusSummary


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


class StartError(Exception):
    """The process could not start (its address in use, say), or stopped on a failure it
    logged: one line, exit status 1."""


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise UsageError(describe_error(exc)) from exc


def _require_database(settings: Settings) -> None:
    if not settings.database_url:
        raise UsageError("OUTBOX_DATABASE_URL is required (or use `outbox dev`)")


@contextlib.contextmanager
def _database_or_dev(settings: Settings) -> Iterator[None]:
    """OUTBOX_DATABASE_URL, else the embedded database of `outbox dev` (`make run`) when
    one exists: joined while it runs, started and stopped again when it does not."""
    if settings.database_url or not (settings.dev_data_dir / "pg").is_dir():
        _require_database(settings)
        yield
        return
    from outbox.dev import embedded_postgres

    with embedded_postgres(settings.dev_data_dir, announce=False) as url:
        settings.database_url = settings.listen_database_url = url
        yield


def _check_secret_key(settings: Settings) -> None:
    """Once any sender is stored, OUTBOX_SECRET_KEY must be set and decrypt every stored
    credential: checked before anything starts. A database that cannot be read yet (away,
    not migrated) is not checked here: nothing is stored that the key could not read."""
    from outbox.senders import Keyring, SecretKeyError, check_stored
    from outbox.store import stored_senders

    try:
        rows = asyncio.run(stored_senders(settings.database_url, connect_timeout=5))
    except psycopg.Error as exc:
        get_logger("outbox.senders").warning(
            "stored senders not read at start", error=str(exc).splitlines()[0:1]
        )
        return
    try:
        check_stored(Keyring(settings.secret_key), rows)
    except SecretKeyError as exc:
        raise StartError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> None:
    from outbox import process
    from outbox.auth import TokenVerifier

    settings = _settings()
    if args.host:
        settings.host = args.host
    if args.port is not None:
        settings.port = args.port
    _require_database(settings)
    configure_logging(settings)
    try:
        TokenVerifier(settings)  # refuse to start without a usable key
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    _check_secret_key(settings)
    sockets = _bind(settings)
    try:
        process.run(process.serve(settings, sockets))
    except process.StartupFailed as exc:
        raise StartError(f"{exc} (see the log above)") from None


def _bind(settings: Settings) -> list[socket.socket]:
    """The API's sockets, bound before anything starts (outbox/bind.py)."""
    from outbox.bind import CannotListen, bind

    try:
        sockets = bind(settings.host, settings.port)
    except CannotListen as exc:
        raise StartError(str(exc)) from None
    settings.port = sockets[0].getsockname()[1]  # port 0: the one the system chose
    return sockets


def cmd_dispatch(args: argparse.Namespace) -> None:
    from outbox import process
    from outbox.dispatcher import SideTaskDied

    settings = _settings()
    _require_database(settings)
    configure_logging(settings)
    _check_secret_key(settings)
    try:
        process.run(process.dispatch(settings))
    except ValueError as exc:  # provider settings that can never work
        raise UsageError(str(exc)) from exc
    except SideTaskDied as exc:  # logged with its traceback: one line, exit status 1
        raise StartError(f"{exc} (see the log above)") from None


def cmd_migrate(args: argparse.Namespace) -> None:
    settings = _settings()
    _require_database(settings)
    configure_logging(settings)
    applied = db.migrate(settings.database_url)
    log = get_logger("outbox.migrate")
    log.info("migrated", applied=applied, schema_version=db.latest_version())
    if getattr(args, "pg_cron", False):
        _register_pg_cron(settings)


def _register_pg_cron(settings: Settings) -> None:
    from outbox.schedule import PG_CRON_JOB_NAME, pg_cron_command

    command = pg_cron_command(settings)
    try:
        job_id = db.register_pg_cron(
            settings.database_url,
            job_name=PG_CRON_JOB_NAME,
            schedule=settings.purge_schedule,
            command=command,
        )
    except db.PgCronUnavailable as exc:
        raise UsageError(f"--pg-cron: {exc}") from exc
    log = get_logger("outbox.migrate")
    log.info(
        "purge registered in pg_cron; the dispatchers leave it alone",
        job=PG_CRON_JOB_NAME,
        jobid=job_id,
        schedule=settings.purge_schedule,
        command=command,
    )
    if settings.timezone != "UTC":
        log.warning(
            "pg_cron reads schedules in its own cron.timezone (GMT unless set), "
            "not OUTBOX_TIMEZONE",
            timezone=settings.timezone,
        )


def _positive_duration(option: str, value: str) -> float:
    try:
        seconds = float(parse_duration(value))
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from exc
    if seconds <= 0:
        raise UsageError(f"{option}: must be longer than 0")
    return seconds


def cmd_purge(args: argparse.Namespace) -> None:
    settings = _settings()
    configure_logging(settings)
    older_than = _positive_duration("--older-than", args.older_than) if args.older_than else None
    with _database_or_dev(settings):
        asyncio.run(_purge(settings, older_than, dry_run=args.dry_run))


def _counts_line(counts: PurgeCounts) -> str:
    return (
        f"{counts.errored} errored messages, {counts.sent} sent/cancelled messages "
        f"and {counts.events} events"
    )


async def _purge(settings: Settings, older_than: float | None, *, dry_run: bool) -> None:
    from outbox import purge
    from outbox.store import Store

    pool = db.create_pool(settings)
    await pool.open(wait=True)
    try:
        store = Store(pool)
        if dry_run:
            counts = await purge.dry_run(store, settings, older_than)
            print(f"dry run: would delete {_counts_line(counts)} (nothing deleted)")
        else:
            started = time.monotonic()
            counts = await purge.run_purge(store, settings, older_than=older_than)
            elapsed = time.monotonic() - started
            print(f"deleted {_counts_line(counts)} in {elapsed:.2f}s")
    finally:
        await pool.close()


def cmd_status(args: argparse.Namespace) -> None:
    settings = _settings()
    configure_logging(settings)
    if args.watch is not None and args.watch <= 0:
        raise UsageError("--watch: must be a positive number of seconds")
    with _database_or_dev(settings):
        asyncio.run(_status(settings, as_json=args.json, watch=args.watch))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "-"
    seconds = (now - value).total_seconds()
    suffix = "ago" if seconds >= 0 else "from now"
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{value:%Y-%m-%d %H:%M:%S} ({seconds / size:.0f}{unit} {suffix})"
    return f"{value:%Y-%m-%d %H:%M:%S} ({seconds:.0f}s {suffix})"


def _table(header: Sequence[str], body: Sequence[Sequence[str]], right: set[int]) -> str:
    """Columns two spaces apart, those in `right` aligned right; the last one unpadded."""
    lines = [header, *body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(line[:-1])
        ]
        cells.append(line[-1].rjust(widths[-1]) if len(line) - 1 in right else line[-1])
        out.append("  ".join(cells))
    return "\n".join(out)


def format_status_table(rows: list[StatusSummary], now: datetime) -> str:
    header = ("STATUS", "COUNT", "DUE NOW", "OLDEST")
    body = [(row.status, str(row.count), str(row.due_now), _ago(row.oldest, now)) for row in rows]
    return _table(header, body, right={1, 2})


# A pause's reason comes from an admin or a provider: shown on one line, shortened, with
# no control character that a terminal would act on.
_REASON_CHARS = 60


def _one_line(text: str) -> str:
    clean = "".join(c if c.isprintable() else " " for c in text)
    return clean if len(clean) <= _REASON_CHARS else clean[: _REASON_CHARS - 1] + "…"


def sender_documents(settings: Settings, rows: list[SenderStatus]) -> list[dict[str, Any]]:
    """Each sender as `outbox status --json` shows it; `default` from the environment."""
    from outbox.senders import DEFAULT_SENDER, environment_sender

    default = environment_sender(settings)
    documents = []
    for row in rows:
        own = row.id == DEFAULT_SENDER
        # The rate the claim keeps to, from the sender's state (`default` always has one;
        # a stored sender without one, which its trigger never leaves, is shown at its
        # configured limit, as the API shows it).
        rate = row.effective_rate
        if rate is None and not own:
            rate = row.rate_limit
        documents.append(
            {
                "id": row.id,
                "provider": default.provider if own else row.provider,
                "source": "environment" if own else "api",
                "state": "paused" if row.paused else "active",
                "paused": row.paused,
                "rate_limit": default.rate_limit if own else row.rate_limit,
                "effective_rate": None if rate is None else round(rate, 3),
                "pending": row.pending,
                "in_flight": row.in_flight,
            }
        )
    return documents


def _rate(per_second: float | None, digits: int | None = None) -> str:
    if per_second is None:
        return "unlimited"
    return f"{per_second if digits is None else round(per_second, digits):g}/s"


def _effective_rate(sender: dict[str, Any]) -> str:
    """The rate kept to now; `learned` when an unlimited sender got it from a throttle."""
    rate = sender["effective_rate"]
    learned = rate is not None and sender["rate_limit"] is None
    return _rate(rate, 1) + (" learned" if learned else "")


def _sender_state(sender: dict[str, Any], now: datetime) -> str:
    paused = sender["paused"]
    if not paused:
        return "active"
    state = "paused"
    if paused.get("until"):
        try:
            at = datetime.fromisoformat(paused["until"]).astimezone(now.tzinfo)
            until = f"{at:%Y-%m-%d %H:%M:%S}"
        except (TypeError, ValueError):
            until = _one_line(str(paused["until"]))
        state += f" until {until}"
    why = _one_line(str(paused.get("reason") or ""))
    if paused.get("code"):
        why = f"{why} [{_one_line(str(paused['code']))}]"
    return f"{state}: {why}" if why else state


def format_senders_table(senders: list[dict[str, Any]], now: datetime) -> str:
    header = ("SENDER", "PROVIDER", "STATE", "RATE LIMIT", "EFFECTIVE RATE", "PENDING", "IN FLIGHT")
    body = [
        (
            sender["id"],
            str(sender["provider"]),
            _sender_state(sender, now),
            _rate(sender["rate_limit"]),
            _effective_rate(sender),
            str(sender["pending"]),
            str(sender["in_flight"]),
        )
        for sender in senders
    ]
    return _table(header, body, right={3, 4, 5, 6})


def status_document(
    rows: list[StatusSummary], senders: list[dict[str, Any]], now: datetime
) -> dict[str, Any]:
    return {
        "at": now.isoformat(),
        "statuses": {
            row.status: {"count": row.count, "due_now": row.due_now, "oldest": _iso(row.oldest)}
            for row in rows
        },
        "senders": senders,
    }


async def _status(settings: Settings, *, as_json: bool, watch: float | None) -> None:
    from outbox.store import Store

    pool = db.create_pool(settings)
    await pool.open(wait=True)
    try:
        store = Store(pool)
        while True:
            rows = await store.figures.queue_summary()
            senders = sender_documents(settings, await store.senders.status())
            now = datetime.now(UTC)
            if as_json:
                print(json.dumps(status_document(rows, senders, now)), flush=True)
            else:
                if watch is not None and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                local = now.astimezone(ZoneInfo(settings.timezone))
                print(f"outbox queue at {local:%Y-%m-%d %H:%M:%S %Z}")
                print(format_status_table(rows, local))
                print()
                print(format_senders_table(senders, local), flush=True)
            if watch is None:
                return
            await asyncio.sleep(watch)
    finally:
        await pool.close()


def cmd_token(args: argparse.Namespace) -> None:
    from outbox.dev import dev_jwt_secret

    settings = _settings()
    secret = settings.jwt_secret or dev_jwt_secret(settings.dev_data_dir, create=False)
    if not secret:
        raise UsageError(
            "OUTBOX_JWT_SECRET is not set and no dev secret exists yet (run `make run`)"
        )
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise UsageError(f"--ttl: {exc}") from exc
    print(
        mint_token(
            secret,
            args.sub,
            admin=args.admin,
            ttl=ttl,
            role_claim=settings.jwt_admin_claim,
            admin_value=settings.jwt_admin_value,
        )
    )


def cmd_dev(args: argparse.Namespace) -> None:
    from outbox import process
    from outbox.dev import run_dev
    from outbox.dispatcher import SideTaskDied

    settings = _settings()
    if args.port is not None:
        settings.port = args.port
    sockets = _bind(settings)  # before the embedded database starts
    try:
        run_dev(settings, sockets)
    except (process.StartupFailed, SideTaskDied) as exc:
        raise StartError(f"{exc} (see the log above)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox", description="Reliable WhatsApp sending through a PostgreSQL outbox."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    serve = sub.add_parser(
        "serve", help="HTTP API (ASGI under uvicorn)", description="Serve the HTTP API."
    )
    serve.add_argument("--host", help="listen address (default OUTBOX_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default OUTBOX_PORT, 8001)")
    serve.set_defaults(func=cmd_serve)

    dispatch = sub.add_parser(
        "dispatch",
        help="deliver queued messages (run any number)",
        description="Claim due messages, call the provider, record outcomes; SIGTERM drains.",
    )
    dispatch.set_defaults(func=cmd_dispatch)

    migrate = sub.add_parser(
        "migrate",
        help="apply the SQL migrations",
        description="Apply missing migrations from sql/migrations.",
    )
    migrate.add_argument(
        "--pg-cron",
        action="store_true",
        help="also register the purge job in pg_cron (the dispatchers then leave it alone)",
    )
    migrate.set_defaults(func=cmd_migrate)

    purge = sub.add_parser(
        "purge",
        help="delete old errored, sent and cancelled messages and old events now",
        description=(
            "Apply the retention settings now, in batches that each commit, and print the "
            "counts: errored messages (OUTBOX_ERROR_RETENTION, 7d), sent and cancelled "
            "messages (OUTBOX_SENT_RETENTION, 30d) and events (OUTBOX_EVENT_RETENTION, 7d)."
        ),
    )
    purge.add_argument(
        "--older-than",
        metavar="DURATION",
        help="errored messages that failed longer ago than this, e.g. 7d, 36h "
        "(default OUTBOX_ERROR_RETENTION)",
    )
    purge.add_argument(
        "--dry-run", action="store_true", help="print what would be deleted, delete nothing"
    )
    purge.set_defaults(func=cmd_purge)

    status = sub.add_parser(
        "status",
        help="print the queue summary (count, oldest, due now per status) and the senders",
        description="Print outbox.queue_summary as a table, then each sender: its state, "
        "rate limit and live messages.",
    )
    status.add_argument("--json", action="store_true", help="print JSON (one line per refresh)")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    status.set_defaults(func=cmd_status)

    token = sub.add_parser(
        "token",
        help="mint a development JWT (HS256)",
        description="Print an HS256 JWT signed with OUTBOX_JWT_SECRET.",
    )
    token.add_argument("--sub", default="dev-user", help="the user id (JWT sub), default dev-user")
    token.add_argument("--admin", action="store_true", help="add the admin role claim")
    token.add_argument("--ttl", default="24h", help="lifetime, e.g. 3600, 30m, 24h (default 24h)")
    token.set_defaults(func=cmd_token)

    dev = sub.add_parser(
        "dev",
        help="everything in one process on an embedded PostgreSQL",
        description="Every role in one process; embedded PostgreSQL without OUTBOX_DATABASE_URL.",
    )
    dev.add_argument("--port", type=int, help="listen port (default 8001)")
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as exc:
        flush_logs()  # the error line comes last
        print(f"outbox: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except StartError as exc:
        flush_logs()
        print(f"outbox: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass
