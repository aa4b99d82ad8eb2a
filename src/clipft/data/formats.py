"""The format registry: every on-disk format, how it is recognised and how it is read.

Each entry is a `DataFormat` whose `load(path, part, cfg)` returns a `CaptionedImages`. Formats with
splits of their own (COCO) get the split name as `part`; the others are read whole (`part` = "all")
and `splits.load_split` cuts train/val from them. Auto-detection (`detect_format`) asks the entries
in registry order, so a specific layout must come before the generic image folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import DataConfig
from .coco import is_coco_root
from .flickr import describe_splits, is_flickr, load_flickr
from .folder import has_images, load_folder_captions
from .karpathy import load_coco_split  # train / val, and karpathy-val etc. from dataset_coco.json
from .records import CaptionedImages, DataError
from .shards import describe_splits as describe_shard_splits
from .shards import is_pattern, is_shards, load_shards
from .tabular import is_csv, is_jsonl, load_csv_captions, load_jsonl_captions


@dataclass(frozen=True)
class DataFormat:
    """One dataset format behind the `CaptionedImages` interface."""
    name: str  # the data.format value
    load: Callable[[Path, str, DataConfig], CaptionedImages]  # (path, part, cfg)
    detect: Callable[[Path], bool]  # does an existing path look like this format?
    has_splits: bool = False  # the layout has its own splits: `part` is the split name
    title: str = ""  # how messages name the layout ("a COCO directory ...")
    describe_splits: Callable[[Path], str] | None = None  # one line: where the splits come from
    extra_splits: tuple[str, ...] = ()  # splits beyond train/val that `clipft validate` also checks


# Detection order: specific layouts first, the generic image folder last.
FORMAT_REGISTRY: dict[str, DataFormat] = {
    "coco": DataFormat("coco", lambda path, part, cfg: load_coco_split(path, part), is_coco_root,
                       has_splits=True, title="COCO"),
    "flickr": DataFormat("flickr", lambda path, part, cfg: load_flickr(path, part), is_flickr, has_splits=True,
                         title="Flickr8k/Flickr30k", describe_splits=describe_splits, extra_splits=("test",)),
    # Before csv/folder: a directory of .tar shards (or a pattern naming them); splits: train / val shard sets.
    "webdataset": DataFormat("webdataset", load_shards, is_shards, has_splits=True, title="webdataset shard",
                             describe_splits=describe_shard_splits),
    "csv": DataFormat("csv", lambda path, part, cfg: load_csv_captions(path, cfg), is_csv),
    "jsonl": DataFormat("jsonl", lambda path, part, cfg: load_jsonl_captions(path, cfg), is_jsonl),
    "folder": DataFormat("folder", lambda path, part, cfg: load_folder_captions(path, cfg), has_images),
}
FORMATS = tuple(FORMAT_REGISTRY)
_FORMAT_ALIASES = {"tsv": "csv"}


def detect_format(path: str | Path) -> str:
    """The dataset format of `path`: "webdataset" (a shard pattern DIR/train-{000000..000009}.tar, a
    .tar, a pipe:/file: URL, or a dir of .tar shards), "coco" (a dir with annotations/captions_*2014.json), "flickr" (a
    Flickr8k/Flickr30k folder, official or Kaggle layout: see `flickr.py`), "jsonl" /
    "csv" (a .jsonl/.ndjson or .csv/.tsv file, or a dir with metadata.jsonl/.csv), "folder" (a dir
    with image files)."""
    if is_pattern(path):  # a shard pattern or URL: nothing on disk has that name
        return "webdataset"
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data path not found")
    for fmt in FORMAT_REGISTRY.values():
        if fmt.detect(path):
            return fmt.name
    if path.is_dir():
        raise DataError(f"{path}: unrecognised dataset layout (expected a COCO 2014 directory with "
                        "annotations/captions_<split>2014.json, a Flickr8k/Flickr30k folder, a metadata.jsonl, or image files with "
                        "same-stem .txt captions)")
    suffix = path.suffix.lower()
    raise DataError(f"{path}: unrecognised data file type {suffix or '(no extension)'!r} (expected .csv, "
                    ".tsv or .jsonl; or force one with --set data.format=csv|jsonl)")


def resolve_format(path: str | Path, cfg: DataConfig) -> str:
    """cfg.format, or the format detected from `path` when it is "auto"."""
    fmt = _FORMAT_ALIASES.get(cfg.format, cfg.format)
    if fmt == "auto":
        return detect_format(path)
    if fmt not in FORMAT_REGISTRY:
        raise DataError(f"{path}: unknown data format {cfg.format!r} (known: auto, {', '.join(FORMATS)}, tsv)")
    if not Path(path).exists() and not (fmt == "webdataset" and is_pattern(path)):
        raise DataError(f"{path}: data path not found")
    return fmt


def load_dataset(path: str | Path, cfg: DataConfig | None = None) -> CaptionedImages:
    """Every captioned image of a CSV/TSV, JSONL or folder dataset: no split, no subset."""
    cfg = cfg or DataConfig()
    fmt = FORMAT_REGISTRY[resolve_format(path, cfg)]
    if fmt.has_splits:
        raise DataError(f"{path}: a {fmt.title} directory has its own splits; use load_split(root, split, cfg)")
    return fmt.load(Path(path), "all", cfg)
