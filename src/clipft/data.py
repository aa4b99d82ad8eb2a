"""Captioned-image datasets: one format-independent interface, lazy image loading, collation.

Every on-disk format is read by a loader that returns a `CaptionedImages` (a list of images,
each with its captions):
  coco    ROOT/annotations/captions_{split}2014.json + ROOT/{split}2014/ (the layout has its splits)
  csv     a CSV or TSV file (separator sniffed): an image-path column and a caption column
  jsonl   one JSON object per line with an image key and caption/text/captions (also a directory
          holding a HuggingFace imagefolder `metadata.jsonl`)
  folder  a directory of images, each with a same-stem .txt holding one caption per line
`detect_format` picks the format from what the path is; `load_split` loads one split. The file
formats have no split of their own: validation is a second path (`data.val_path`) or a seeded
fraction of the images (`data.val_fraction`). Nothing downstream (text-embedding cache, training,
evaluation) sees the format.

Loaders validate annotations up front and raise `DataError("PATH: problem")`, but never open
image files: images are decoded lazily by the datasets, and an unreadable one becomes a `None`
item that `collate_skip` drops and counts, so one bad JPEG never stops a run. Captions that are
empty, whitespace-only, placeholders ("None", "NA", ...) or otherwise unusable are dropped while
loading and counted by reason in `CaptionedImages.caption_problems` (what `clipft validate` reports).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from .config import Config, ConfigError, DataConfig

log = logging.getLogger(__name__)


class DataError(Exception):
    """Bad dataset input. The message is one line: the offending path, then the problem."""


@dataclass
class ImageRecord:
    image_id: int
    path: Path
    captions: list[str]
    caption_ids: list[int]


@dataclass
class CaptionedImages:
    """One split, format-independent. Flat caption order = image order, then caption order."""

    images: list[ImageRecord]
    name: str  # e.g. "coco:/data/coco:val"; identifies the split in logs and caches
    dropped_images: int = 0  # images in the annotations that had no usable caption
    dropped_captions: int = 0  # captions dropped while loading (sum of caption_problems)
    # reason -> number of dropped captions: empty, whitespace, placeholder, missing, not_text,
    # malformed_row, no_image_path, not_utf8, no_image (a .txt without its image)
    caption_problems: dict[str, int] = field(default_factory=dict)
    # reason (a caption_problems key, or "image_without_caption") -> a few "where: what" strings
    examples: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def captions(self) -> list[str]:
        return [c for rec in self.images for c in rec.captions]

    @property
    def caption_ids(self) -> list[int]:
        return [c for rec in self.images for c in rec.caption_ids]

    @property
    def image_ids(self) -> list[int]:
        return [rec.image_id for rec in self.images]

    @property
    def caption_to_image(self) -> torch.Tensor:
        """Row index into `images` of every flat caption: LongTensor [M]."""
        counts = torch.tensor([len(rec.captions) for rec in self.images], dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(self.images)), counts)

    def caption_offsets(self) -> torch.Tensor:
        """LongTensor [N+1]: image i owns flat captions offsets[i]:offsets[i+1]."""
        counts = torch.tensor([len(rec.captions) for rec in self.images], dtype=torch.long)
        return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])

    def subset(self, n: int, seed: int) -> "CaptionedImages":
        """n images drawn with random.Random(seed), kept in their original order.

        n <= 0 or n >= len(self) returns self unchanged.
        """
        if n <= 0 or n >= len(self.images):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.images)), n))
        return self.select(keep, f"{self.name}:subset={n},seed={seed}")

    def select(self, rows: Sequence[int], name: str) -> "CaptionedImages":
        """The images at `rows` (in that order) under a new name; drop counts are kept."""
        return CaptionedImages(images=[self.images[i] for i in rows], name=name,
                               dropped_images=self.dropped_images, dropped_captions=self.dropped_captions,
                               caption_problems=dict(self.caption_problems),
                               examples={k: list(v) for k, v in self.examples.items()})

    def split_by_image(self, val_fraction: float, seed: int) -> tuple["CaptionedImages", "CaptionedImages"]:
        """(train, val): round(N * val_fraction) images (at least 1, and at least 1 left for train)
        drawn with random.Random(seed) go to val with ALL their captions; both keep file order."""
        n = len(self.images)
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"{self.name}: data.val_fraction must be in [0, 1), got {val_fraction}")
        n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
        val_rows = set(random.Random(seed).sample(range(n), n_val))
        train = [i for i in range(n) if i not in val_rows]
        tag = f"val_fraction={val_fraction},seed={seed}"
        return (self.select(train, f"{self.name}:train({tag})"),
                self.select(sorted(val_rows), f"{self.name}:val({tag})"))


# --------------------------------------------------------------------------- captions

# Strings that mean "no caption" in exported tables (pandas NA spellings, JSON/Python nulls).
PLACEHOLDER_CAPTIONS = frozenset({"none", "null", "nil", "na", "n/a", "nan", "<na>", "undefined"})
MAX_EXAMPLES = 5  # problem examples kept per reason


def caption_problem(value: Any) -> str | None:
    """Why a caption value is unusable, or None if it is a real caption.

    "missing" (None: an absent cell / JSON null), "not_text" (a number, a dict...), "empty",
    "whitespace" (only whitespace), "placeholder" ("None", "null", "NA", "nan", ... any case).
    """
    if value is None:
        return "missing"
    if not isinstance(value, str):
        return "not_text"
    if value == "":
        return "empty"
    stripped = value.strip()
    if not stripped:
        return "whitespace"
    if stripped.lower() in PLACEHOLDER_CAPTIONS:
        return "placeholder"
    return None


def _note(problems: dict[str, int], examples: dict[str, list[str]], reason: str, example: str,
          n: int = 1) -> None:
    problems[reason] = problems.get(reason, 0) + n
    ex = examples.setdefault(reason, [])
    if len(ex) < MAX_EXAMPLES:
        ex.append(example)


def _log_drops(where: Path | str, ds: "CaptionedImages") -> None:
    if ds.dropped_images or ds.dropped_captions:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(ds.caption_problems.items()))
        log.warning("%s: dropped %d image(s) without captions and %d caption(s)%s (run `clipft validate` "
                    "for details)", where, ds.dropped_images, ds.dropped_captions,
                    f" ({reasons})" if reasons else "")


# --------------------------------------------------------------------------- COCO 2014


def coco_annotation_path(root: str | Path, split: str) -> Path:
    """ROOT/annotations/captions_{split}2014.json"""
    return Path(root) / "annotations" / f"captions_{split}2014.json"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def load_coco_captions(root: str | Path, split: str) -> CaptionedImages:
    """Parse and validate ROOT/annotations/captions_{split}2014.json; images in ROOT/{split}2014/.

    Images are ordered by image id, captions by annotation id (independent of file order).
    Caption whitespace is stripped; empty captions and images left without captions are
    dropped and counted. Image files are not opened here.
    """
    root = Path(root)
    path = coco_annotation_path(root, split)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is a JSON {type(data).__name__}, expected an object "
                        "with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if key not in data:
            raise DataError(f"{path}: missing '{key}' list")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: '{key}' is a JSON {type(data[key]).__name__}, expected a list")

    files: dict[int, str] = {}
    for k, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: images[{k}] is not an object")
        if not _is_int(entry.get("id")):
            raise DataError(f"{path}: images[{k}] has no integer 'id' (got {entry.get('id')!r})")
        if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            raise DataError(f"{path}: images[{k}] (id {entry['id']}) has no string 'file_name'")
        if entry["id"] in files:
            raise DataError(f"{path}: images[{k}]: duplicate image id {entry['id']}")
        files[entry["id"]] = entry["file_name"]

    per_image: dict[int, list[tuple[int, str]]] = {i: [] for i in files}
    seen_ids: set[int] = set()
    problems: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{k}] is not an object")
        for key in ("id", "image_id", "caption"):
            if key not in ann:
                raise DataError(f"{path}: annotations[{k}] has no '{key}'")
        if not _is_int(ann["id"]):
            raise DataError(f"{path}: annotations[{k}]: 'id' is not an integer (got {ann['id']!r})")
        if ann["id"] in seen_ids:
            raise DataError(f"{path}: annotations[{k}]: duplicate annotation id {ann['id']}")
        seen_ids.add(ann["id"])
        if not _is_int(ann["image_id"]) or ann["image_id"] not in per_image:
            raise DataError(f"{path}: annotations[{k}] (id {ann['id']}): image_id "
                            f"{ann['image_id']!r} is not in 'images'")
        if not isinstance(ann["caption"], str):
            raise DataError(f"{path}: annotations[{k}] (id {ann['id']}): caption is a "
                            f"{type(ann['caption']).__name__}, expected a string")
        reason = caption_problem(ann["caption"])
        if reason is not None:
            _note(problems, examples, reason, f"annotation id {ann['id']}: {ann['caption']!r}")
            continue
        per_image[ann["image_id"]].append((ann["id"], ann["caption"].strip()))

    img_dir = root / f"{split}2014"
    if files and not img_dir.is_dir():
        raise DataError(f"{img_dir}: image directory not found (annotations: {path})")
    images, dropped_images = [], 0
    for image_id in sorted(per_image):
        caps = sorted(per_image[image_id])
        if not caps:
            dropped_images += 1
            _note({}, examples, "image_without_caption", str(img_dir / files[image_id]))
            continue
        images.append(ImageRecord(image_id=image_id, path=img_dir / files[image_id],
                                  captions=[c for _, c in caps], caption_ids=[i for i, _ in caps]))
    if not images:
        raise DataError(f"{path}: no image has a caption")
    out = CaptionedImages(images=images, name=f"coco:{root}:{split}", dropped_images=dropped_images,
                          dropped_captions=sum(problems.values()), caption_problems=problems,
                          examples=examples)
    _log_drops(path, out)
    return out


# --------------------------------------------------------------------------- CSV / TSV, JSONL, folder

# Auto-detected column (CSV header) / key (JSONL) names, first match wins, case-insensitive.
IMAGE_COLUMNS = ("filepath", "image", "file_name", "filename", "image_path", "path", "file", "img")
CAPTION_COLUMNS = ("caption", "text", "captions", "sentence", "description")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CSV_DELIMITERS = ("\t", ",", ";", "|")  # tried in this order


@dataclass
class _Entry:
    """One caption as found on disk, before cleaning and grouping."""
    image: Path | None  # normalised image path; None when the row names no image
    caption: Any  # the raw value: str, None (absent), or anything a JSON file holds
    where: str  # "file:line", for messages
    reason: str | None = None  # a problem found while parsing (malformed_row, not_utf8, no_image)


def _image_path(cell: str, base: Path) -> Path:
    """An image path as written in a data file: absolute, or relative to the file's directory."""
    p = Path(cell).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _group(entries: list[_Entry], name: str, source: Path,
           extra_images: Sequence[Path] = ()) -> CaptionedImages:
    """Entries -> CaptionedImages. All captions naming one image path form one image.

    Images are ordered by path and image_id is the position among all image paths seen (also those
    left without a usable caption), so ids are stable for an unchanged file. caption_id is the
    position of the entry in the file; captions keep file order. Unusable captions are dropped and
    counted by reason. extra_images: images known to exist but named by no entry (folder format).
    """
    problems: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    per_image: dict[Path, list[tuple[int, str]]] = {p: [] for p in extra_images}
    for cid, e in enumerate(entries):
        reason = e.reason or ("no_image_path" if e.image is None else caption_problem(e.caption))
        if reason is not None:
            _note(problems, examples, reason, f"{e.where}: {e.caption!r}")
            if e.image is not None:
                per_image.setdefault(e.image, [])
            continue
        per_image.setdefault(e.image, []).append((cid, e.caption.strip()))
    images, dropped_images = [], 0
    for image_id, path in enumerate(sorted(per_image, key=lambda p: p.as_posix())):
        caps = per_image[path]
        if not caps:
            dropped_images += 1
            _note({}, examples, "image_without_caption", str(path))
            continue
        images.append(ImageRecord(image_id=image_id, path=path, captions=[c for _, c in caps],
                                  caption_ids=[i for i, _ in caps]))
    out = CaptionedImages(images=images, name=name, dropped_images=dropped_images,
                          dropped_captions=sum(problems.values()), caption_problems=problems,
                          examples=examples)
    if not images:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(problems.items()))
        raise DataError(f"{source}: no image has a usable caption ({len(entries)} caption entries"
                        + (f"; dropped: {reasons}" if reasons else "") + ")")
    _log_drops(source, out)
    return out


