"""Fixtures for API tests that need a server with settings of their own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from outbox.api import create_app
from outbox.settings import Settings

# The dispatcher fixtures (a scripted provider, real `outbox dispatch` processes).
from tests.dispatch.conftest import dispatcher_env, provider, start_dispatcher  # noqa: F401
from tests.support import ServerThread

ClientFactory = Callable[..., AbstractContextManager[httpx.Client]]


@pytest.fixture
def client_with(settings: Settings) -> Iterator[ClientFactory]:
    """`with client_with(max_body_bytes=2048) as http:` — a server on altered settings."""
    with ExitStack() as stack:

        @contextmanager
        def make(**overrides: Any) -> Iterator[httpx.Client]:
            changed = Settings(**{**settings.model_dump(), **overrides})
            server = stack.enter_context(ServerThread(create_app(changed)))
            with httpx.Client(base_url=server.url, timeout=30) as http:
                yield http

        yield make
