"""Where every cache lives: the one module that names cache directories and files.

  <cache dir>/<name>_text_embeds_<encoder>.safetensors   caption embeddings of a split (train, eval)
  <cache dir>/<name>-subset<N>-seed<S>_text_embeds_...   ... of a seeded subset of it
  <cache dir>/<train name>-lrswap_text_embeds_...         train captions with left/right swapped
  <cache dir>/<protocol>_text_embeds_<encoder>...         an evaluation protocol (val-full, karpathy-*)
  <cache dir>/images/<name>-<size>/                       prepared uint8 images (`prepare.py`)

The cache dir is text.cache_dir, by default ROOT/cache (COCO or folder dataset) or
<directory of the file>/cache (CSV/JSONL). <name> is the split (COCO) or '<file stem>-<part>'. What a
cache must match to be reused (its fingerprint) is decided by its reader, not here.

A read-only dataset: when the default cache dir cannot be written (and holds no caches someone
built there to share), caches go to a user cache dir instead,
$XDG_CACHE_HOME/clipft/<dataset folder name>-<hash of its absolute path> (XDG_CACHE_HOME defaults to
~/.cache), with one log line saying where. An explicit text.cache_dir is always used as given.
"""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path

from ..config import Config
from .cache_root import _slug, _usable_dir, user_cache_dir, user_cache_root  # noqa: F401 - re-exported
from .formats import FORMAT_REGISTRY
from .splits import split_source, subset_size

log = logging.getLogger(__name__)


def cache_location(root: str | Path, split: str, cfg: Config) -> tuple[Path, str]:
    """(cache directory, name) for the caches of a split (text embeddings, prepared images).

    The directory is text.cache_dir, by default ROOT/cache for a COCO or folder dataset and
    <directory of the file>/cache for a CSV/JSONL file. The name is the split (COCO) or
    '<file stem>-<part>', part = train / val / all, so two files in one folder never share a cache.
    """
    src = split_source(root, split, cfg.data)
    if src.format == "webdataset":  # shards: beside them (a pattern names no folder of its own)
        from .shards import is_pattern, shard_home
        stem = _slug(Path(str(src.path)).name.split("{")[0].rstrip("-_.") or "shards", 40)
        default_dir, name = shard_home(src.path) / "cache", (f"{stem}-{split}" if is_pattern(src.path) else split)
    elif FORMAT_REGISTRY[src.format].has_splits:
        default_dir, name = src.path / "cache", split
    else:
        is_dir = src.path.is_dir()
        default_dir = (src.path if is_dir else src.path.parent) / "cache"
        name = f"{src.path.name if is_dir else src.path.stem}-{src.part}"
    return (Path(cfg.text.cache_dir) if cfg.text.cache_dir else _usable_dir(default_dir)), name


def data_root(root: str | Path, split: str, cfg: Config) -> Path:
    """The folder a split's image paths are stored relative to in its prepared cache: the dataset
    folder (COCO, image folder) or the folder of the CSV/JSONL file."""
    src = split_source(root, split, cfg.data)
    if src.format == "webdataset":
        from .shards import shard_home
        return shard_home(src.path)
    return src.path if src.path.is_dir() else src.path.parent


def dataset_cache_dir(root: str | Path, cfg: Config) -> Path:
    """The cache directory of a dataset (the validation split's: evaluation protocols cache there)."""
    return cache_location(root, cfg.data.val_split, cfg)[0]


def text_cache_path(cache_dir: Path, split: str, encoder_name: str) -> Path:
    """cache_dir/<split>_text_embeds_<slug of encoder name>.safetensors"""
    return Path(cache_dir) / f"{split}_text_embeds_{_slug(encoder_name)}.safetensors"


def text_cache_location(root: str | Path, split: str, cfg: Config) -> tuple[Path, str]:
    """`cache_location`, with the subset (if any) in the name: '<name>-subset<N>-seed<S>'."""
    cache_dir, name = cache_location(root, split, cfg)
    n = subset_size(split, cfg.data)
    return cache_dir, (f"{name}-subset{n}-seed{cfg.data.subset_seed}" if n > 0 else name)