def _read_text(path: Path) -> str:
    """A whole text file as str (UTF-8, BOM tolerated), or DataError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (line {line}, byte offset {e.start}); re-save it as UTF-8") from None


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


def load_csv_captions(path: str | Path, cfg: DataConfig | None = None) -> CaptionedImages:
    """A CSV/TSV file with a header row: image path column + caption column (separator sniffed).

    Image paths are absolute or relative to the file. Rows naming the same image are grouped into
    one image with several captions. Quoted fields may hold separators and newlines. A row with
    more fields than the header (an unquoted separator in a caption) is dropped as malformed_row.
    """
    cfg = cfg or DataConfig()
    path = Path(path)
    if path.is_dir():
        path = _metadata_file(path, ".csv")
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: empty file")
    delim = sniff_delimiter(text, path, cfg.image_column, cfg.caption_column)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    entries: list[_Entry] = []
    try:
        header = next(reader)
        img_col = header.index(_pick_column(header, cfg.image_column, IMAGE_COLUMNS, "image", "image_column", path))
        cap_col = header.index(_pick_column(header, cfg.caption_column, CAPTION_COLUMNS, "caption",
                                            "caption_column", path))
        for row in reader:
            if not any(c.strip() for c in row):
                continue  # blank line
            where = f"{path}:{reader.line_num}"
            cell = row[img_col].strip() if img_col < len(row) else ""
            image = _image_path(cell, path.parent) if cell else None
            if len(row) > len(header):
                entries.append(_Entry(image, f"{len(row)} fields, the header has {len(header)}", where,
                                      reason="malformed_row"))
                continue
            entries.append(_Entry(image, row[cap_col] if cap_col < len(row) else None, where))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: {e}") from None
    return _group(entries, f"csv:{path}", path)


def load_jsonl_captions(path: str | Path, cfg: DataConfig | None = None) -> CaptionedImages:
    """JSON Lines: one object per line with an image key (image / file_name / filepath ...) and a
    caption key (caption / text, a string, or captions: a list of strings). A directory means its
    metadata.jsonl (the HuggingFace imagefolder convention: file_name relative to that file)."""
    cfg = cfg or DataConfig()
    path = Path(path)
    if path.is_dir():
        path = _metadata_file(path, ".jsonl")
    text = _read_text(path)
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
    entries: list[_Entry] = []
    for i, obj in objs:
        where = f"{path}:{i}"
        cell = obj.get(img_key)
        image = _image_path(cell.strip(), path.parent) if isinstance(cell, str) and cell.strip() else None
        cap = obj.get(cap_key)
        if isinstance(cap, list):
            entries.extend(_Entry(image, c, where) for c in cap)
            if not cap:
                entries.append(_Entry(image, None, where))  # "captions": [] -> counted as missing
        else:
            entries.append(_Entry(image, cap, where))
    return _group(entries, f"jsonl:{path}", path)


def _walk_files(root: Path):
    """Every file under root, sorted, hidden files and directories skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                yield Path(dirpath) / f


