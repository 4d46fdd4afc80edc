"""README "Running in production": its settings table names every Settings field."""

from __future__ import annotations

import re
from pathlib import Path

from outbox.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def production_settings_rows() -> dict[str, list[str]]:
    """`OUTBOX_*` variable → its row's other cells, from the section's Settings table."""
    text = README.read_text()
    section = text.split("\n## Running in production\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("\n### Settings\n", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in table.splitlines():
        match = re.match(r"^\| `(OUTBOX_[A-Z0-9_]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def test_every_setting_has_a_row_with_a_meaning() -> None:
    rows = production_settings_rows()
    fields = {f"OUTBOX_{name.upper()}" for name in Settings.model_fields}
    missing = sorted(fields - set(rows))
    assert missing == [], f"add rows to README 'Running in production' › Settings: {missing}"
    unknown = sorted(set(rows) - fields)
    assert unknown == [], f"README rows for settings that do not exist: {unknown}"
    for name, cells in rows.items():
        assert len(cells) == 2 and cells[1], f"{name}: want | default | meaning |, got {cells}"


def test_the_check_reads_the_table() -> None:
    rows = production_settings_rows()
    assert rows["OUTBOX_DB_PGBOUNCER"][0] == "false"
    assert rows["OUTBOX_PORT"][0] == "8001"


def test_the_readme_points_only_at_what_a_user_of_the_repository_has() -> None:
    """A newcomer's only guide: no design notes, harness protocols or issue numbers they
    cannot see, and every file it links to is in the repository."""
    text = README.read_text()
    for name in ("DESIGN.md", "PROTOCOL.md", "../shared", "peers/RESULTS.md"):
        assert name not in text, f"README points at {name}, which a user does not have"
    issue = re.search(r"\bissues? #?\d+\b|(?<![\w/#])#\d+\b", text, re.IGNORECASE)
    assert issue is None, f"README names an issue: {issue.group() if issue else ''!r}"
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert "bench/README.md" in local  # the benchmark history lives there
    for link in local:
        assert (README.parent / link).exists(), f"README links to {link}, not in the repository"


def test_the_readme_gives_the_embedded_database_url() -> None:
    text = README.read_text()
    assert "postgresql://postgres:@/postgres?host=" in text
    assert "outbox status" in text and "find the dev database" in text
