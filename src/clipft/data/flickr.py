"""Flickr8k and Flickr30k, as released and as the Kaggle copies lay them out.

Layouts, recognised from the folder (`--set data.format=flickr` forces the format):
  official Flickr8k   Flickr8k.token.txt (lines "NAME.jpg#N<TAB>caption"), the split lists
                      Flickr_8k.{train,dev,test}Images.txt, images in Flicker8k_Dataset/ (the zip's spelling)
  official Flickr30k  results_20130124.token (same lines), images in flickr30k-images/
  Kaggle Flickr8k     captions.txt (CSV, header "image,caption"), images in Images/
  Kaggle Flickr30k    results.csv ("image_name| comment_number| comment"), images in flickr30k_images/,
                      or flickr30k_images/flickr30k_images/ when the download root is given
Real files have quirks, and none of them stops a run: token lines separated by a space instead of a
tab are parsed; rows that cannot be parsed and caption entries whose image file is not in the image
folder (Flickr8k lists one) are dropped, counted and named (`clipft validate` shows them).

Splits, the first source found wins: Karpathy's dataset_flickr8k.json / dataset_flickr30k.json
(train / val / test; Flickr30k test = 1,000 images x 5,000 captions; captions are the file's `raw`
sentences); Flickr8k's official lists (train / dev = val / test); else a seeded split by image
(`seeded_split`: 1,000 test and 1,000 validation images, or a tenth each below 10,000 images).
The source is recorded in `CaptionedImages.split_origin`, and evaluation names the protocol from it.
"""

from __future__ import annotations

import csv
import io
import os
import random
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .karpathy import read_karpathy_split
from .records import (IMAGE_EXTENSIONS, MAX_EXAMPLES, CaptionedImages, DataError, Entry, ImageRecord, group_entries, log_drops,
                      note_problem, read_text)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
SEEDED_SPLIT_SEED = 0  # fixed, so the seeded test split is the same for every config
SEEDED_HELD_OUT = 1000  # images each for test and val in the seeded split (capped at a tenth)
FLICKR8K_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                  "test": "Flickr_8k.testImages.txt"}
LIST_WORDS = {"train": "official train list", "val": "official dev list", "test": "official test list"}
# (file name, parser, dataset it implies or "" when the image names decide)
CAPTION_FILES = (("Flickr8k.token.txt", "token", "flickr8k"), ("results_20130124.token", "token", "flickr30k"),
                 ("captions.txt", "kaggle8k", ""), ("results.csv", "kaggle30k", "flickr30k"))
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images", "Images")
# Where the caption file and the Karpathy file may sit: the root, or the folder a zip/Kaggle copy adds.
SUB_DIRS = ("", "Flickr8k_text", "flickr30k_images")


@dataclass
class FlickrLayout:
    """What `find_layout` found in a Flickr folder."""
    root: Path
    dataset: str  # "flickr8k" or "flickr30k"
    images: Path  # the folder holding the image files
    captions: Path | None = None  # the caption file (None: captions come from the Karpathy file)
    parser: str = ""  # "token", "kaggle8k" or "kaggle30k"
    karpathy: Path | None = None
    lists: dict[str, Path] = field(default_factory=dict)  # Flickr8k's official split lists


def _has_image_files(d: Path) -> bool:
    try:
        with os.scandir(d) as it:
            return any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in it)
    except OSError:
        return False


def _image_dir(root: Path) -> Path | None:
    for name in IMAGE_DIRS:
        for d in (root / name, root / name / name):  # the Kaggle Flickr30k copy nests its folder once more
            if _has_image_files(d):
                return d
    return None


def find_layout(root: str | Path) -> FlickrLayout | None:
    """The Flickr layout of `root` (see the module docstring), or None when it is not one."""
    root = Path(root)
    if not root.is_dir():
        return None
    images = _image_dir(root)
    if images is None:
        return None
    dirs = [root / s for s in SUB_DIRS if (root / s).is_dir()]
    found = next(((d / name, parser, ds) for name, parser, ds in CAPTION_FILES for d in dirs
                  if (d / name).is_file()), None)
    karpathy = next((d / f"dataset_{ds}.json" for ds in ("flickr30k", "flickr8k") for d in dirs
                     if (d / f"dataset_{ds}.json").is_file()), None)
    if found is None and karpathy is None:
        return None
    captions, parser, dataset = found if found else (None, "", "")
    if karpathy is not None:
        dataset = karpathy.stem.removeprefix("dataset_")
    elif not dataset:  # Flickr30k names are "<digits>.jpg", Flickr8k's "<digits>_<hex>.jpg"
        dataset = "flickr30k" if all(n.split(".")[0].isdigit() for n in _sample_names(images)) else "flickr8k"
    lists = {s: d / f for s, f in FLICKR8K_LISTS.items() for d in dirs if (d / f).is_file()}
    return FlickrLayout(root, dataset, images, captions, parser, karpathy, lists)