def load_folder_captions(root: str | Path, cfg: DataConfig | None = None) -> CaptionedImages:
    """A directory tree of images (sub-folders walked), each with a same-stem .txt beside it holding
    one caption per line. Images without a .txt and .txt files without an image are counted."""
    root = Path(root)
    images: list[Path] = []
    texts: dict[Path, Path] = {}  # path without suffix -> .txt file
    for p in _walk_files(root):
        ext = p.suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            images.append(p)
        elif ext == ".txt":
            texts[p.with_suffix("")] = p
    if not images:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in the folder or "
                        "its sub-folders")

    def lines_of(txt: Path) -> list[str] | None:
        try:
            return txt.read_bytes().decode("utf-8-sig").splitlines()
        except UnicodeDecodeError:
            return None
        except OSError:
            return None

    entries: list[_Entry] = []
    used: set[Path] = set()
    for img in images:
        txt = texts.get(img.with_suffix(""))
        if txt is None:
            continue  # stays in extra_images: an image without captions
        used.add(txt)
        lines = lines_of(txt)
        if lines is None:
            entries.append(_Entry(img, None, str(txt), reason="not_utf8"))
            continue
        entries.extend(_Entry(img, line, f"{txt}:{k}") for k, line in enumerate(lines, 1))
    for txt in texts.values():
        if txt not in used:
            lines = lines_of(txt) or []
            entries.extend(_Entry(None, line, f"{txt}:{k}", reason="no_image") for k, line in enumerate(lines, 1)
                           if line.strip())
    return _group(entries, f"folder:{root}", root, extra_images=images)


