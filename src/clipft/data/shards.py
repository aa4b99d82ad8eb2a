"""WebDataset shards: tar files of samples (`{key}.jpg`, `{key}.txt`, `{key}.json`) as one more format.

Reading. `--data` names a shard set: a brace pattern ('DIR/train-{000000..000123}.tar', local, `file:`
or `pipe:` URLs), one .tar, or a directory holding shards (`clipft shard` output with shards.json, or
img2dataset output: NNNNN.tar beside .parquet / _stats.json side files, read as is). Loading reads the
text members only (the .txt, or the .json's "caption" when there is no .txt; never an image) through
wids' indexed tar access, and keeps them in a caption cache keyed by sample key (per shard, refreshed
when the shard's size or mtime changes). Each sample becomes an `ImageRecord` whose path names the
member inside its (local) shard, 'SHARD.tar/KEY.jpg': `open_member` reads such a path through wids'
`IndexedTarSamples` (an index of member offsets over an mmap of the tar), so every image consumer
(training, evaluation, validate) decodes shard members with the ordinary decoder, and a bad member is
skipped and counted like a bad JPEG file. A member cut short (a truncated download) is dropped while
loading and counted under "truncated_member"; a shard whose tar headers cannot be indexed is skipped
whole and counted under "unreadable_shard".

Training order (`ShardTrainDataset.epoch_order`): a map-style dataset over global sample indices, so
the existing machinery applies unchanged: the order is a function of (seed, epoch), rank r takes its
slice of every global batch (`distributed.shard_train_indices`), a mid-epoch resume skips the batches
already trained on (`preempt.resume_loader`). For locality the shards are shuffled (seed, epoch) and
read in windows of `SHARD_WINDOW` shards whose samples are shuffled together; a set of at most
SHARD_WINDOW shards is one window, whose order is exactly `distributed.epoch_order` (the order the
same images have as a folder). Consumers take sample indices, not shards, so there is no minimum
number of shards per rank or worker.

Writing (`shard_writer.write_shards`, `clipft shard`): any format clipft reads, split by `load_split`, images
resized once (short side to image_size, JPEG; an image already small enough and already a JPEG is
stored byte for byte), keys = the sample's position in its split, 9 digits, so key order is split order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import DataConfig
from ..shard_members import (SHARD_WINDOW, _open_tar, member_exists, member_size, open_member,  # noqa: F401
                             split_member)
from .datasets import TrainDataset
from .folder import has_images
from .records import IMAGE_EXTENSIONS, CaptionedImages, DataError, Entry, group_entries

log = logging.getLogger(__name__)

SHARD_INDEX = "shards.json"  # wids index of the train shards (`clipft shard`)
VAL_INDEX = "shards-val.json"  # ... of the val shards
SIZES = "sizes.json"  # {shard file name: samples}, every shard (the open_clip / wids convention)
CAPTIONS_VERSION = 1
_BRACE = re.compile(r"\{[^{}]*\.\.[^{}]*\}")


# --------------------------------------------------------------------------- what --data names

def _text(spec: str | Path) -> str:
    """The spec as a string. Path() collapsed '//' in URLs inside a pipe: command: put it back."""
    s = str(spec)
    return re.sub(r"\b(https?|s3|gs|ftp):/(?=[^/])", r"\1://", s) if s.startswith("pipe:") else s


def is_pattern(spec: str | Path) -> bool:
    """A shard URL or pattern (not an existing directory): pipe:/file: URLs, brace ranges, *.tar."""
    s = _text(spec)
    return s.startswith(("pipe:", "file:")) or bool(_BRACE.search(s)) or (s.endswith(".tar") and not os.path.isdir(s))


def _dir_tars(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
    except OSError:
        return []


def is_shards(path: Path) -> bool:
    """Detection: a shard pattern/URL, a .tar file, or a directory with shards.json, or with top-level
    .tar files and no image files (an image folder that also keeps an archive stays a folder)."""
    if is_pattern(path):
        return True
    return path.is_dir() and ((path / SHARD_INDEX).is_file() or (bool(_dir_tars(path)) and not has_images(path)))


def expand(spec: str | Path) -> list[str]:
    """Brace expansion of a shard pattern ('a-{000..002}.tar' -> 3 URLs; webdataset's rule)."""
    from braceexpand import braceexpand
    return list(braceexpand(_text(spec)))


def shard_home(spec: str | Path) -> Path:
    """The folder a shard set's caches belong to: the directory itself, the folder of a local
    pattern, or (pipe: URLs) a user cache folder named after the URL."""
    s = _text(spec)
    if s.startswith("pipe:"):
        from .cache_root import user_cache_root
        return user_cache_root() / "shards" / hashlib.sha256(s.encode()).hexdigest()[:16]
    s = s[len("file://"):] if s.startswith("file://") else s[len("file:"):] if s.startswith("file:") else s
    return Path(s) if os.path.isdir(s) else Path(os.path.dirname(s) or ".")


def _wids_index(path: Path) -> list[str]:
    """The shard URLs of a wids index file (relative URLs are relative to the file)."""
    try:
        spec = json.loads(path.read_text())
        urls = [d["url"] for d in spec["shardlist"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a wids shard index ({e})") from None
    return [u if re.match(r"^[a-z]+:", u) or os.path.isabs(u) else str(path.parent / u) for u in urls]


def shard_urls(path: str | Path, part: str, cfg: DataConfig) -> list[str]:
    """The shards of one split. A directory: the `part` set `clipft shard` wrote (shards.json /
    shards-val.json, or train-*.tar / val-*.tar), else every .tar in it (img2dataset) for train; a
    pattern: its expansion, or for the validation split of --data the val set written beside it."""
    s = _text(path)
    is_val = part == cfg.val_split
    from_val_path = bool(cfg.val_path) and _text(Path(cfg.val_path)) == s
    if is_pattern(s):
        if is_val and not from_val_path:
            home = shard_home(s)
            if (home / VAL_INDEX).is_file():
                return _wids_index(home / VAL_INDEX)
            raise DataError(f"{s}: no validation shards ({home / VAL_INDEX} not found): pass --val-data "
                            "PATTERN (data.val_path) naming a held-out shard set")
        return expand(s)
    root = Path(s)
    index = root / (VAL_INDEX if is_val else SHARD_INDEX)
    if index.is_file():
        return _wids_index(index)
    tars = _dir_tars(root)
    named = [p for p in tars if p.name.startswith(("val-" if is_val else "train-"))]
    if named:
        return [str(p) for p in named]
    if is_val and not from_val_path:
        raise DataError(f"{root}: no validation shards (no {VAL_INDEX}, no val-*.tar): pass --val-data PATH "
                        "(data.val_path) naming a held-out shard set")
    if not tars:
        raise DataError(f"{root}: no .tar shards in the directory")
    return [str(p) for p in tars]


# --------------------------------------------------------------------------- local copies of shards

def localize(url: str) -> Path:
    """A local file for a shard URL: a path or file: URL as is; a pipe: URL's output is copied once
    into the user cache (random access needs a file), atomically, named after the command."""
    if url.startswith("file:"):
        url = url[len("file://"):] if url.startswith("file://") else url[len("file:"):]
    if not url.startswith("pipe:"):
        if re.match(r"^[a-z][a-z0-9+.-]*://", url):
            raise DataError(f"{url}: only local paths, file: and pipe: URLs are read (e.g. 'pipe:curl -s {url}')")
        p = Path(url)
        if not p.is_file():
            raise DataError(f"{p}: shard not found")
        return p
    from .cache_root import user_cache_root
    cmd = url[len("pipe:"):]
    out = user_cache_root() / "shards" / (hashlib.sha256(url.encode()).hexdigest()[:20] + ".tar")
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.part")
    with open(tmp, "wb") as f:
        rc = subprocess.run(cmd, shell=True, stdout=f, stderr=subprocess.PIPE).returncode
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url}: the pipe command failed (exit status {rc})")
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- text members and their cache

def _ext(name: str) -> str:
    """The last extension, lower case, with its dot ('000001.seg.JPG' -> '.jpg')."""
    return os.path.splitext(name)[1].lower()


def scan_shard(tar: Path) -> dict[str, dict]:
    """{key: {"image": member name | None, "captions": [lines] | None, "truncated": [member names]}}
    for one shard, in tar order, reading the text members only. DataError when wids cannot index it."""
    from wids.wids import IndexedTarSamples, splitname
    try:
        itf = IndexedTarSamples(path=str(tar))
    except Exception as e:  # wids asserts / struct errors on a damaged header: one line, the shard skipped
        raise DataError(f"{tar}: cannot index the tar ({type(e).__name__}: {e})") from None
    try:
        reader, end = itf.reader, len(itf.reader.mmapped_file)
        samples: dict[str, dict] = {}
        for group in itf.samples:
            names = [reader.by_index[i] for i in group]  # (name, offset, size)
            key = splitname(names[0][0])[0]  # wids' rule: up to the first dot of the base name
            rec: dict[str, Any] = {"image": None, "captions": None, "truncated": []}
            text = meta = None
            for i, (name, offset, size) in zip(group, names):
                if offset + 512 + size > end:
                    rec["truncated"].append(name)
                    continue
                ext = _ext(name)
                if ext in IMAGE_EXTENSIONS and rec["image"] is None:
                    rec["image"] = name
                elif ext == ".txt":
                    text = bytes(reader.get_at_index(i)[1])
                elif ext == ".json":
                    meta = bytes(reader.get_at_index(i)[1])
            if text is not None:
                try:
                    rec["captions"] = text.decode("utf-8-sig").splitlines()
                except UnicodeDecodeError:
                    rec["captions"] = None
                    rec["not_utf8"] = True
            elif meta is not None:  # img2dataset keeps the caption in the .json too
                try:
                    cap = json.loads(meta).get("caption")
                    rec["captions"] = [cap] if cap is not None else None
                except (ValueError, AttributeError):
                    pass
            samples[key] = rec
        return samples
    finally:
        itf.close()


def _captions_cache(tar: Path) -> Path:
    from .cache_root import _usable_dir
    digest = hashlib.sha256(str(tar.resolve()).encode()).hexdigest()[:10]
    return _usable_dir(tar.parent / "cache") / "shard-captions" / f"{tar.stem}-{digest}.json"


def shard_captions(tar: Path) -> dict[str, dict]:
    """`scan_shard`, through the caption cache (valid while the shard's size and mtime are unchanged)."""
    st = tar.stat()
    stamp = {"version": CAPTIONS_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = _captions_cache(tar)
    try:
        stored = json.loads(cache.read_text())
        if stored.get("stamp") == stamp:
            return stored["samples"]
    except (OSError, ValueError, AttributeError):
        pass
    samples = scan_shard(tar)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "samples": samples}))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only place: read the text members again next time
    return samples


def load_shards(path: str | Path, part: str, cfg: DataConfig) -> CaptionedImages:
    """One split of a shard set as `CaptionedImages` (see the module doc); image paths are shard members."""
    urls = shard_urls(path, part, cfg)
    if not urls:
        raise DataError(f"{_text(path)}: the pattern names no shards")
    entries: list[Entry] = []
    skipped: list[str] = []
    position: dict[Path, int] = {}  # image member -> its global index in the shard set (URL order, tar order)
    n_seen = 0
    for url in urls:
        tar = localize(url)
        try:
            samples = shard_captions(tar)
        except DataError as e:
            skipped.append(str(e))
            continue
        for key, rec in samples.items():
            where = f"{tar}:{key}"
            img = Path(f"{tar}/{rec['image']}") if rec["image"] else None
            if img is not None:
                position[img] = n_seen
            n_seen += 1
            if rec["truncated"]:
                entries.append(Entry(img, None, f"{tar}:{rec['truncated'][0]}", reason="truncated_member"))
                continue
            if rec.get("not_utf8"):
                entries.append(Entry(img, None, f"{where}.txt", reason="not_utf8"))
                continue
            if img is None:
                for k, line in enumerate(rec["captions"] or [], 1):
                    entries.append(Entry(None, line, f"{where}.txt:{k}", reason="no_image"))
                continue
            caps = rec["captions"] if rec["captions"] is not None else [None]
            entries.extend(Entry(img, line, f"{where}.txt:{k}") for k, line in enumerate(caps, 1))
    if skipped:
        log.warning("%d of %d shard(s) skipped: %s", len(skipped), len(urls), "; ".join(skipped[:3]))
    if not entries:
        raise DataError(f"{_text(path)}: no readable sample in {len(urls)} shard(s)"
                        + (f" ({skipped[0]})" if skipped else ""))
    out = group_entries(entries, f"webdataset:{_text(path)}:{part}", Path(_text(path)))
    # Shard order, then tar order (group_entries sorts by path; a pipe: copy's name is a hash), and
    # image_id = the sample's global index in the shard set: stable while the shards are.
    for rec in out.images:
        rec.image_id = position[rec.path]
    out.images.sort(key=lambda rec: rec.image_id)
    for msg in skipped:
        out.caption_problems["unreadable_shard"] = out.caption_problems.get("unreadable_shard", 0) + 1
        out.examples.setdefault("unreadable_shard", []).append(msg)
    return out


# --------------------------------------------------------------------------- the training order

def shard_of_rows(paths: Sequence[Path]) -> list[int]:
    """Each row's shard number (shards numbered in order of first appearance)."""
    ids: dict[str, int] = {}
    return [ids.setdefault(str(p).rsplit(".tar/", 1)[0], len(ids)) for p in paths]


def windowed_order(shard_ids: Sequence[int], seed: int, epoch: int, window: int = SHARD_WINDOW) -> torch.Tensor:
    """A permutation of the rows [N] for one epoch, a function of (seed, epoch): shards shuffled, cut
    into windows of `window` shards, the rows of each window shuffled together. One window (at most
    `window` shards): exactly `distributed.epoch_order`."""
    from ..distributed import epoch_order
    n = len(shard_ids)
    n_shards = max(shard_ids, default=-1) + 1
    if n_shards <= window:
        return epoch_order(n, seed, epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    shards = torch.tensor(shard_ids, dtype=torch.long)  # [N]
    window_of = torch.empty(n_shards, dtype=torch.long)
    window_of[torch.randperm(n_shards, generator=g)] = torch.arange(n_shards) // window  # shard -> window
    row_window = window_of[shards]  # [N]
    noise = torch.rand(n, generator=g, dtype=torch.float64)  # rows of a window in random order
    return torch.from_numpy(np.lexsort((noise.numpy(), row_window.numpy()))).long()  # by window, then noise


def describe_splits(path: Path) -> str:
    """validate's one line on where the splits come from."""
    return (f"webdataset shards: train = {_text(path)}; val = the val shard set beside it "
            f"({VAL_INDEX} or val-*.tar), or data.val_path")


def is_shard_split(split: CaptionedImages) -> bool:
    return split.name.startswith("webdataset:")


class ShardTrainDataset(TrainDataset):
    """TrainDataset over shard members, with the shard-windowed epoch order (`windowed_order`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.shard_ids = shard_of_rows(self.paths)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        return windowed_order(self.shard_ids, seed, epoch)
