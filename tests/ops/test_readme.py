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
