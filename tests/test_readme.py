"""The README's configuration table is the settings object, row for row."""

from __future__ import annotations

import re
from pathlib import Path

from mailer.config import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in README.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `(MAILER_[A-Z0-9_]+)` \| (.*?) \| (.*) \|$", line)
        if m:
            default = m.group(2).strip().strip("`")
            rows.append((m.group(1), default, m.group(3).strip()))
    return rows


def test_configuration_table_matches_settings() -> None:
    assert _readme_rows() == settings_table()


def test_quick_start_has_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
