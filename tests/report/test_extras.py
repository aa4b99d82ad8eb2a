"""report.extras: the user's notes verbatim, or the lab's questions as the one empty section."""

import pytest

from clipft.report.errors import ReportError
from clipft.report.extras import notes_section


def test_notes_section(tmp_path):
    default = "\n".join(notes_section(None))
    assert "## Your notes" in default and "Which prompts were most useful?" in default
    notes = tmp_path / "notes.md"
    notes.write_text("I tried *three* prompts.\n")
    assert notes_section(notes) == ["## Your notes", "", "I tried *three* prompts.", ""]
    with pytest.raises(ReportError, match="notes file not found"):
        notes_section(tmp_path / "missing.md")