def text_cache_file(root: str | Path, split: str, cfg: Config) -> Path:
    """The text-embedding cache file of a split (see `cache_location`). Its fingerprint covers the
    captions, so a changed file or split is re-embedded. A seeded subset (data.train_images /
    data.val_images > 0) gets its own file, named after its size and seed: runs on different
    subsets of one split keep their caches instead of re-embedding each other's."""
    return text_cache_path(*text_cache_location(root, split, cfg), cfg.text.encoder)


def swapped_text_cache_file(root: str | Path, cfg: Config) -> Path:
    """The cache of the train captions with left/right swapped (data.flip=swap): '<train name>-lrswap'."""
    cache_dir, base = text_cache_location(root, cfg.data.train_split, cfg)
    return text_cache_path(cache_dir, f"{base}-lrswap", cfg.text.encoder)


def eval_text_cache_file(root: str | Path, split_name: str, cfg: Config, encoder: str | None = None) -> Path:
    """Caption cache of an evaluation split: the training split caches are shared (same file, same
    fingerprint); other protocols (val-full, karpathy-*) get their own file under the cache dir.
    With `encoder` (a full CLIP model compared zero-shot), the protocol's file for that encoder."""
    if encoder is not None:
        return text_cache_path(dataset_cache_dir(root, cfg), split_name, encoder)
    if split_name in (cfg.data.train_split, cfg.data.val_split, "all"):
        return text_cache_file(root, split_name, cfg)
    return text_cache_path(dataset_cache_dir(root, cfg), split_name, cfg.text.encoder)


def prepared_dir(cache_dir: str | Path, split: str, size: int) -> Path:
    """cache_dir/images/<split>-<size>: one prepared split (see `prepare.py` for its layout)."""
    return Path(cache_dir) / "images" / f"{split}-{size}"


def prepared_split_dir(root: str | Path, split: str, cfg: Config, size: int | None = None) -> Path:
    """The prepared image cache of a split at `size` px (default data.prepared_size)."""
    cache_dir, name = cache_location(root, split, cfg)  # COCO: (ROOT/cache, split)
    return prepared_dir(cache_dir, name, size or cfg.data.prepared_size)


def prepared_split_dirs(root: str | Path, split: str, cfg: Config) -> list[Path]:
    """Every prepared cache of a split, one per size (`clipft validate` checks them all)."""
    cache_dir, name = cache_location(root, split, cfg)
    pattern = re.compile(re.escape(name) + r"-\d+")
    images = Path(cache_dir) / "images"
    return sorted(p for p in images.glob(f"{name}-*") if p.is_dir() and pattern.fullmatch(p.name)) \
        if images.is_dir() else []


def prepared_sizes(root: str | Path, split: str, cfg: Config) -> list[int]:
    """Sizes (px) of the finished prepared caches of a split, whatever data.prepared_size says."""
    cache_dir, name = cache_location(root, split, cfg)
    sizes = []
    for d in (Path(cache_dir) / "images").glob(f"{glob.escape(name)}-*"):
        tail = d.name[len(name) + 1:]
        if tail.isdigit() and (d / "index.json").is_file():
            sizes.append(int(tail))
    return sorted(sizes)


def unused_prepared_note(root: str | Path, split: str, cfg: Config) -> str | None:
    """Why no prepared cache is used although one exists at another size (and the override that uses
    it), or None when there is none to explain."""
    other = [s for s in prepared_sizes(root, split, cfg) if s != cfg.data.prepared_size]
    if not other:
        return None
    usable = [s for s in other if s >= cfg.data.image_size]
    shown = ", ".join(f"{s} px" for s in other)
    if usable:
        return (f"{split} images are prepared at {shown} but data.prepared_size is {cfg.data.prepared_size}: "
                f"decoding JPEGs instead; set --set data.prepared_size={usable[0]} to use the prepared images")
    return (f"{split} images are prepared at {shown}, smaller than data.image_size={cfg.data.image_size}: "
            f"decoding JPEGs instead; run clipft prepare-images --size {cfg.data.image_size} (or larger)")