# --------------------------------------------------------------------------- dispatch

FORMATS = ("coco", "csv", "jsonl", "folder")
_FORMAT_ALIASES = {"tsv": "csv"}
# format name -> loader(path, cfg) of a whole dataset (COCO is split-aware: load_coco_captions).
_LOADERS: dict[str, Callable[[Path, DataConfig], CaptionedImages]] = {
    "csv": load_csv_captions, "jsonl": load_jsonl_captions, "folder": load_folder_captions}


def _metadata_file(path: Path, suffix: str | None = None) -> Path:
    """DIR/metadata.jsonl or DIR/metadata.csv (the HuggingFace imagefolder convention)."""
    for name in ("metadata.jsonl", "metadata.csv"):
        if (path / name).is_file() and (suffix is None or name.endswith(suffix)):
            return path / name
    raise DataError(f"{path}: directory has no metadata{suffix or '.jsonl'} file")


def detect_format(path: str | Path) -> str:
    """The dataset format of `path`: "coco" (a dir with annotations/captions_*2014.json), "jsonl" /
    "csv" (a .jsonl/.ndjson or .csv/.tsv file, or a dir with metadata.jsonl/.csv), "folder" (a dir
    with image files)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data path not found")
    if path.is_dir():
        if any((path / "annotations").glob("captions_*2014.json")):
            return "coco"
        try:
            return "jsonl" if _metadata_file(path).suffix == ".jsonl" else "csv"
        except DataError:
            pass
        if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in _walk_files(path)):
            return "folder"
        raise DataError(f"{path}: unrecognised dataset layout (expected a COCO 2014 directory with "
                        "annotations/captions_<split>2014.json, a metadata.jsonl, or image files with "
                        "same-stem .txt captions)")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise DataError(f"{path}: unrecognised data file type {suffix or '(no extension)'!r} (expected .csv, "
                    ".tsv or .jsonl; or force one with --set data.format=csv|jsonl)")


def resolve_format(path: str | Path, cfg: DataConfig) -> str:
    """cfg.format, or the format detected from `path` when it is "auto"."""
    fmt = _FORMAT_ALIASES.get(cfg.format, cfg.format)
    if fmt == "auto":
        return detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown data format {cfg.format!r} (known: auto, {', '.join(FORMATS)}, tsv)")
    if not Path(path).exists():
        raise DataError(f"{path}: data path not found")
    return fmt


def load_dataset(path: str | Path, cfg: DataConfig | None = None) -> CaptionedImages:
    """Every captioned image of a CSV/TSV, JSONL or folder dataset: no split, no subset."""
    cfg = cfg or DataConfig()
    fmt = resolve_format(path, cfg)
    if fmt == "coco":
        raise DataError(f"{path}: a COCO directory has its own splits; use load_split(root, split, cfg)")
    return _LOADERS[fmt](Path(path), cfg)


@dataclass(frozen=True)
class SplitSource:
    """Where one split comes from."""
    path: Path  # --data, or data.val_path for the validation split
    format: str
    part: str  # COCO: the split name; else "all" (the whole file) or "train"/"val" (of val_fraction)


def split_source(root: str | Path, split: str, cfg: DataConfig) -> SplitSource:
    """Resolve a split name to its path and part.

    The validation split comes from cfg.val_path when that is set (the whole of it, or its own
    `split` for a COCO directory). A COCO root keeps its layout. For the other formats, split
    cfg.train_split / cfg.val_split is the train / val part of the val_fraction split (the whole
    file for train when val_path is set), and "all" is the whole file.
    """
    root = Path(root)
    if cfg.val_path and split == cfg.val_split:
        src = Path(cfg.val_path)
        fmt = resolve_format(src, cfg)
        return SplitSource(src, fmt, split if fmt == "coco" else "all")
    fmt = resolve_format(root, cfg)
    if fmt == "coco":
        return SplitSource(root, fmt, split)
    if split == "all" or (cfg.val_path and split == cfg.train_split):
        return SplitSource(root, fmt, "all")
    if split == cfg.train_split:
        return SplitSource(root, fmt, "train")
    if split == cfg.val_split:
        return SplitSource(root, fmt, "val")
    raise DataError(f"{root}: a {fmt} dataset has no split {split!r} (use {cfg.train_split!r}, "
                    f"{cfg.val_split!r} or 'all')")


def subset_size(split: str, cfg: DataConfig) -> int:
    """Images `load_split` keeps of `split`: data.train_images / data.val_images (0 = all)."""
    return cfg.train_images if split == cfg.train_split else cfg.val_images if split == cfg.val_split else 0


def load_split(root: str | Path, split: str, cfg: DataConfig) -> CaptionedImages:
    """Load one split (see `split_source`) and apply the configured subset.

    The subset size is cfg.train_images when split == cfg.train_split, cfg.val_images when
    split == cfg.val_split (0 = all), drawn with cfg.subset_seed.
    """
    src = split_source(root, split, cfg)
    if src.format == "coco":
        full = load_coco_captions(src.path, src.part)
    else:
        whole = _LOADERS[src.format](src.path, cfg)
        full = whole
        if src.part == "val" and cfg.val_fraction <= 0:
            raise DataError(f"{src.path}: no validation data: pass --val-data PATH (data.val_path) or set "
                            "data.val_fraction > 0")
        if src.part in ("train", "val") and cfg.val_fraction > 0:
            train, val = whole.split_by_image(cfg.val_fraction, cfg.subset_seed)
            if len(val) == 0:
                raise DataError(f"{src.path}: only {len(whole)} captioned image(s): too few to split off a "
                                "validation set; pass --val-data PATH")
            full = train if src.part == "train" else val
    out = full.subset(subset_size(split, cfg), cfg.subset_seed)
    log.info("%s: %d images, %d captions%s", full.name, len(out), len(out.caption_ids),
             f" (subset of {len(full)})" if out is not full else "")
    return out


def cache_location(root: str | Path, split: str, cfg: Config) -> tuple[Path, str]:
    """(cache directory, name) for the caches of a split (text embeddings, prepared images).

    The directory is text.cache_dir, by default ROOT/cache for a COCO or folder dataset and
    <directory of the file>/cache for a CSV/JSONL file. The name is the split (COCO) or
    '<file stem>-<part>', part = train / val / all, so two files in one folder never share a cache.
    """
    src = split_source(root, split, cfg.data)
    if src.format == "coco":
        default_dir, name = src.path / "cache", split
    else:
        is_dir = src.path.is_dir()
        default_dir = (src.path if is_dir else src.path.parent) / "cache"
        name = f"{src.path.name if is_dir else src.path.stem}-{src.part}"
    return (Path(cfg.text.cache_dir) if cfg.text.cache_dir else default_dir), name


def text_cache_file(root: str | Path, split: str, cfg: Config) -> Path:
    """The text-embedding cache file of a split (see `cache_location`). Its fingerprint covers the
    captions, so a changed file or split is re-embedded. A seeded subset (data.train_images /
    data.val_images > 0) gets its own file, named after its size and seed: runs on different
    subsets of one split keep their caches instead of re-embedding each other's."""
    from .text import text_cache_path
    return text_cache_path(*text_cache_location(root, split, cfg), cfg.text.encoder)


