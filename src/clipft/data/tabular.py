"""Tabular captions: CSV/TSV files (separator sniffed) and JSON Lines, one caption per row.

Image paths are absolute or relative to the file. A directory stands for its `metadata.jsonl` or
`metadata.csv` (the HuggingFace imagefolder convention). Neither format has splits of its own.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

from ..config import DataConfig
from .records import IMAGE_EXTENSIONS, CaptionedImages, DataError, Entry, group_entries, image_path, read_text

# Auto-detected column (CSV header) / key (JSONL) names, first match wins, case-insensitive.
IMAGE_COLUMNS = ("filepath", "image", "file_name", "filename", "image_path", "path", "file", "img")
CAPTION_COLUMNS = ("caption", "text", "captions", "sentence", "description")
CSV_DELIMITERS = ("\t", ",", ";", "|")  # tried in this order


def metadata_file(path: Path, suffix: str | None = None) -> Path:
    """DIR/metadata.jsonl or DIR/metadata.csv (the HuggingFace imagefolder convention)."""
    for name in ("metadata.jsonl", "metadata.csv"):
        if (path / name).is_file() and (suffix is None or name.endswith(suffix)):
            return path / name
    raise DataError(f"{path}: directory has no metadata{suffix or '.jsonl'} file")


def _has_metadata(path: Path, suffix: str) -> bool:
    """A directory whose metadata file (metadata.jsonl preferred) ends with `suffix`."""
    try:
        return metadata_file(path).suffix == suffix
    except DataError:
        return False


def is_csv(path: Path) -> bool:
    """A .csv/.tsv file, or a directory whose metadata file is metadata.csv."""
    return _has_metadata(path, ".csv") if path.is_dir() else path.suffix.lower() in (".csv", ".tsv")


def is_jsonl(path: Path) -> bool:
    """A .jsonl/.ndjson file, or a directory with metadata.jsonl."""
    return _has_metadata(path, ".jsonl") if path.is_dir() else path.suffix.lower() in (".jsonl", ".ndjson")


def _pick_column(names: Sequence[str], wanted: str, defaults: Sequence[str], what: str, setting: str,
                 source: Path | str, noun: str = "column") -> str:
    """The column/key of `names` to use: `wanted` if set, else the first of `defaults` present."""
    by_lower: dict[str, str] = {}
    for n in names:
        by_lower.setdefault(n.strip().lower(), n)
    listing = ", ".join(repr(n) for n in names[:20]) or "none"
    if wanted:
        if wanted in names:
            return wanted
        if wanted.strip().lower() in by_lower:
            return by_lower[wanted.strip().lower()]
        raise DataError(f"{source}: no {what} {noun} {wanted!r} (data.{setting}); {noun}s: {listing}")
    for d in defaults:
        if d in by_lower:
            return by_lower[d]
    raise DataError(f"{source}: no {what} {noun} (looked for {', '.join(defaults)}); {noun}s: {listing}; "
                    f"name it with --set data.{setting}=NAME")


def sniff_delimiter(text: str, source: Path | str = "<text>", image_column: str = "",
                    caption_column: str = "") -> str:
    """The separator of CSV/TSV text: of tab, comma, semicolon and pipe, the one that splits the
    header row into fields that include the image and caption columns (csv.Sniffer breaks ties).

    Looking for the columns, not just counting characters, is what keeps a comma file whose
    captions hold tabs (or a TSV whose captions hold commas) from being split on the wrong one.
    """
    header = text.split("\n", 1)[0].rstrip("\r")  # a header row never spans lines
    fits, tried = [], []
    for d in CSV_DELIMITERS:
        if d not in header:
            continue
        names = next(csv.reader([header], delimiter=d))
        tried.append(names)
        try:
            _pick_column(names, image_column, IMAGE_COLUMNS, "image", "image_column", source)
            _pick_column(names, caption_column, CAPTION_COLUMNS, "caption", "caption_column", source)
        except DataError:
            continue
        fits.append(d)
    if len(fits) == 1:
        return fits[0]
    if fits:
        try:
            d = csv.Sniffer().sniff(text[:65536], delimiters="".join(fits)).delimiter
            if d in fits:
                return d
        except csv.Error:
            pass
        return fits[0]
    if tried:  # explain with the split that gives the most fields
        names = max(tried, key=len)
        _pick_column(names, image_column, IMAGE_COLUMNS, "image", "image_column", source)
        _pick_column(names, caption_column, CAPTION_COLUMNS, "caption", "caption_column", source)
    raise DataError(f"{source}: the header row {header[:100]!r} has no tab, comma, semicolon or | separator; "
                    "expected an image path column and a caption column")


MAX_FIELD_LINES = 4  # a quoted field spanning more physical lines than this is a quote left open


def _looks_like_row(line: str, delim: str, img_col: int) -> bool:
    """A line whose image cell (split on the separator) names an image file: a row of the file."""
    cells = line.split(delim)
    if len(cells) < 2 or img_col >= len(cells):
        return False
    return Path(cells[img_col].strip().strip('"')).suffix.lower() in IMAGE_EXTENSIONS


def _check_quotes(row: list[str], path: Path, start: int, end: int, delim: str, img_col: int,
                  at_eof: bool) -> None:
    """DataError (one line, naming the file and line) for a row that a quote left open has made
    swallow other rows. Python's csv reader (like Excel's) reads a field that opens with `"` up to
    the next `"`, across newlines, and at the end of the file without complaint: one stray quote
    turns the rest of the file into one caption. Quoted captions that really hold a newline stay
    legal; refused is a field that spans more than MAX_FIELD_LINES lines, holds a line that looks
    like a row of the file (an image path, the separator), or runs to the end of the file."""
    for field in row:
        if "\n" not in field and "\r" not in field:
            continue
        inner = field.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        swallowed = sum(_looks_like_row(line, delim, img_col) for line in inner[1:])
        open_at_eof = at_eof and field.endswith(("\n", "\r"))
        if end - start + 1 > MAX_FIELD_LINES or swallowed or open_at_eof:
            until = "the end of the file" if open_at_eof else f"line {end}"
            raise DataError(
                f"{path}: line {start}: a quote (\") opened in this row is not closed until {until}: one "
                f"{len(field):,}-character field spans {end - start + 1} lines"
                + (f" and swallows {swallowed} row(s) that name images" if swallowed else "")
                + "; close the quote, or write a quote inside a quoted caption as \"\"")


def load_csv_captions(path: str | Path, cfg: DataConfig | None = None) -> CaptionedImages:
    """A CSV/TSV file with a header row: image path column + caption column (separator sniffed).

    Image paths are absolute or relative to the file. Rows naming the same image are grouped into
    one image with several captions. Quoted fields may hold separators and newlines. A row with
    more fields than the header (an unquoted separator in a caption) is dropped as malformed_row.
    A quote left open (it would swallow the rows after it into one caption) is refused with a
    DataError naming the file and line (`_check_quotes`).
    """
    cfg = cfg or DataConfig()
    path = Path(path)
    if path.is_dir():
        path = metadata_file(path, ".csv")
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: empty file")
    delim = sniff_delimiter(text, path, cfg.image_column, cfg.caption_column)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    entries: list[Entry] = []
    try:
        header = next(reader)
        img_col = header.index(_pick_column(header, cfg.image_column, IMAGE_COLUMNS, "image", "image_column", path))
        cap_col = header.index(_pick_column(header, cfg.caption_column, CAPTION_COLUMNS, "caption",
                                            "caption_column", path))
        end = reader.line_num  # physical line the previous row ended on
        n_lines = len(text.rstrip("\r\n").splitlines())  # the reader stops here when a quote runs to the end
        for row in reader:
            start, end = end + 1, reader.line_num  # the physical lines this row spans
            _check_quotes(row, path, start, end, delim, img_col, at_eof=end >= n_lines)
            if not any(c.strip() for c in row):
                continue  # blank line
            where = f"{path}:{start}"
            cell = row[img_col].strip() if img_col < len(row) else ""
            image = image_path(cell, path.parent) if cell else None
            if len(row) > len(header):
                entries.append(Entry(image, f"{len(row)} fields, the header has {len(header)}", where,
                                      reason="malformed_row"))
                continue
            entries.append(Entry(image, row[cap_col] if cap_col < len(row) else None, where))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: {e}") from None
    return group_entries(entries, f"csv:{path}", path)


def csv_row_lines(path: str | Path, cfg: DataConfig | None = None) -> tuple[Path, int]:
    """(the CSV file, how many of its physical lines look like rows: an image path with an image
    extension in the image column, then the separator). `clipft validate` checks the rows read
    against it, so no reader can lose rows of the file unseen. A path without an image extension is
    not counted (the count is a lower bound)."""
    cfg = cfg or DataConfig()
    path = Path(path)
    if path.is_dir():
        path = metadata_file(path, ".csv")
    text = read_text(path)
    delim = sniff_delimiter(text, path, cfg.image_column, cfg.caption_column)
    header = next(csv.reader([text.split("\n", 1)[0].rstrip("\r")], delimiter=delim))
    img_col = header.index(_pick_column(header, cfg.image_column, IMAGE_COLUMNS, "image", "image_column", path))
    return path, sum(_looks_like_row(line, delim, img_col) for line in text.splitlines()[1:])


def load_jsonl_captions(path: str | Path, cfg: DataConfig | None = None) -> CaptionedImages:
    """JSON Lines: one object per line with an image key (image / file_name / filepath ...) and a
    caption key (caption / text, a string, or captions: a list of strings). A directory means its
    metadata.jsonl (the HuggingFace imagefolder convention: file_name relative to that file)."""
    cfg = cfg or DataConfig()
    path = Path(path)
    if path.is_dir():
        path = metadata_file(path, ".jsonl")
    text = read_text(path)
    objs: list[tuple[int, dict]] = []
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {i}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {i}: expected a JSON object, got a JSON {type(obj).__name__}")
        objs.append((i, obj))
    if not objs:
        raise DataError(f"{path}: no JSON objects (empty file)")
    keys = list(dict.fromkeys(k for _, o in objs for k in o))
    img_key = _pick_column(keys, cfg.image_column, IMAGE_COLUMNS, "image", "image_column", path, noun="key")
    cap_key = _pick_column(keys, cfg.caption_column, CAPTION_COLUMNS, "caption", "caption_column", path,
                           noun="key")
    entries: list[Entry] = []
    for i, obj in objs:
        where = f"{path}:{i}"
        cell = obj.get(img_key)
        image = image_path(cell.strip(), path.parent) if isinstance(cell, str) and cell.strip() else None
        cap = obj.get(cap_key)
        if isinstance(cap, list):
            entries.extend(Entry(image, c, where) for c in cap)
            if not cap:
                entries.append(Entry(image, None, where))  # "captions": [] -> counted as missing
        else:
            entries.append(Entry(image, cap, where))
    return group_entries(entries, f"jsonl:{path}", path)
