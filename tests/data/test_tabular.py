"""data.tabular: the delimiter is sniffed from the header, so captions with commas survive in a TSV."""

from pathlib import Path

from clipft.data.tabular import sniff_delimiter


def test_sniff_delimiter():
    assert sniff_delimiter("filepath,caption\na.jpg,a dog\n") == ","
    assert sniff_delimiter("filepath\tcaption\na.jpg\ta dog, running\n") == "\t"


# --------------------------------------------------------------------------- stray quotes

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from clipft.data import DataError, load_csv_captions  # noqa: E402


def _rows(n: int, bad: int | None = None, closing: int | None = None) -> str:
    """A CSV of n images with one caption each; row `bad` opens a quote it never closes, row
    `closing` (if given) holds a properly quoted caption whose first quote closes the stray one."""
    lines = ["filepath,caption"]
    for i in range(n):
        cap = f"a photo number {i} of a dog on a beach"
        if i == bad:
            cap = '"a stray quote opens here'
        elif i == closing:
            cap = '"a quoted caption, with a comma"'
        lines.append(f"img{i:03d}.jpg,{cap}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("closing", [None, 40])
def test_an_unterminated_quote_is_refused_naming_the_file_and_line(tmp_path, closing):
    f = tmp_path / "captions.csv"
    f.write_text(_rows(60, bad=11, closing=closing))
    with pytest.raises(DataError) as e:
        load_csv_captions(f)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and "line 13" in msg and "quote" in msg, msg


def test_one_swallowed_row_is_refused_too(tmp_path):
    """A stray quote closed on the next line by another stray one: only one row vanishes, but that
    row's text (a path with an image extension, a separator, a caption) sits inside the caption."""
    f = tmp_path / "c.csv"
    f.write_text('filepath,caption\na.jpg,"a dog\nb.jpg,a cat"\nc.jpg,a bird\n')
    with pytest.raises(DataError, match=r"c\.csv.*line 2"):
        load_csv_captions(f)


def test_quoted_multi_line_captions_still_load(tmp_path):
    f = tmp_path / "ok.csv"
    f.write_text('filepath,caption\na.jpg,"two lines\nof caption"\nb.jpg,"said ""hi"", twice"\nc.jpg,plain\n')
    ds = load_csv_captions(f)
    assert sorted(ds.captions) == ["plain", 'said "hi", twice', "two lines\nof caption"]


def test_validate_refuses_a_file_whose_quote_swallows_rows(tmp_path, capsys):
    from clipft.cli.commands import main
    from clipft.config import Config
    from clipft.data.validate import validate_data
    from PIL import Image
    for i in range(60):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"img{i:03d}.jpg")
    f = tmp_path / "captions.csv"
    f.write_text(_rows(60, bad=11))
    rep = validate_data(f, Config(), check_tokens=False)
    assert not rep["ok"] and any(str(f) in e and "line 13" in e for e in rep["errors"]), rep["errors"]
    assert main(["validate", "--data", str(f), "--no-tokens", "--quiet"]) == 1
    assert "OK: nothing would spoil training" not in capsys.readouterr().out


def test_validate_counts_images_against_the_rows_the_file_holds(tmp_path, monkeypatch):
    """Defence in depth: should a reader ever take fewer rows than the file's lines hold, validate
    says so (physical lines that look like rows vs rows read)."""
    from clipft.config import Config
    from clipft.data import tabular
    from clipft.data.validate import validate_data
    from PIL import Image
    for i in range(10):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"img{i:03d}.jpg")
    f = tmp_path / "captions.csv"
    f.write_text(_rows(10))
    real = tabular.load_csv_captions

    def lossy(path, cfg=None):  # a reader that loses the last 4 rows
        text = Path(path).read_text().splitlines()
        short = tmp_path / "short" / "captions.csv"
        short.parent.mkdir(exist_ok=True)
        short.write_text("\n".join(text[:-4]) + "\n")
        for i in range(6):
            (short.parent / f"img{i:03d}.jpg").write_bytes((tmp_path / f"img{i:03d}.jpg").read_bytes())
        return real(short, cfg)
    monkeypatch.setattr(tabular, "load_csv_captions", lossy)
    rep = validate_data(f, Config(), check_tokens=False)
    assert not rep["ok"] and any("10 rows" in e and "6" in e for e in rep["errors"]), rep["errors"]
