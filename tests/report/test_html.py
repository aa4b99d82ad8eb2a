"""report.html: one self-contained document, pictures inlined; a missing picture is one error."""

import pytest
from PIL import Image

from clipft.report.errors import ReportError
from clipft.report.html import markdown_to_html


def test_pictures_are_inlined_and_a_missing_one_is_refused(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    page = markdown_to_html("# Run\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![a](a.png)\n", tmp_path, "Run")
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and 'src="data:image/png;base64,' in page
    assert "a.png" not in page.split("<body>")[1].replace('alt="a"', "")
    with pytest.raises(ReportError, match="missing"):
        markdown_to_html("![b](b.png)\n", tmp_path, "Run")
