"""The fuzzed server can store senders: it has an OUTBOX_SECRET_KEY."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from outbox.settings import Settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"secret_key": Fernet.generate_key().decode()})
