"""Senders: the sending identities an admin configures (their provider, settings, limit and
users), how their credentials are encrypted at rest, the sender `default` that the
environment defines, and how a sender is shown (credentials only as `{"set": …}`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from outbox.models import DEFAULT_SENDER as DEFAULT_SENDER  # defined once, with the body
from outbox.models import NO_NUL_PATTERN, SENDER_PATTERN, iso_utc
from outbox.settings import Settings
from outbox.store import SenderCounts, SenderRow, SenderState

SENDER_ID_PATTERN = SENDER_PATTERN
PROVIDERS = ("cloud", "http", "fake")
CLOUD_RATE = 80.0  # messages per second: the Cloud API's standard throughput
MAX_RATE = 1_000_000.0
MAX_USERS = 1000
KEY_SETTING = "OUTBOX_SECRET_KEY"

# The write-only settings of each provider, encrypted at rest; those a sender cannot
# work without are required when it is created (or its provider changes).
SECRET_FIELDS: Mapping[str, tuple[str, ...]] = {
    "cloud": ("access_token", "app_secret"),
    "http": ("secret",),
    "fake": (),
}
REQUIRED_SECRETS: Mapping[str, tuple[str, ...]] = {
    "cloud": ("access_token",),
    "http": ("secret",),
    "fake": (),
}

# URLs as JSON Schema can state them, so that the published document and the server
# agree: a hostname (or [::1]), an optional port (0–65535), a plain path.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[::1\])"
_PORT = r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?"
_PATH = r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@/-]*)?"
# The Cloud API's token travels in every call: https, or http to this host only.
CLOUD_BASE_URL_PATTERN = (
    rf"^(?:https://{_HOST}|http://(?:localhost|127\.0\.0\.1|\[::1\])){_PORT}{_PATH}$"
)
HTTP_URL_PATTERN = rf"^https?://{_HOST}{_PORT}{_PATH}$"
# Credentials go into headers and signatures: printable ASCII, no spaces.
Credential = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[!-~]+$")]
UserSub = Annotated[str, Field(min_length=1, max_length=256, pattern=NO_NUL_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CloudSettings(_Strict):
    phone_number_id: str = Field(pattern=r"^[0-9]{1,32}$")
    access_token: Credential | None = Field(
        default=None,
        repr=False,
        description="Write-only: omitted on a replace = keep the stored one",
    )
    app_secret: Credential | None = Field(
        default=None,
        repr=False,
        description="Write-only: omitted on a replace = keep the stored one",
    )
    api_version: str = Field(default="v21.0", pattern=r"^v[0-9]{1,3}\.[0-9]{1,3}$")
    base_url: str = Field(
        default="https://graph.facebook.com", pattern=CLOUD_BASE_URL_PATTERN, max_length=2048
    )


class HttpSettings(_Strict):
    url: str = Field(pattern=HTTP_URL_PATTERN, max_length=2048)
    secret: Credential | None = Field(
        default=None,
        repr=False,
        description="HMAC key of the calls' signatures; write-only: omitted on a replace ="
        " keep the stored one",
    )


class FakeSettings(_Strict):
    latency_ms: float = Field(default=0.0, ge=0, le=60_000)
    failure_rate: float = Field(default=0.0, ge=0, le=1)


class _SenderBody(_Strict):
    rate_limit: float | None = Field(
        default=None,
        gt=0,
        le=MAX_RATE,
        description="Messages per second; null: unlimited; omitted: OUTBOX_SENDER_RATE, else"
        " 80 for cloud and unlimited for http and fake",
    )
    users: list[UserSub] = Field(
        default_factory=lambda: ["*"],
        max_length=MAX_USERS,
        description='JWT subs that may send from it; ["*"] (the default): everyone',
    )


class CloudSender(_SenderBody):
    provider: Literal["cloud"]
    settings: CloudSettings


class HttpSender(_SenderBody):
    provider: Literal["http"]
    settings: HttpSettings


class FakeSender(_SenderBody):
    provider: Literal["fake"]
    settings: FakeSettings = Field(default_factory=FakeSettings)


AnySender = CloudSender | HttpSender | FakeSender
SenderRequest = Annotated[AnySender, Field(discriminator="provider")]
SENDER_REQUEST: TypeAdapter[AnySender] = TypeAdapter(SenderRequest)


class PauseRequest(_Strict):
    reason: str = Field(
        default="paused by hand", min_length=1, max_length=500, pattern=NO_NUL_PATTERN
    )


PAUSE_REQUEST = TypeAdapter(PauseRequest)


def default_rate(provider: str, settings: Settings) -> float | None:
    """A sender's rate_limit when none is given."""
    if settings.sender_rate is not None:
        return settings.sender_rate
    return CLOUD_RATE if provider == "cloud" else None


