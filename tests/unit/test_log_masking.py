"""Phone numbers are masked in every spelling, in JSON lines and on a colour terminal."""

from __future__ import annotations

import pytest

from outbox.log import _mask_rendered, mask_phone


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("5511999999999", "5511*****9999"),
        ("+5511999999999", "+5511*****9999"),
        ("+55 11 99999-9999", "+5511*****9999"),
        ("55-11999999999", "5511*****9999"),
        ("to=+55 (11) 99999-9999,", "to=+5511*****9999,"),
        ("call 11 9999-9999 now", "call 11******99 now"),
        ("12345678", "12****78"),
        ("\x1b[35m5511999999999\x1b[0m", "\x1b[35m5511*****9999\x1b[0m"),
        ("to=\x1b[36m+55 11 99999-9999\x1b[0m", "to=\x1b[36m+5511*****9999\x1b[0m"),
        ("55 11 99999-9999 55 11 88888-8888", "5511******************8888"),
    ],
)
def test_every_spelling_of_a_number_is_masked(text: str, masked: str) -> None:
    assert mask_phone(text) == masked
    if "\x1b" not in text:  # JSON lines are bytes, never coloured
        assert _mask_rendered(None, "info", text.encode()) == masked.encode()


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-04T15:31:15.743950Z",  # a timestamp
        "purge at 2026-12-05 03:00",  # a date and a time
        "0192f3a4-5b6c-7d8e-9f01-23456789abcd",  # a UUID
        "id 1234567890123456789",  # a long id
        '"status":202,"duration_ms":12.5',
        "1234567",  # too short for a phone
    ],
)
def test_what_is_not_a_phone_is_left_alone(text: str) -> None:
    assert mask_phone(text) == text
    assert _mask_rendered(None, "info", text.encode()) == text.encode()


def test_a_json_line_is_masked_before_its_timestamp() -> None:
    line = (
        b'{"event":"x","to":"+55 11 99999-9999","level":"info",'
        b'"timestamp":"2026-12-04T15:31:15.743950Z"}'
    )
    assert _mask_rendered(None, "info", line) == line.replace(
        b"+55 11 99999-9999", b"+5511*****9999"
    )
