"""Settings from `OUTBOX_*` environment variables, built once and passed in."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """`1.5`, `500ms`, `30s`, `10m`, `12h`, `7d` → seconds as a float."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("expected seconds or a number with ms, s, m, h or d (e.g. 30s, 7d)")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


def _this_process_unless_named(value: str) -> str:
    """A dispatcher's id in its leases and attempts: `<hostname>-<pid>` unless set."""
    return value or f"{socket.gethostname()}-{os.getpid()}"


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _parse_jitter(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "full":
        return "full"
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
Jitter = Annotated[
    Literal["full"] | Annotated[float, Field(ge=0, le=1)], BeforeValidator(_parse_jitter)
]
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


def _check_cron(value: str) -> str:
    """A five-field cron expression (as cronsim reads it), e.g. `0 3 * * *`."""
    from datetime import UTC, datetime

    from cronsim import CronSim, CronSimError

    value = " ".join(value.split())
    try:
        CronSim(value, datetime.now(UTC))
    except CronSimError as exc:
        raise ValueError(f"not a cron expression: {exc}") from None
    return value


def _check_timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("not an IANA time zone name (e.g. UTC, America/Sao_Paulo)") from None
    return value


def _check_fernet_keys(value: str) -> str:
    """Comma-separated Fernet keys (32 url-safe base64-encoded bytes each)."""
    from cryptography.fernet import Fernet

    for key in (part.strip() for part in value.split(",")):
        if key:
            try:
                Fernet(key.encode())
            except ValueError:
                raise ValueError(
                    "each comma-separated key must be a Fernet key: 32 url-safe"
                    " base64-encoded bytes, as Fernet.generate_key() makes"
                ) from None
    return value


CronExpression = Annotated[str, AfterValidator(_check_cron)]
TimeZoneName = Annotated[str, AfterValidator(_check_timezone)]


def _https_or_loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


PROJECT_DIR = Path(__file__).resolve().parent.parent
SQL_DIR = PROJECT_DIR / "sql"
DEV_DATA_DIR = PROJECT_DIR / ".outbox-data"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOX_", extra="ignore")

    # Database
    database_url: str = ""
    listen_database_url: str = ""  # direct connection for LISTEN behind a pooler
    db_pool_size: int = Field(default=10, ge=1)
    db_pool_timeout: Seconds = 10.0
    # OUTBOX_DATABASE_URL goes through PgBouncer in transaction mode: no prepared
    # statements (PgBouncer < 1.21 cannot keep them across transactions).
    db_pgbouncer: bool = False

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=0, le=65535)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # A connection that has not sent a whole request head within this is closed.
    http_header_timeout: Seconds = Field(default=10.0, gt=0)
    # Open connections (HTTP and WebSocket) per process; beyond it: 503 + Retry-After.
    # Unset: derived from the process's descriptor limit (`ulimit -n`), leaving room for
    # the pool, the provider calls and the logs.
    max_connections: int | None = Field(default=None, ge=1)
    # API queries run under this statement_timeout (SET LOCAL); beyond it: 503.
    api_statement_timeout: Seconds = Field(default=5.0, gt=0)

    # Delivery receipts (outbox/webhooks.py): Meta's verification handshake token, the
    # app secret its notifications are signed with (besides each cloud sender's own
    # `app_secret`), and the largest webhook body read (more: 413).
    cloud_verify_token: str = Field(default="", repr=False)
    cloud_app_secret: str = Field(default="", repr=False)
    webhook_max_bytes: int = Field(default=1024 * 1024, ge=1024)

    # JWT
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_algorithms: CommaList = Field(default_factory=lambda: ["HS256"])
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_require_exp: bool = True
    jwt_admin_claim: str = "role"
    jwt_admin_value: str = Field(default="admin", min_length=1)  # the claim's value for admins
    jwt_max_age: Seconds = 0.0  # refuse tokens issued (`iat`) longer ago; 0 = no limit
    jwt_leeway: Seconds = 0.0

    # Queue and retries
    max_attempts: int = Field(default=4, ge=1, le=100)
    retry_base_delay: Seconds = 60.0
    retry_max_delay: Seconds = 600.0
    retry_jitter: Jitter = 0.2  # ±20 %; "full" = uniform in [0, delay]; 0 = none

    # Dispatcher
    # Resolved once, here: every role of the process names itself the same.
    dispatcher_id: Annotated[str, AfterValidator(_this_process_unless_named)] = Field(
        default="", validate_default=True
    )
    dispatch_concurrency: int = Field(default=64, ge=1, le=10_000)
    # Rows claimed ahead of free slots, started the moment a call ends (default: as many
    # as the concurrency). Provider calls in flight never exceed the concurrency.
    dispatch_prefetch: int | None = Field(default=None, ge=0, le=10_000)
    poll_interval: Seconds = 1.0
    lease_seconds: Seconds = 60.0
    # A sender's breaker: paused this long after a sender-level error, doubled by each
    # failed probe up to sender_pause_max.
    sender_pause: Seconds = 60.0  # 0: the probe goes at once
    sender_pause_max: Seconds = Field(default=3600.0, gt=0)
    # Limits (outbox/store/queue.py's claim): a sender's bucket holds this many seconds'
    # worth of its rate; a message throttled more often than max_throttles ends `error`;
    # a pair throttle (131056) holds that recipient's messages from that sender this long.
    sender_burst: Seconds = Field(default=0.2, gt=0, le=60)
    max_throttles: int = Field(default=100, ge=0, le=1_000_000)
    pair_delay: Seconds = Field(default=6.0, ge=0)
    # Fairness: at most this many rows of one user (JWT sub) claimed at once across the
    # cluster, prefetched ones included (None: no cap).
    user_max_in_flight: int | None = Field(default=None, ge=1, le=1_000_000)
    shutdown_grace: Seconds = 30.0

    # Providers
    provider: Literal["fake", "http", "cloud"] = "fake"
    provider_timeout: Seconds = 10.0
    provider_url: str = ""
    provider_secret: str = ""
    provider_allow_unsigned: bool = False  # `http` without a secret: calls go unsigned
    fake_latency_ms: float = Field(default=0.0, ge=0)
    fake_failure_rate: float = Field(default=0.0, ge=0, le=1)
    cloud_base_url: str = "https://graph.facebook.com"
    cloud_api_version: str = "v21.0"
    cloud_phone_number_id: str = ""
    cloud_token: str = ""
    provider_max_response_bytes: int = Field(default=1024 * 1024, ge=1024)  # more: transient
    # A call that may have reached the provider without an answer (written, then a read
    # error or the timeout): "retry" it (at least once: it may arrive twice) or "fail" it
    # (at most once: `error` "unknown outcome"; a later receipt still records the truth).
    unknown_outcome: Literal["retry", "fail"] = "retry"

    # Senders (outbox/senders.py): the Fernet keys of the stored credentials, the first
    # encrypting, all decrypting (rotation); messages per second of a sender that names
    # no rate_limit (unset: 80 for cloud, unlimited for http and fake).
    secret_key: Annotated[str, AfterValidator(_check_fernet_keys)] = Field(default="", repr=False)
    sender_rate: float | None = Field(default=None, gt=0, le=1_000_000)  # senders.MAX_RATE

    # Purge and retention (the scheduled job of the dispatchers, or pg_cron)
    error_retention: Seconds = 7 * 86400.0  # errored messages, by finished_at; 0 keeps
    sent_retention: Seconds = 30 * 86400.0  # sent and cancelled messages; 0 keeps them
    event_retention: Seconds = 7 * 86400.0  # status events; 0 keeps them
    purge_schedule: CronExpression = "0 3 * * *"
    timezone: TimeZoneName = "UTC"
    purge_batch_size: int = Field(default=5000, ge=1, le=1_000_000)

    # Live status feed (WebSocket)
    ws_queue_size: int = Field(default=1000, ge=2, le=1_000_000)  # events held per client
    ws_ping_interval: Seconds = 20.0  # 0 = no pings
    ws_max_frame: int = Field(default=4096, ge=125)  # bytes; clients only ping and close
    ws_max_per_user: int = Field(default=20, ge=1)  # sockets per JWT sub per process; then 1008
    ws_max_replays: int = Field(default=8, ge=1)  # concurrent `since` replays per process

    # Metrics: `outbox dispatch` serves /metrics on metrics_host:metrics_port (0 = none;
    # `serve` has /metrics on its own port); queue gauges are read at most every metrics_cache.
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    metrics_host: str = ""  # "" = OUTBOX_HOST
    metrics_cache: Seconds = 5.0

    # `outbox dev`: where the embedded PostgreSQL and the dev JWT secret live
    dev_data_dir: Path = DEV_DATA_DIR

    # Logs
    log_format: Literal["json", "console", ""] = ""  # "" = console on a TTY, else JSON
    log_level: Literal["debug", "info", "warning", "error", "DEBUG", "INFO", "WARNING", "ERROR"] = (
        "info"
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.listen_database_url:
            self.listen_database_url = self.database_url
        if self.lease_seconds < self.provider_timeout + 1:
            # A call's deadline must fit in its lease with room to record the outcome.
            raise ValueError(
                "OUTBOX_LEASE_SECONDS must exceed OUTBOX_PROVIDER_TIMEOUT by at least 1s"
            )
        if self.provider == "http" and not self.provider_url:
            raise ValueError("OUTBOX_PROVIDER_URL is required with OUTBOX_PROVIDER=http")
        if (
            self.provider == "http"
            and not self.provider_secret
            and not self.provider_allow_unsigned
        ):
            raise ValueError(
                "OUTBOX_PROVIDER_SECRET is required with OUTBOX_PROVIDER=http (the gateway"
                " checks the calls' signature); OUTBOX_PROVIDER_ALLOW_UNSIGNED=true sends"
                " unsigned calls"
            )
        if self.provider == "cloud" and not _https_or_loopback(self.cloud_base_url):
            raise ValueError(
                "OUTBOX_CLOUD_BASE_URL must be https:// (the access token travels in every"
                " call); http:// only to a loopback address"
            )
        if any(alg.lower() == "none" for alg in self.jwt_algorithms):
            raise ValueError("OUTBOX_JWT_ALGORITHMS must not include 'none'")
        return self


_UNSHOWN = ("secret_key",)  # settings whose values an error line never repeats


def describe_error(error: ValidationError) -> str:
    """One line naming the offending variable(s), for a clean exit at start."""
    parts: dict[str, str] = {}
    for item in error.errors(include_url=False):
        loc = item.get("loc") or ()
        name = "OUTBOX_" + str(loc[0]).upper() if loc else "settings"
        got = f" (got {item['input']!r})" if loc and loc[0] not in _UNSHOWN else ""
        parts.setdefault(name, f"{name}: {item['msg'].removeprefix('Value error, ')}{got}")
    return "invalid setting " + "; ".join(parts.values())