def rate_limit_of(request: AnySender, settings: Settings) -> float | None:
    """The request's rate_limit: null is unlimited, omitted the default."""
    if "rate_limit" in request.model_fields_set:
        return request.rate_limit
    return default_rate(request.provider, settings)


def split_settings(request: AnySender) -> tuple[dict[str, Any], dict[str, str]]:
    """(the settings that are not secret, the secret ones given)."""
    given = request.settings.model_dump()
    secret_names = SECRET_FIELDS[request.provider]
    plain = {name: value for name, value in given.items() if name not in secret_names}
    secrets = {name: given[name] for name in secret_names if given.get(name) is not None}
    return plain, secrets


def unique_users(users: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(users))


# Credentials at rest ---------------------------------------------------------------


class SecretKeyError(Exception):
    """OUTBOX_SECRET_KEY is missing, or does not decrypt what is stored."""


def _fernet_key(text: str) -> Fernet:
    return Fernet(text.encode())


class Keyring:
    """OUTBOX_SECRET_KEY's keys: the first encrypts, every one decrypts (rotation)."""

    def __init__(self, keys: str) -> None:
        parts = [part.strip() for part in keys.split(",") if part.strip()]
        self._fernet = MultiFernet([_fernet_key(part) for part in parts]) if parts else None

    def __repr__(self) -> str:  # never the keys
        return f"Keyring(configured={self.configured})"

    @property
    def configured(self) -> bool:
        return self._fernet is not None

    def _require(self) -> MultiFernet:
        if self._fernet is None:
            raise SecretKeyError(f"{KEY_SETTING} is not set: senders' credentials need it")
        return self._fernet

    def encrypt(self, secrets: Mapping[str, str]) -> bytes:
        return self._require().encrypt(orjson.dumps(dict(secrets)))

    def decrypt(self, token: bytes, sender_id: str) -> dict[str, str]:
        try:
            plain = self._require().decrypt(bytes(token))
        except InvalidToken:
            raise SecretKeyError(
                f"{KEY_SETTING} does not decrypt the credentials of sender {sender_id!r}"
                " (a key that encrypted them must stay in the list)"
            ) from None
        secrets: dict[str, str] = orjson.loads(plain)
        return secrets


def check_stored(keyring: Keyring, rows: Sequence[SenderRow]) -> None:
    """Once any sender is stored, the key must be set and decrypt every one's credentials."""
    if not rows:
        return
    if not keyring.configured:
        raise SecretKeyError(
            f"{KEY_SETTING} is not set, and {len(rows)} sender(s) are stored"
            " (their credentials are encrypted with it)"
        )
    for row in rows:
        if row.secrets is not None:
            keyring.decrypt(row.secrets, row.id)


