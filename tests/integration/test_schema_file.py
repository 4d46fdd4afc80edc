"""sql/schema.sql is what the migrations build today, dumped as `make schema` dumps it."""

from __future__ import annotations

import difflib
import os

import pytest

from outbox import schemadump

# Enough of the diff to see which table or function moved, not the whole file.
DIFF_LINES_SHOWN = 60


def test_schema_file_matches_the_migrated_database(database_url: str) -> None:
    committed = schemadump.SCHEMA_FILE.read_text()
    recorded = schemadump.recorded_major(committed)
    assert recorded is not None, "sql/schema.sql has no generated header: run `make schema`"
    major = schemadump.server_major(database_url)
    if major != recorded:
        pytest.skip(
            f"sql/schema.sql was written by PostgreSQL {recorded}'s pg_dump and this server "
            f"is PostgreSQL {major} (another major dumps the same schema differently)"
        )
    pg_dump = schemadump.find_pg_dump(major)
    if pg_dump is None:
        reason = f"no pg_dump {major} installed (Debian package: postgresql-client-{major})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI's PostgreSQL {major} should have brought it")
        pytest.skip(reason)

    dumped = schemadump.dump_schema(database_url, pg_dump, major)

    if dumped != committed:
        diff = difflib.unified_diff(
            committed.splitlines(),
            dumped.splitlines(),
            "sql/schema.sql",
            "the migrated database",
            lineterm="",
        )
        shown = "\n".join(list(diff)[:DIFF_LINES_SHOWN])
        pytest.fail(
            "sql/schema.sql differs from what sql/migrations build: run `make schema` "
            f"and commit the file\n{shown}"
        )
