"""Captioned-image data: every on-disk format behind one interface, `CaptionedImages`.

  records.py    CaptionedImages / ImageRecord, caption cleaning, DataError, shared file readers
  coco.py       COCO 2014: ROOT/annotations/captions_{split}2014.json + ROOT/{split}2014/
  flickr.py     Flickr8k / Flickr30k, official and Kaggle layouts; splits from Karpathy's files,
                Flickr8k's official lists, or a seeded split
  karpathy.py   Karpathy's split files (dataset_coco.json, dataset_flickr*.json), one parser for all
  tabular.py    CSV/TSV (separator sniffed) and JSON Lines: an image column and a caption column
                (also a directory holding a HuggingFace imagefolder metadata.jsonl / metadata.csv)
  folder.py     a directory of images, each with a same-stem .txt holding one caption per line
  shards.py     webdataset shards: `clipft shard` writes them, patterns / pipe: URLs / img2dataset
                output read through wids' indexed tar access (members as 'SHARD.tar/KEY.jpg' paths)
  formats.py    the format registry, detection (`detect_format`) and `load_dataset`
  splits.py     split names -> sources (`split_source`), `load_split` with val_fraction and subsets
  caches.py     where every cache lives (text embeddings, the left/right-swapped captions, prepared images)
  images.py     decoding (`load_image`), transforms, left/right-aware flips
  datasets.py   TrainDataset, EvalImageDataset, collation that drops unreadable images
  prepare.py    the prepared uint8 image cache and the on-device batch transform
  validate.py   `clipft validate` and the preflight training runs before anything trains
  shapes.py     the synthetic shapes dataset, written in COCO layout
  download.py   `clipft download coco`: the official archives into COCO layout
  kaggle.py     `clipft download ... --source kaggle`: the Kaggle copies through kagglehub

Nothing downstream (text cache, training, evaluation) sees the format. Loaders validate annotations
up front and raise `DataError("PATH: problem")`, but never open image files: the datasets decode
images lazily, and an unreadable one becomes a `None` item that `collate_skip` drops and counts, so
one bad JPEG never stops a run. Unusable captions (empty, whitespace-only, placeholders such as
"None" or "NA") are dropped while loading and counted by reason in `CaptionedImages.caption_problems`.

Adding a format = one module + one registry entry:
  1. `data/<name>.py` with `is_<name>(path) -> bool` (does this existing path look like it?) and a
     loader returning `CaptionedImages` (build it from `records.Entry`s with `records.group_entries`,
     or from `ImageRecord`s directly; raise `DataError` naming the file and line for bad input).
  2. An entry in `formats.FORMAT_REGISTRY`: `DataFormat(name, load, detect, has_splits=...)`, where
     `load(path, part, cfg)` gets the split name as `part` when the layout has its own splits
     (has_splits=True, like COCO) and "all" otherwise (train/val are then cut by `splits.load_split`).
     Put it before "folder", which matches any directory with images.
`--set data.format=<name>` then forces it; detection, splits, caches, validate, training and
evaluation need no change.
"""

from ..config import Config, ConfigError, DataConfig  # importable from here before the split too
# Every name below is imported from its module on first use (PEP 562): the loaders, datasets and
# image transforms need torch, and `clipft download` or an argument error must not wait for it.
# name -> module, or (module, name there) for the private names the single-file `data` module had
# before the split (still importable from here for code written against it).
_LAZY = {
    "cache_location": "caches", "eval_text_cache_file": "caches", "prepared_dir": "caches",
    "prepared_split_dir": "caches", "swapped_text_cache_file": "caches", "text_cache_file": "caches",
    "text_cache_location": "caches", "text_cache_path": "caches", "coco_annotation_path": "coco",
    "load_coco_captions": "coco", "EvalImageDataset": "datasets", "TrainDataset": "datasets",
    "collate_eval": "datasets", "collate_skip": "datasets", "collate_train": "datasets",
    "epoch_caption_index": "datasets", "find_flickr_layout": ("flickr", "find_layout"),
    "load_flickr": "flickr", "load_folder_captions": "folder", "FORMAT_REGISTRY": "formats",
    "FORMATS": "formats", "DataFormat": "formats", "detect_format": "formats", "load_dataset": "formats",
    "resolve_format": "formats", "FLIP_MODES": "images", "CenterSquareResize": "images",
    "build_transform": "images", "left_right_captions": "images", "load_image": "images",
    "swap_left_right": "images", "IMAGE_EXTENSIONS": "records", "MAX_EXAMPLES": "records",
    "PLACEHOLDER_CAPTIONS": "records", "CaptionedImages": "records", "DataError": "records",
    "ImageRecord": "records", "caption_problem": "records", "is_int": "records", "read_json": "records",
    "SplitSource": "splits", "load_split": "splits", "split_source": "splits", "subset_size": "splits",
    "CAPTION_COLUMNS": "tabular", "CSV_DELIMITERS": "tabular", "IMAGE_COLUMNS": "tabular",
    "load_csv_captions": "tabular", "load_jsonl_captions": "tabular", "sniff_delimiter": "tabular",
    "_Entry": ("records", "Entry"), "_group": ("records", "group_entries"),
    "_image_path": ("records", "image_path"), "_log_drops": ("records", "log_drops"),
    "_note": ("records", "note_problem"), "_read_text": ("records", "read_text"),
    "_walk_files": ("records", "walk_files"), "_pick_column": "tabular",
    "_metadata_file": ("tabular", "metadata_file"), "_is_int": ("records", "is_int"),
    "_read_json": ("records", "read_json"),
}


def __getattr__(name: str):
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = (where, name) if isinstance(where, str) else where
    import importlib
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "CAPTION_COLUMNS", "CSV_DELIMITERS", "Config", "ConfigError", "DataConfig", "FLIP_MODES", "FORMATS",
    "FORMAT_REGISTRY", "IMAGE_COLUMNS",
    "IMAGE_EXTENSIONS", "MAX_EXAMPLES", "PLACEHOLDER_CAPTIONS", "CaptionedImages", "CenterSquareResize",
    "DataError", "DataFormat", "EvalImageDataset", "ImageRecord", "SplitSource", "TrainDataset",
    "build_transform", "cache_location", "caption_problem", "coco_annotation_path", "collate_eval",
    "collate_skip", "collate_train", "detect_format", "epoch_caption_index", "eval_text_cache_file",
    "left_right_captions", "find_flickr_layout", "load_coco_captions", "load_csv_captions", "load_dataset", "load_flickr",
    "load_folder_captions",
    "load_image", "load_jsonl_captions", "load_split", "prepared_dir", "prepared_split_dir", "resolve_format",
    "sniff_delimiter", "split_source", "subset_size", "swap_left_right", "swapped_text_cache_file",
    "text_cache_file", "text_cache_location", "text_cache_path",
]
