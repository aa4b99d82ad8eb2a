"""The format-independent records every loader returns, and caption cleaning.

`CaptionedImages` is the one interface between the on-disk formats and everything downstream: a list
of `ImageRecord`s (an image path with its captions), the flat caption order the caches and metrics
use, and the counts of what was dropped while loading (what `clipft validate` reports).

The helpers below are shared by the format modules: `caption_problem` (why a caption value is
unusable), `Entry` + `group_entries` (captions as found on disk -> images with cleaned captions), and
readers that turn I/O and decoding failures into one-line `DataError`s naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..preprocess import IMAGE_EXTENSIONS  # noqa: F401 - one list for training and the search index

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
    # malformed_row, no_image_path, not_utf8, no_image (a .txt without its image), image_not_found
    # (a caption entry naming an image file the image folder does not hold)
    caption_problems: dict[str, int] = field(default_factory=dict)
    # reason (a caption_problems key, or "image_without_caption") -> a few "where: what" strings
    examples: dict[str, list[str]] = field(default_factory=dict)
    # Benchmarks with a published protocol (Flickr): the dataset ("flickr30k") and where this
    # split's image list comes from ("Karpathy", "official test list", "seeded split, seed 0");
    # `protocols.protocol_description` names the protocol from them. Empty for other formats.
    dataset: str = ""
    split_origin: str = ""

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
                               examples={k: list(v) for k, v in self.examples.items()},
                               dataset=self.dataset, split_origin=self.split_origin)

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


def note_problem(problems: dict[str, int], examples: dict[str, list[str]], reason: str, example: str,
          n: int = 1) -> None:
    problems[reason] = problems.get(reason, 0) + n
    ex = examples.setdefault(reason, [])
    if len(ex) < MAX_EXAMPLES:
        ex.append(example)


def log_drops(where: Path | str, ds: "CaptionedImages") -> None:
    if ds.dropped_images or ds.dropped_captions:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(ds.caption_problems.items()))
        log.warning("%s: dropped %d image(s) without captions and %d caption(s)%s (run `clipft validate` "
                    "for details)", where, ds.dropped_images, ds.dropped_captions,
                    f" ({reasons})" if reasons else "")


# --------------------------------------------------------------------------- shared by the format modules


@dataclass
class Entry:
    """One caption as found on disk, before cleaning and grouping."""
    image: Path | None  # normalised image path; None when the row names no image
    caption: Any  # the raw value: str, None (absent), or anything a JSON file holds
    where: str  # "file:line", for messages
    reason: str | None = None  # a problem found while parsing (malformed_row, not_utf8, no_image)


def image_path(cell: str, base: Path) -> Path:
    """An image path as written in a data file: absolute, or relative to the file's directory."""
    p = Path(cell).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def group_entries(entries: list[Entry], name: str, source: Path,
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
            note_problem(problems, examples, reason, f"{e.where}: {e.caption!r}")
            if e.image is not None:
                per_image.setdefault(e.image, [])
            continue
        per_image.setdefault(e.image, []).append((cid, e.caption.strip()))
    images, dropped_images = [], 0
    for image_id, path in enumerate(sorted(per_image, key=lambda p: p.as_posix())):
        caps = per_image[path]
        if not caps:
            dropped_images += 1
            note_problem({}, examples, "image_without_caption", str(path))
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
    log_drops(source, out)
    return out


def is_int(x: Any) -> bool:
    """A JSON integer (bool excluded: True is an int to Python, not an id)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _splits_here(path: Path) -> str:
    """For a missing COCO captions_<split>2014.json: the splits the folder does have (a --split typo)."""
    import re
    m = re.fullmatch(r"captions_(.+)2014\.json", path.name)
    if not m or not path.parent.is_dir():
        return ""
    have = sorted(re.fullmatch(r"captions_(.+)2014\.json", p.name).group(1)
                  for p in path.parent.glob("captions_*2014.json"))
    return f" (no split {m.group(1)!r} here; splits: {', '.join(have) or 'none'})"


def read_json(path: Path) -> Any:
    """A JSON annotation file, or DataError naming the file (missing, not JSON, not UTF-8, unreadable)."""
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found{_splits_here(path)}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def read_text(path: Path) -> str:
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


def walk_files(root: Path):
    """Every file under root, sorted, hidden files and directories skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                yield Path(dirpath) / f