# How a sender is shown -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SenderConfig:
    """A sender as it is shown: stored, or the environment's `default`."""

    id: str
    provider: str
    settings: dict[str, Any]  # not secret
    secrets_set: frozenset[str]
    rate_limit: float | None
    users: list[str]
    paused: dict[str, Any] | None
    source: Literal["api", "environment"]
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def stored(cls, row: SenderRow) -> SenderConfig:
        return cls(
            id=row.id,
            provider=row.provider,
            settings=row.settings,
            secrets_set=frozenset(row.secret_fields),
            rate_limit=row.rate_limit,
            users=row.users,
            paused=row.paused,
            source="api",
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


def environment_sender(settings: Settings) -> SenderConfig:
    """The sender `default`: OUTBOX_PROVIDER and its settings, read-only."""
    plain: dict[str, Any]
    secrets_set: set[str] = set()
    match settings.provider:
        case "fake":
            plain = {
                "latency_ms": settings.fake_latency_ms,
                "failure_rate": settings.fake_failure_rate,
            }
        case "http":
            plain = {"url": settings.provider_url}
            if settings.provider_secret:
                secrets_set.add("secret")
        case "cloud":
            plain = {
                "phone_number_id": settings.cloud_phone_number_id,
                "api_version": settings.cloud_api_version,
                "base_url": settings.cloud_base_url,
            }
            if settings.cloud_token:
                secrets_set.add("access_token")
    return SenderConfig(
        id=DEFAULT_SENDER,
        provider=settings.provider,
        settings=plain,
        secrets_set=frozenset(secrets_set),
        rate_limit=default_rate(settings.provider, settings),
        users=["*"],
        paused=None,
        source="environment",
        created_at=None,
        updated_at=None,
    )


def environment_secrets(settings: Settings) -> dict[str, str]:
    """The sender `default`'s credentials, from the environment."""
    match settings.provider:
        case "http":
            return {"secret": settings.provider_secret} if settings.provider_secret else {}
        case "cloud":
            return {"access_token": settings.cloud_token} if settings.cloud_token else {}
    return {}


# The effective rate as shown: the claim's own figure, rounded for people to read.
_RATE_DIGITS = 3


def effective_rate(sender: SenderConfig, state: SenderState | None) -> float | None:
    """The rate the claim keeps `sender` to now (None: unlimited): its state's (halved by a
    throttle and climbing back, or a limit learned by an unlimited sender); without a state
    row, its configured limit."""
    rate = state.effective_rate if state is not None else sender.rate_limit
    return None if rate is None else round(rate, _RATE_DIGITS)


def sender_view(
    sender: SenderConfig, counts: SenderCounts | None, state: SenderState | None
) -> dict[str, Any]:
    """The API's view: credentials as `{"set": true|false}`, never their values; the pause
    and the effective rate from the sender's state (sql/migrations/016_sender_limits.sql),
    where `default`'s live too."""
    shown = dict(sender.settings)
    for name in SECRET_FIELDS[sender.provider]:
        shown[name] = {"set": name in sender.secrets_set}
    paused = state.paused if state is not None else sender.paused
    return {
        "id": sender.id,
        "provider": sender.provider,
        "settings": shown,
        "rate_limit": sender.rate_limit,
        "users": sender.users,
        "state": "paused" if paused else "active",
        "paused": paused,
        "effective_rate": effective_rate(sender, state),
        "pending": counts.pending if counts else 0,
        "in_flight": counts.in_flight if counts else 0,
        "source": sender.source,
        "created_at": iso_utc(sender.created_at),
        "updated_at": iso_utc(sender.updated_at),
    }


# The answers' shapes, for /openapi.json ---------------------------------------------


class PausedState(BaseModel):
    reason: str
    code: str | None = Field(description="The provider's code when it paused the sender")
    since: str
    until: str | None = Field(description="When sending resumes by itself (null: by hand)")
    manual: bool


class SenderView(BaseModel):
    id: str
    provider: Literal["cloud", "http", "fake"]
    settings: dict[str, Any] = Field(
        description='The settings; each credential only as {"set": true|false}'
    )
    rate_limit: float | None
    users: list[str]
    state: Literal["active", "paused"]
    paused: PausedState | None
    effective_rate: float | None = Field(
        description="Messages per second the dispatchers keep to now (null: unlimited):"
        " rate_limit, halved by a provider's throttle and climbing back by 10 % of it per"
        " second; for a sender without a rate_limit, a limit learned from a throttle"
    )
    pending: int
    in_flight: int
    source: Literal["api", "environment"] = Field(
        description="environment: the sender default, defined by OUTBOX_PROVIDER (read-only)"
    )
    created_at: str | None
    updated_at: str | None


class SenderList(BaseModel):
    senders: list[SenderView]
