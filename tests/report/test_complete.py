"""report.complete: a section the report cannot draw names the command that fills it."""

from pathlib import Path

from clipft.report.complete import missing_commands


def test_missing_sections_name_their_command():
    fills = missing_commands(Path("runs/r"), ["metrics", "heatmap"], "the data folder moved", "DATA", "best.pt")
    assert "clipft evaluate --checkpoint runs/r/best.pt --data DATA" in fills["metrics"]
    assert "clipft visualize heatmap --checkpoint runs/r/best.pt --data DATA" in fills["heatmap"]
    assert all("the data folder moved" in v for v in fills.values())