def text_cache_location(root: str | Path, split: str, cfg: Config) -> tuple[Path, str]:
    """`cache_location`, with the subset (if any) in the name: '<name>-subset<N>-seed<S>'."""
    cache_dir, name = cache_location(root, split, cfg)
    n = subset_size(split, cfg.data)
    return cache_dir, (f"{name}-subset{n}-seed{cfg.data.subset_seed}" if n > 0 else name)


# --------------------------------------------------------------------------- images

_warned: set[str] = set()  # per process: DataLoader workers each warn at most once per path


def _warn_once(path: Path, reason: str) -> None:
    key = str(path)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s: skipping image (%s)", path, reason)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited onto white, high bit depths scaled."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        # 16/32-bit grey (e.g. 16-bit PNG): PIL's own convert clips instead of rescaling.
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif arr.size and np.nanmax(arr) > 255:
            arr = arr * (255.0 / 65535.0)
        arr = np.nan_to_num(np.clip(arr, 0, 255)).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")  # 2-D uint8 -> "L"
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def load_image(path: str | Path, draft_size: int | None = None, warn: bool = True
               ) -> tuple[Image.Image | None, str | None]:
    """Decode an image as RGB: (image, None), or (None, reason) if it cannot be used.

    reason is "missing", "unreadable: ...", "truncated: ..." or "undecodable: ...". The format is
    sniffed from the content, not the extension. With draft_size, JPEGs are decoded at the
    smallest DCT scale whose sides are still >= draft_size (much faster for big photos).
    Each bad path is logged once per process (unless warn=False: `clipft validate` reports them).
    """
    path = Path(path)
    try:
        # Open the file ourselves: closing a PIL-owned handle would also destroy the pixels.
        with open(path, "rb") as f:
            im = Image.open(f)
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
        rgb = _to_rgb(im)
    except FileNotFoundError:
        reason = "missing"
    except (PermissionError, IsADirectoryError) as e:
        reason = f"unreadable: {e.strerror or e}"
    except Image.DecompressionBombError as e:
        reason = f"undecodable: {e}"
    except UnidentifiedImageError:
        reason = "undecodable: not a recognised image format"
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        msg = str(e) or type(e).__name__
        low = msg.lower()
        kind = "truncated" if ("truncated" in low or "broken data stream" in low
                               or isinstance(e, EOFError)) else "undecodable"
        reason = f"{kind}: {msg}"
    else:
        return rgb, None
    if warn:
        _warn_once(path, reason)
    return None, reason


