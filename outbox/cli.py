"""The `outbox` command: serve, migrate, token, dev."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from outbox import db
from outbox.auth import mint_token
from outbox.log import configure_logging, get_logger
from outbox.settings import Settings, describe_error, parse_duration


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise UsageError(describe_error(exc)) from exc


def _require_database(settings: Settings) -> None:
    if not settings.database_url:
        raise UsageError("OUTBOX_DATABASE_URL is required (or use `outbox dev`)")


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
    asyncio.run(process.serve(settings))


def cmd_dispatch(args: argparse.Namespace) -> None:
    from outbox import process

    settings = _settings()
    _require_database(settings)
    configure_logging(settings)
    try:
        asyncio.run(process.dispatch(settings))
    except ValueError as exc:  # provider settings that can never work
        raise UsageError(str(exc)) from exc


def cmd_migrate(args: argparse.Namespace) -> None:
    settings = _settings()
    _require_database(settings)
    configure_logging(settings)
    applied = db.migrate(settings.database_url)
    log = get_logger("outbox.migrate")
    log.info("migrated", applied=applied, schema_version=db.latest_version())


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
        mint_token(secret, args.sub, admin=args.admin, ttl=ttl, role_claim=settings.jwt_admin_claim)
    )


def cmd_dev(args: argparse.Namespace) -> None:
    from outbox.dev import run_dev

    settings = _settings()
    if args.port is not None:
        settings.port = args.port
    run_dev(settings)


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
    migrate.set_defaults(func=cmd_migrate)

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
        print(f"outbox: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass
