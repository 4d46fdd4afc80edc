"""A server whose senders can be stored (OUTBOX_SECRET_KEY), with Meta's verify token and
an environment app secret, and `default` an http sender with a secret; `hooks` drives it:
senders created through the admin API, messages sent through the API and made `sent` in
SQL as a dispatcher would, signed webhook POSTs, and what the database then holds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import httpx
import psycopg
import pytest

from outbox.api import create_app
from outbox.settings import Settings
from tests.support import ServerThread
from tests.webhooks.support import DEFAULT_SECRET, ENV_APP_SECRET, KEY, VERIFY_TOKEN, Hooks

Auth = Callable[..., dict[str, str]]
HooksFactory = Callable[..., AbstractContextManager[Hooks]]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return Settings(
        **{
            **settings.model_dump(),
            "secret_key": KEY,
            "cloud_verify_token": VERIFY_TOKEN,
            "cloud_app_secret": ENV_APP_SECRET,
            "provider": "http",
            "provider_url": "http://127.0.0.1:9/gateway",
            "provider_secret": DEFAULT_SECRET,
        }
    )


@pytest.fixture
def hooks_with(settings: Settings, auth: Auth, database_url: str) -> Iterator[HooksFactory]:
    """`with hooks_with(api_statement_timeout=0.5) as hooks:` — a server on altered settings."""
    with ExitStack() as stack:

        @contextmanager
        def make(**overrides: Any) -> Iterator[Hooks]:
            changed = Settings(**{**settings.model_dump(), **overrides})
            server = stack.enter_context(ServerThread(create_app(changed)))
            with (
                httpx.Client(base_url=server.url, timeout=30) as client,
                psycopg.connect(database_url, autocommit=True) as conn,
            ):
                yield Hooks(server, client, auth, conn)

        yield make


@pytest.fixture
def hooks(hooks_with: HooksFactory) -> Iterator[Hooks]:
    with hooks_with() as made:
        yield made