def _sample_names(images: Path, n: int = 20) -> list[str]:
    with os.scandir(images) as it:
        names = [e.name for e in it if e.name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(names)[:n]


def is_flickr(path: Path) -> bool:
    """A directory in one of the Flickr layouts (what auto-detection looks for)."""
    return find_layout(path) is not None


# --------------------------------------------------------------------------- caption files

def _token_entry(line: str) -> tuple[str, str] | str:
    """"NAME.jpg#N<TAB or space>caption" -> (NAME.jpg, caption), or why the line is malformed."""
    key, sep, caption = line.partition("\t")
    if not sep:  # some lines of the real files use a space
        key, sep, caption = line.partition(" ")
    name, hash_, n = key.strip().rpartition("#")
    if not sep or not hash_ or not n.isdigit() or not name:
        return "expected 'NAME.jpg#N', a tab and the caption"
    return name, caption


def _kaggle_rows(text: str, path: Path, delimiter: str, header: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a Kaggle caption table, after checking its header row."""
    # Kaggle's Flickr30k table puts a space after every '|'; in the comma file a space is caption text.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=delimiter == "|")
    try:
        first = [c.strip().lower() for c in next(reader, [])]
        if tuple(first) != header:
            raise DataError(f"{path}: line 1: expected the header {delimiter.join(header)!r}, got "
                            f"{delimiter.join(first)[:100]!r}")
        return [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num:,}: {e}") from None


def caption_entries(layout: FlickrLayout) -> list[Entry]:
    """Every caption entry of the layout's caption file, malformed rows and entries whose image is
    not in the image folder included (as Entries with a reason, so they are counted and named)."""
    path = layout.captions
    text = read_text(path)
    parsed: list[tuple[str, str | None, str, str | None]] = []  # (image name, caption, where, problem)
    if layout.parser == "token":
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                got = _token_entry(line.rstrip("\r"))
                parsed.append((*got, f"{path}:{i}", None) if isinstance(got, tuple) else
                              ("", f"line {i:,}: {got}", str(path), "malformed_row"))
    elif layout.parser == "kaggle8k":
        for i, row in _kaggle_rows(text, path, ",", ("image", "caption")):
            if len(row) < 2:
                parsed.append(("", f"line {i:,}: expected 2 fields separated by ','", str(path), "malformed_row"))
            else:  # an unquoted comma belongs to the caption: image names never hold one
                parsed.append((row[0].strip(), ",".join(row[1:]), f"{path}:{i}", None))
    else:
        for i, row in _kaggle_rows(text, path, "|", ("image_name", "comment_number", "comment")):
            if len(row) != 3:
                parsed.append(("", f"line {i:,}: expected 3 fields separated by '|' (got {len(row)})",
                               str(path), "malformed_row"))
            else:
                parsed.append((row[0].strip(), row[2], f"{path}:{i}", None))
    on_disk = set(os.listdir(layout.images))
    entries, warned = [], 0
    for name, caption, where, problem in parsed:
        if problem is not None and warned < MAX_EXAMPLES:  # one line per bad row, the first few
            log.warning("%s: %s; row skipped", where, caption)
            warned += 1
        if problem is None and name not in on_disk:
            entries.append(Entry(None, caption, f"{where} ({name})", reason="image_not_found"))
        else:
            entries.append(Entry(layout.images / name if problem is None else None, caption, where, problem))
    return entries


# --------------------------------------------------------------------------- splits

def seeded_split(n: int, seed: int = SEEDED_SPLIT_SEED) -> dict[str, list[int]]:
    """Rows (of n images in name order) of the seeded split: min(1,000, n // 10) test images, as
    many validation images, the rest train; each list sorted."""
    held = min(SEEDED_HELD_OUT, max(1, n // 10)) if n >= 3 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return {"test": sorted(order[:held]), "val": sorted(order[held:2 * held]), "train": sorted(order[2 * held:])}


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in read_text(path).splitlines() if line.strip()}


def describe_splits(root: str | Path) -> str:
    """One line: which source defines train/val/test in this Flickr folder."""
    lay = _layout(Path(root))
    if lay.karpathy is not None:
        return f"{lay.dataset}: Karpathy's {lay.karpathy.name} (train / val / test)"
    if set(lay.lists) == set(FLICKR8K_LISTS):
        return f"{lay.dataset}: the official lists {', '.join(p.name for p in lay.lists.values())}"
    return (f"{lay.dataset}: seeded split by image (seed {SEEDED_SPLIT_SEED}; {SEEDED_HELD_OUT:,} test and "
            f"{SEEDED_HELD_OUT:,} val images, a tenth each below 10,000; no Karpathy dataset_{lay.dataset}.json)")


def _layout(root: Path) -> FlickrLayout:
    lay = find_layout(root)
    if lay is None:
        raise DataError(f"{root}: not a Flickr8k/Flickr30k folder (expected Flickr8k.token.txt, "
                        "results_20130124.token, captions.txt or results.csv, or dataset_flickr*.json, beside "
                        "the image folder Flicker8k_Dataset/, flickr30k-images/, Images/ or flickr30k_images/)")
    return lay


def _from_karpathy(lay: FlickrLayout, split: str) -> CaptionedImages:
    parts = ("train", "val", "test") if split == "all" else (split,)
    on_disk = set(os.listdir(lay.images))
    images: list[ImageRecord] = []
    problems: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    dropped_images = dropped_captions = 0
    for part in parts:
        ks = read_karpathy_split(lay.karpathy, part, id_key="imgid", require_filepath=False)
        dropped_images += ks.dropped_images
        dropped_captions += ks.dropped_captions
        for im in ks.images:
            if im.filename not in on_disk:
                note_problem(problems, examples, "image_not_found",
                             f"{lay.karpathy}: images[{im.position}] ({im.filename}): {len(im.captions)} captions",
                             len(im.captions))
                continue
            images.append(ImageRecord(im.image_id, lay.images / im.filename, im.captions, im.caption_ids))
    if not images:
        raise DataError(f"{lay.karpathy}: none of the images of split {split!r} is in {lay.images}")
    if dropped_captions:
        problems["empty"] = problems.get("empty", 0) + dropped_captions
    images.sort(key=lambda r: r.image_id)
    out = CaptionedImages(images, f"{lay.dataset}:{lay.root}:{split}", dropped_images=dropped_images,
                          dropped_captions=sum(problems.values()), caption_problems=problems, examples=examples,
                          dataset=lay.dataset, split_origin="Karpathy")
    log_drops(lay.karpathy, out)
    return out


def load_flickr(root: str | Path, split: str = "train") -> CaptionedImages:
    """One split (train, val, test or all) of a Flickr8k/Flickr30k folder in any layout above."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"{root}: a Flickr folder has no split {split!r} (use {', '.join(SPLITS)})")
    lay = _layout(root)
    if lay.karpathy is not None:
        return _from_karpathy(lay, split)
    whole = group_entries(caption_entries(lay), f"{lay.dataset}:{root}:all", lay.captions)
    whole.dataset = lay.dataset
    if split == "all":
        return whole
    if set(lay.lists) == set(FLICKR8K_LISTS):
        names = _read_list(lay.lists[split])
        rows = [i for i, r in enumerate(whole.images) if r.path.name in names]
        if not rows:
            raise DataError(f"{lay.lists[split]}: none of its {len(names)} images has a caption in {lay.captions}")
        origin = LIST_WORDS[split]
    else:
        rows = seeded_split(len(whole))[split]
        if not rows:
            raise DataError(f"{lay.captions}: only {len(whole)} captioned image(s): too few for a seeded "
                            "train/val/test split")
        origin = f"seeded split, seed {SEEDED_SPLIT_SEED}"
    out = whole.select(rows, f"{lay.dataset}:{root}:{split}")
    out.split_origin = origin
    return out
