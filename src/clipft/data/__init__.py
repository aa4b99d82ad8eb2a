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
from .caches import (cache_location, eval_text_cache_file, prepared_dir, prepared_split_dir,
                     swapped_text_cache_file, text_cache_file, text_cache_location, text_cache_path)
from .coco import coco_annotation_path, load_coco_captions
from .datasets import (EvalImageDataset, TrainDataset, collate_eval, collate_skip, collate_train,
                       epoch_caption_index)
from .flickr import find_layout as find_flickr_layout
from .flickr import load_flickr
from .folder import load_folder_captions
from .formats import FORMAT_REGISTRY, FORMATS, DataFormat, detect_format, load_dataset, resolve_format
from .images import (FLIP_MODES, CenterSquareResize, build_transform, left_right_captions, load_image,
                     swap_left_right)
from .records import (IMAGE_EXTENSIONS, MAX_EXAMPLES, PLACEHOLDER_CAPTIONS, CaptionedImages, DataError,
                      ImageRecord, caption_problem, is_int, read_json)
from .splits import SplitSource, load_split, split_source, subset_size
from .tabular import (CAPTION_COLUMNS, CSV_DELIMITERS, IMAGE_COLUMNS, load_csv_captions, load_jsonl_captions,
                      sniff_delimiter)

# Private names of the single-file `data` module before the split, still importable from here for code
# written against it (new code imports the public names from their modules).
from .records import Entry as _Entry
from .records import group_entries as _group
from .records import image_path as _image_path
from .records import log_drops as _log_drops
from .records import note_problem as _note
from .records import read_text as _read_text
from .records import walk_files as _walk_files
from .tabular import _pick_column, metadata_file as _metadata_file

_is_int = is_int
_read_json = read_json

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
