"""Split resolution: a split name (train, val, all) -> where its images come from, and the loaded split.

Formats with their own splits (COCO) keep their layout. The others have none: validation is a second
path (`data.val_path`) or a seeded fraction of the images (`data.val_fraction`). A seeded subset
(`data.train_images` / `data.val_images`) is applied last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from .formats import FORMAT_REGISTRY, resolve_format
from .records import CaptionedImages, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitSource:
    """Where one split comes from."""
    path: Path  # --data, or data.val_path for the validation split
    format: str
    part: str  # COCO (any format with splits): the split name; else "all" (the whole file) or
    # "train"/"val" (of val_fraction)


def split_source(root: str | Path, split: str, cfg: DataConfig) -> SplitSource:
    """Resolve a split name to its path and part.

    The validation split comes from cfg.val_path when that is set (the whole of it, or its own
    `split` for a COCO directory). A COCO root (any format with splits) keeps its layout. For the
    other formats, split cfg.train_split / cfg.val_split is the train / val part of the
    val_fraction split (the whole file for train when val_path is set), and "all" is the whole file.
    """
    root = Path(root)
    if cfg.val_path and split == cfg.val_split:
        src = Path(cfg.val_path)
        fmt = resolve_format(src, cfg)
        return SplitSource(src, fmt, split if FORMAT_REGISTRY[fmt].has_splits else "all")
    fmt = resolve_format(root, cfg)
    if FORMAT_REGISTRY[fmt].has_splits:
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
    fmt = FORMAT_REGISTRY[src.format]
    if fmt.has_splits:
        full = fmt.load(src.path, src.part, cfg)
    else:
        whole = fmt.load(src.path, "all", cfg)
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

