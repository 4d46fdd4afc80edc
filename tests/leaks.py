"""What must never appear in a log line: a phone number, a JWT, a bearer token, a secret."""

from __future__ import annotations

import re
from collections.abc import Iterable

from outbox.log import mask_phone
from tests.conftest import JWT_SECRET

_JWT = re.compile(r"eyJ[\w-]{5,}\.eyJ[\w-]{5,}\.[\w-]+")
_BEARER = re.compile(r"bearer\s+[\w.~+/-]{8,}", re.IGNORECASE)


def leaks(lines: Iterable[str], *secrets: str) -> list[str]:
    """Every line that shows an unmasked phone number, a JWT, a bearer token, the tests'
    JWT secret or one of `secrets`."""
    secrets = (JWT_SECRET, *secrets)
    found = []
    for line in lines:
        if (
            mask_phone(line) != line
            or _JWT.search(line)
            or _BEARER.search(line)
            or any(secret and secret in line for secret in secrets)
        ):
            found.append(line)
    return found
