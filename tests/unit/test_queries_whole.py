"""Statements kept whole in sql/queries.sql that must stay the same where they overlap."""

from __future__ import annotations

from outbox.store import QUERIES


def _statement(name: str) -> str:
    """The query without its leading comment lines or its final `;`."""
    lines = QUERIES[name].splitlines()
    while lines and lines[0].startswith("--"):
        lines.pop(0)
    return "\n".join(lines).rstrip().removesuffix(";")


def test_the_insert_that_looks_for_replays_is_the_plain_insert_plus_on_conflict() -> None:
    plain = _statement("insert_new_messages")
    with_replays = _statement("insert_messages")
    assert with_replays.startswith(plain + "\n"), "insert_messages must repeat insert_new_messages"
    assert with_replays[len(plain) :].lstrip().startswith("ON CONFLICT")