def build_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    train: bool = False, augment: bool = False, flip: bool = True,
                    color_jitter: float = 0.0, output: str = "float") -> T.Compose:
    """PIL RGB image -> normalised float tensor [3, image_size, image_size], or with
    output="uint8" the raw pixels [image_size, image_size, 3] uint8: training then normalises whole
    batches on the device (`prepare.DeviceTransform`), so workers skip the per-image float work and
    4x fewer bytes cross to the GPU.

    eval (and train without augment): the centre square, resized to image_size (bicubic, antialiased),
    in one pass (`CenterSquareResize`).
    train with augment: RandomResizedCrop(scale 0.5-1) + horizontal flip (unless flip=False; the
    caption-aware flip of data.flip=swap happens in TrainDataset instead).
    train with color_jitter=s > 0: ColorJitter(brightness=s, contrast=s, saturation=s), no hue
    jitter: captions name colours ("a red square"), and a hue shift would make them false.
    """
    if train and augment:
        geometry = [T.RandomResizedCrop(image_size, scale=(0.5, 1.0),
                                        interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
        if flip:  # plain flip: "left"/"right" in a caption become wrong (see data.flip=swap)
            geometry.append(T.RandomHorizontalFlip())
    else:
        geometry = [CenterSquareResize(image_size)]
    if color_jitter < 0:
        raise ConfigError(f"data.color_jitter must be >= 0, got {color_jitter}")
    photometric = [T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)] \
        if train and color_jitter > 0 else []
    if output == "uint8":
        return T.Compose(geometry + photometric + [_to_uint8_hwc])
    return T.Compose(geometry + photometric + [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


class CenterSquareResize:
    """PIL image -> its centre square (side = short side) resized to size x size, bicubic with
    antialiasing: the picture of Resize(size) + CenterCrop(size), in one resampling pass that only
    computes the kept pixels (Pillow's `resize(box=...)`). For a 320x240 draft-decoded COCO photo
    that is 0.75x the work of resizing the whole image first, and one pass instead of two."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2  # fractional: Pillow resamples sub-pixel boxes exactly
        return img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + side, top + side),
                          reducing_gap=None)

    def __repr__(self) -> str:
        return f"CenterSquareResize(size={self.size})"


def _to_uint8_hwc(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 [H, W, 3] tensor (a copy of the pixel buffer, no float conversion)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


# --------------------------------------------------------------------------- left/right-aware flips

FLIP_MODES = ("plain", "swap", "off")
# "left"/"right" as whole words, with the suffixes that keep the meaning directional
# (leftmost, rightward(s), lefthand; "left-hand" matches at the hyphen).
_LEFT_RIGHT = re.compile(r"\b(left|right)(most|wards?|hand(ed)?)?\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """The caption of the mirrored image: every left <-> right swapped, keeping case
    ("Left" -> "Right", "LEFTMOST" -> "RIGHTMOST"). Non-directional senses ("right now", "he
    left") are swapped too: a known, rare imprecision."""
    def repl(m: re.Match) -> str:
        word = m.group(1)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + (m.group(2) or "")
    return _LEFT_RIGHT.sub(repl, caption)


def left_right_captions(captions: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """Which captions change under a horizontal flip, and how.

    Returns (flip_row [M] LongTensor: row in the swapped list for caption j, or -1 if caption j
    does not mention left/right; swapped [K] the swapped captions of those K, in caption order).
    """
    rows, swapped = [], []
    for c in captions:
        if _LEFT_RIGHT.search(c):
            rows.append(len(swapped))
            swapped.append(swap_left_right(c))
        else:
            rows.append(-1)
    return torch.tensor(rows, dtype=torch.long), swapped


# --------------------------------------------------------------------------- datasets

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """Stateless 64-bit hash of a few ints (splitmix64 rounds): same value in every process."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


def epoch_caption_index(offsets: Sequence[int], seed: int, epoch: int, i: int) -> int:
    """The flat caption index image i uses in `epoch`: a pure function of (seed, epoch, i), so it is
    the same in every DataLoader worker, after a resume, and for every image source (JPEG or
    prepared cache). Image i owns captions offsets[i]:offsets[i+1]."""
    start, end = offsets[i], offsets[i + 1]
    return start + _mix(seed, epoch, i) % (end - start)


class TrainDataset(Dataset):
    """(image [3,H,W], text embedding [D] of one of its captions, image row) per image.

    The caption is a pure function of (seed, epoch, i), so it is reproducible and identical
    whether items are loaded in the main process or in DataLoader workers. set_epoch must be
    called before the DataLoader is iterated; with persistent_workers=True the workers keep
    the dataset copy (and epoch) they started with, so do not combine the two.

    With `flip_embeds` / `flip_rows` (data.flip=swap, see `left_right_captions`) the dataset
    mirrors half of the images itself (also a pure function of (seed, epoch, i)) and, when the
    chosen caption mentions left/right, returns the embedding of its swapped version, so the
    caption stays true for the flipped image.
    """

    def __init__(self, split: CaptionedImages, text_embeds: torch.Tensor, transform: Callable,
                 seed: int = 0, draft_size: int | None = None, flip_embeds: torch.Tensor | None = None,
                 flip_rows: torch.Tensor | None = None):
        offsets = split.caption_offsets()  # [N+1]
        if text_embeds.ndim != 2 or text_embeds.shape[0] != int(offsets[-1]):
            raise ValueError(f"{split.name}: text_embeds must be [{int(offsets[-1])}, D] (one row per "
                             f"caption), got {tuple(text_embeds.shape)}")
        if (flip_embeds is None) != (flip_rows is None) or (
                flip_rows is not None and flip_rows.shape != (text_embeds.shape[0],)):
            raise ValueError(f"{split.name}: flip_embeds [K, D] and flip_rows [M] come together, one row per caption")
        self.paths = [rec.path for rec in split.images]
        self.offsets = offsets.tolist()  # plain ints: cheap to index, cheap to pickle to workers
        self.text_embeds = text_embeds  # [M, D]
        self.flip_embeds = flip_embeds  # [K, D] embeddings of the left/right-swapped captions
        self.flip_rows = flip_rows  # [M] row in flip_embeds, -1 = caption has no left/right
        self.transform = transform
        self.seed = seed
        self.draft_size = draft_size
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption_index(self, i: int) -> int:
        """Flat caption index used for image i in the current epoch."""
        return epoch_caption_index(self.offsets, self.seed, self.epoch, i)

    def flipped(self, i: int) -> bool:
        """Whether image i is mirrored in the current epoch (caption-aware flips only)."""
        return self.flip_rows is not None and _mix(self.seed, self.epoch, i, 0xF11B) & 1 == 1

    def __getitem__(self, i: int):
        img, _reason = load_image(self.paths[i], self.draft_size)
        if img is None:
            return None
        j = self.caption_index(i)
        text = self.text_embeds[j]
        if self.flipped(i):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            row = int(self.flip_rows[j])
            if row >= 0:
                text = self.flip_embeds[row]
        # clone: a view would drag the whole [M, D] storage through worker shared memory
        return self.transform(img), text.clone(), i


class EvalImageDataset(Dataset):
    """(image [3,H,W], image row) for every image once; captions come from the text cache."""

    def __init__(self, split: CaptionedImages, transform: Callable, draft_size: int | None = None):
        self.paths = [rec.path for rec in split.images]
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img, _reason = load_image(self.paths[i], self.draft_size)
        if img is None:
            return None
        return self.transform(img), i


def collate_skip(batch: list, n_fields: int = 3) -> tuple:
    """Drop None items, stack the rest; the last element is n_skipped (an int).

    TrainDataset items -> (images [B,3,H,W], texts [B,D], index [B], n_skipped)
    EvalImageDataset items -> (images [B,3,H,W], index [B], n_skipped)
    n_fields (3 for train, 2 for eval items) only matters when every item is None: the result
    is then n_fields empty tensors (first dim 0) + n_skipped. Use `collate_train` /
    `collate_eval` as DataLoader collate_fn.
    """
    items = [b for b in batch if b is not None]
    n_skipped = len(batch) - len(items)
    if not items:
        empties = [torch.empty(0) for _ in range(n_fields - 1)] + [torch.empty(0, dtype=torch.long)]
        return (*empties, n_skipped)
    fields = []
    for column in zip(*items):
        if isinstance(column[0], torch.Tensor):
            fields.append(torch.stack(column))
        else:
            fields.append(torch.tensor(column, dtype=torch.long))
    return (*fields, n_skipped)


collate_train = functools.partial(collate_skip, n_fields=3)
collate_eval = functools.partial(collate_skip, n_fields=2)
