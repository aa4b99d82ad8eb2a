"""Decode every image once into a uint8 memory-mapped cache, and turn uint8 batches into model input
on the device.

JPEG decoding is what starves a GPU training a ResNet on COCO (a 640x480 JPEG costs ~5 ms of CPU).
`prepare_images` decodes each image once (Pillow with JPEG DCT scaling), resizes its short side to
`size`, keeps the centre square, and writes it into one `[N, size, size, 3]` uint8 file. Training then
reads rows with a memcpy; `DeviceTransform` resizes, crops, flips and normalises whole batches on the
device, so only uint8 bytes cross the PCIe bus.

Layout of a prepared split (`<cache_dir>/images/<split>-<size>/`, named by `caches.prepared_dir`):
  images.u8    raw uint8 array [N, size, size, 3] (numpy memmap)
  index.json   {"version", "size", "paths": [...], "ok": [...], "chunk", "checksums": {chunk: blake2b},
               "bad"}; rows follow `paths`, stored relative to the data root (so `--data s2` and
               `--data /abs/s2` find the same cache)
  done.json    while preparing: finished chunks and their checksums (deleted at the end); resumable

Integrity: each chunk of CHUNK images gets a blake2b checksum of its bytes when it is written.
`prepare_images` re-hashes every finished chunk before it resumes (or reports a cache complete) and
decodes the damaged ones again; training checks file sizes and a seeded sample of chunks at start
(`PreparedImages.verify`); `clipft validate --deep` hashes them all.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import math
import os
import queue
import random
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..config import Config
from .caches import data_root, prepared_split_dir
from .datasets import EpochCaptions
from .images import CenterSquareResize, load_image
from ..runtime import atomic_write_text, check_free_space, ensure_writable_dir, storage_error
from .records import CaptionedImages, DataError
from .splits import load_split

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: paths relative to the data root, a checksum per chunk
CHUNK = 256  # images per work unit: the resume and checksum granularity
VERIFY_SAMPLE = 4  # chunks `clipft train` hashes at start (a seeded sample; `validate --deep` hashes all)
_READ = 1 << 22  # bytes per read while hashing
_WRITE_HINT = "set text.cache_dir to a writable folder"


def relative_paths(paths: Sequence[str | Path], root: str | Path) -> list[str]:
    """Image paths relative to `root`, whichever way either was spelled (`s2`, `./s2`, `/abs/s2`):
    the key a prepared cache stores and looks images up by."""
    base = os.path.abspath(root)
    return [os.path.relpath(os.path.abspath(p), base) for p in paths]


def _range_digest(array_f: Path, start: int, stop: int, size: int) -> str | None:
    """blake2b (128 bit) of rows [start, stop) of images.u8, read from the file; None when the
    file is too short to hold them (truncated)."""
    row = size * size * 3
    h = hashlib.blake2b(digest_size=16)
    left = (stop - start) * row
    with open(array_f, "rb") as f:
        f.seek(start * row)
        while left:
            block = f.read(min(left, _READ))
            if not block:
                return None
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def _chunk_rows(chunk_id: int, chunk: int, n: int) -> tuple[int, int]:
    return chunk_id * chunk, min(n, (chunk_id + 1) * chunk)


def _square(img: Image.Image, size: int) -> np.ndarray:
    """Centre square -> size x size (bicubic, antialiased; the eval transform's geometry): [size, size, 3] uint8."""
    return np.asarray(CenterSquareResize(size)(img), dtype=np.uint8)


def default_size(split: CaptionedImages, cap: int = 256, sample: int = 500, seed: int = 0) -> int:
    """`clipft prepare-images`' default side: `cap` (data.prepared_size), or the smallest short side
    among up to `sample` images of the split (headers only) when that is smaller, so small images
    are never upscaled into a bigger cache. Unreadable images are skipped (prepare_images counts them)."""
    rng = np.random.default_rng(seed)
    paths = [r.path for r in split.images]
    if len(paths) > sample:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), sample, replace=False))]
    sides = []
    for path in paths:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except (OSError, ValueError):
            continue
    return min([cap] + sides)


def _work(args: tuple) -> tuple[int, list[tuple[int, str | None]], str | None]:
    """Worker: decode a chunk of images straight into the shared memmap; returns its bad rows and
    the checksum of its bytes (read back from the file, as verification reads them)."""
    chunk_id, start, paths, array_path, n, size = args
    arr = np.memmap(array_path, dtype=np.uint8, mode="r+", shape=(n, size, size, 3))
    bad = []
    for row, path in enumerate(paths, start):
        img, reason = load_image(path, draft_size=size)
        if img is None:
            arr[row] = 0
            bad.append((row, reason))
            continue
        arr[row] = _square(img, size)
    arr.flush()
    del arr
    return chunk_id, bad, _range_digest(Path(array_path), start, start + len(paths), size)


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the process that started it dies, so a killed
    `clipft prepare-images` leaves no workers decoding (each holds a few hundred MB). Linux:
    PR_SET_PDEATHSIG; elsewhere a thread that polls the parent pid."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # 1 = PR_SET_PDEATHSIG
                if os.getppid() != parent:  # the parent died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name="clipft-parent-watch", daemon=True).start()


def _read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing or not readable JSON (a torn write)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _fresh_state(rel: list[str], size: int, chunk: int) -> dict:
    return {"version": FORMAT_VERSION, "paths_digest": _digest(rel, size), "chunk": chunk, "done": [],
            "checksums": {}, "bad": {}}


def _resume_state(out: Path, rel: list[str], size: int, chunk: int) -> tuple[dict, bool]:
    """(progress state, whether a finished cache for these images is there). A finished cache is
    turned back into its state (every chunk done) so one verification covers both cases; a cache of
    other images, another size or an older format is deleted. A state keeps the chunk size it was
    started with (`chunk` is for a fresh one): its checksums and done list are in those units."""
    index_f, done_f, array_f = out / "index.json", out / "done.json", out / "images.u8"
    idx = _read_json(index_f)
    if idx is not None:
        if (idx.get("version") == FORMAT_VERSION and idx.get("paths") == rel and idx.get("size") == size
                and isinstance(idx.get("checksums"), dict)):
            where = {p: i for i, p in enumerate(rel)}
            chunk = idx["chunk"]
            return {**_fresh_state(rel, size, chunk), "checksums": idx["checksums"],
                    "done": list(range(math.ceil(len(rel) / chunk))),
                    "bad": {str(where[p]): why for p, why in idx.get("bad", {}).items() if p in where}}, True
        log.info("%s holds other images, another size or an older format: preparing it again", out)
        for f in (index_f, done_f, array_f):
            f.unlink(missing_ok=True)
    elif index_f.exists():
        index_f.unlink()  # unreadable: the chunks left are checked against done.json below
    state = _read_json(done_f)
    if state is None or state.get("version") != FORMAT_VERSION or state.get("paths_digest") != _digest(rel, size):
        array_f.unlink(missing_ok=True)
        return _fresh_state(rel, size, chunk), False
    return state, False


def _verify_done(state: dict, array_f: Path, n: int, size: int, progress: bool) -> list[int]:
    """Re-hash the chunks `state` lists as done (one read of their bytes); returns the damaged ones
    (altered, zeroed, truncated or never checksummed)."""
    chunk, done = state["chunk"], sorted(state["done"])
    bar = tqdm(done, desc="verify", unit="chunk", disable=None if progress and done else True, leave=False)
    bad = []
    for c in bar:
        want = state["checksums"].get(str(c))
        if not array_f.is_file() or want is None or _range_digest(array_f, *_chunk_rows(c, chunk, n), size) != want:
            bad.append(c)
    bar.close()
    return bad


def _allocate(array_f: Path, nbytes: int) -> None:
    """images.u8 at its final size with its blocks reserved, so a full disk is one error here,
    before any decoding, rather than a SIGBUS in a worker writing into its memmap. On failure the
    file keeps the size it had (a later run must not take an unreserved file for a reserved one)."""
    with open(array_f, "ab") as f:  # "ab" creates the file or keeps what is there
        old = os.fstat(f.fileno()).st_size
        if old == nbytes:
            return
        try:
            if old > nbytes:
                f.truncate(nbytes)
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)  # sets the size too
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                check_free_space(array_f, nbytes - old)  # a file system without fallocate: a sparse file
                f.truncate(nbytes)
        except OSError as e:
            f.truncate(min(old, nbytes))
            err = storage_error(array_f, e, needed=nbytes)
            if err is not None:
                raise err from None
            raise


def prepare_images(split: CaptionedImages, out_dir: str | Path, size: int = 256, workers: int | None = None,
                   progress: bool = True, root: str | Path | None = None, chunk: int = CHUNK,
                   work: Callable[[tuple], tuple] = _work) -> dict:
    """Decode+resize every image of `split` into `out_dir` (see module doc). Resumable: rerunning
    continues with the chunks not yet done. Every finished chunk, of a complete cache too, is
    re-hashed first; damaged ones are decoded again. Paths are stored relative to `root` (the data
    root; default `out_dir`). Returns {"images", "bad", "seconds", "path", "repaired"}; unreadable
    images are zero rows marked not ok.

    chunk: images per work unit (the resume and checksum granularity; a resume keeps the one it
    started with); work: decodes one unit (`_work`; it must be picklable when workers > 1). Both are
    seams for tests."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if not out.is_dir():
        ensure_writable_dir(out, _WRITE_HINT)
        out.mkdir(parents=True, exist_ok=True)
    paths = [str(r.path) for r in split.images]
    rel = relative_paths(paths, out if root is None else root)
    n = len(paths)
    index_f, done_f, array_f = out / "index.json", out / "done.json", out / "images.u8"
    state, complete = _resume_state(out, rel, size, chunk)
    damaged = _verify_done(state, array_f, n, size, progress)
    chunk = state["chunk"]
    if complete and not damaged:
        log.info("prepared images in %s are complete (%d images, every chunk matches its checksum)", out, n)
        return {"images": n, "bad": len(state["bad"]), "seconds": 0.0, "path": str(out), "repaired": 0}
    if damaged:
        lo, hi = _chunk_rows(damaged[0], chunk, n)
        log.warning("%s: %d of %d finished chunk(s) do not match their checksums (first: images %d-%d): "
                    "decoding them again", array_f, len(damaged), len(state["done"]), lo, hi - 1)
        lost = {str(r) for c in damaged for r in range(*_chunk_rows(c, chunk, n))}
        state["done"] = [c for c in state["done"] if c not in damaged]
        state["checksums"] = {k: v for k, v in state["checksums"].items() if int(k) not in damaged}
        state["bad"] = {r: why for r, why in state["bad"].items() if r not in lost}
    ensure_writable_dir(out, _WRITE_HINT)  # a finished shared cache may be read-only; one to write may not
    if complete:
        atomic_write_text(done_f, json.dumps(state))  # a repair in progress is resumable too
        index_f.unlink()
    _allocate(array_f, n * size * size * 3)
    n_chunks = math.ceil(n / chunk)
    todo = [c for c in range(n_chunks) if c not in set(state["done"])]
    jobs = [(c, c * chunk, paths[c * chunk:(c + 1) * chunk], str(array_f), n, size) for c in todo]
    workers = workers or max(1, (os.cpu_count() or 1))
    bar = tqdm(total=n, initial=n - sum(len(j[2]) for j in jobs), desc=f"prepare {split.name}",
               unit="img", disable=None if progress else True)

    def finish(chunk_id: int, bad: list, checksum: str | None) -> None:
        state["done"].append(chunk_id)
        state["checksums"][str(chunk_id)] = checksum
        state["bad"].update({str(r): why for r, why in bad})
        atomic_write_text(done_f, json.dumps(state))  # progress survives a kill: finished chunks are never redone
        bar.update(min(chunk, n - chunk_id * chunk))

    if workers == 1:
        for job in jobs:
            finish(*work(job))
    else:
        with ProcessPoolExecutor(workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            for result in pool.map(work, jobs):
                finish(*result)
    bar.close()
    _write_index(out, state, rel, size, paths)
    return {"images": n, "bad": len(state["bad"]), "seconds": time.perf_counter() - t0, "path": str(out),
            "repaired": len(damaged)}


def _write_index(out: Path, state: dict, rel: list[str], size: int, paths: list[str]) -> None:
    """index.json marks the cache finished; done.json goes."""
    n = len(rel)
    bad_rows = {int(r) for r in state["bad"]}
    for r, why in sorted(state["bad"].items(), key=lambda kv: int(kv[0]))[:20]:
        log.warning("skipped %s: %s", paths[int(r)], why)
    ok = [i not in bad_rows for i in range(n)]
    atomic_write_text(out / "index.json", json.dumps({
        "version": FORMAT_VERSION, "size": size, "paths": rel, "ok": ok, "chunk": state["chunk"],
        "checksums": state["checksums"], "bad": {rel[int(r)]: why for r, why in state["bad"].items()}}))
    (out / "done.json").unlink(missing_ok=True)


def prepare_split(root: str | Path, split: str, cfg: Config, size: int | None = None, workers: int | None = None,
                  progress: bool = True) -> dict:
    """`clipft prepare-images` for one split: load it, and prepare it where training looks for it
    (`caches.prepared_split_dir`, at `size` px; default: data.prepared_size, or the images' own short
    side when smaller, `default_size`). Returns `prepare_images`'s dict with "size" added."""
    data = load_split(Path(root), split, cfg.data)
    size = size or default_size(data, cfg.data.prepared_size)
    info = prepare_images(data, prepared_split_dir(root, split, cfg, size), size=size, workers=workers,
                          progress=progress, root=data_root(root, split, cfg))
    return {**info, "size": size}


def _digest(paths: Sequence[str], size: int) -> str:
    h = hashlib.sha256(f"{size}\n".encode())
    for p in paths:
        h.update(p.encode() + b"\0")
    return h.hexdigest()


def _damaged(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}; rerun `clipft prepare-images` to repair it (or set data.prepared=false)")


@dataclass
class PreparedImages:
    """A finished prepared cache, opened read-only; `rows_for(split)` maps a split's images to rows."""
    path: Path
    size: int
    paths: list[str]  # relative to the data root the cache was prepared with
    ok: np.ndarray  # [N] bool
    array: np.ndarray  # memmap [N, size, size, 3] uint8
    chunk: int = CHUNK
    checksums: dict = field(default_factory=dict)  # chunk number (str) -> blake2b hex of its bytes

    @classmethod
    def open(cls, path: str | Path) -> "PreparedImages | None":
        """None when there is no complete cache at `path` (or one of an older format, with a log
        line); DataError (one line) when its files do not have the size the index says."""
        path = Path(path)
        index_f, array_f = path / "index.json", path / "images.u8"
        if not index_f.is_file():
            return None
        idx = _read_json(index_f)
        if idx is None or not isinstance(idx.get("paths"), list):
            raise _damaged(index_f, "not a readable prepared-cache index")
        if idx.get("version") != FORMAT_VERSION:
            log.warning("%s was prepared by an older clipft (no checksums): decoding JPEGs instead; rerun "
                        "`clipft prepare-images` to use it", path)
            return None
        n, size = len(idx["paths"]), idx["size"]
        want = n * size * size * 3
        have = array_f.stat().st_size if array_f.is_file() else None
        if have != want:
            raise _damaged(array_f, "missing" if have is None else
                           f"{have} bytes where {n} images of {size} px need {want} (truncated or altered)")
        arr = np.memmap(array_f, dtype=np.uint8, mode="r", shape=(n, size, size, 3))
        return cls(path, size, idx["paths"], np.asarray(idx["ok"], dtype=bool), arr, idx.get("chunk", CHUNK),
                   idx.get("checksums", {}))

    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self.paths) / self.chunk)

    def damaged_chunks(self, chunks: Iterable[int] | None = None, progress: bool = False) -> list[int]:
        """Chunks (all by default) whose bytes do not match the checksum stored when they were written."""
        chunks = list(range(self.num_chunks) if chunks is None else chunks)
        n, array_f = len(self.paths), self.path / "images.u8"
        bar = tqdm(chunks, desc="verify", unit="chunk", disable=None if progress else True, leave=False)
        return [c for c in bar
                if _range_digest(array_f, *_chunk_rows(c, self.chunk, n), self.size) != self.checksums.get(str(c))]

    def verify(self, sample: int | None = None, seed: int = 0, progress: bool = False) -> None:
        """Hash every chunk (sample=None) or a seeded sample of `sample` chunks; DataError (one
        line, naming the first damaged chunk) on a mismatch."""
        chunks = range(self.num_chunks)
        if sample is not None and sample < self.num_chunks:
            chunks = sorted(random.Random(seed).sample(chunks, sample))
        bad = self.damaged_chunks(chunks, progress)
        if bad:
            lo, hi = _chunk_rows(bad[0], self.chunk, len(self.paths))
            raise _damaged(self.path / "images.u8", f"{len(bad)} of {len(chunks)} checked chunk(s) do not match "
                                                    f"their checksums (first: images {lo}-{hi - 1}): altered or damaged")

    def rows_for(self, split: CaptionedImages, root: str | Path | None = None) -> np.ndarray | None:
        """Row of every image of `split` (a subset of the prepared split works), or None if any
        image is not in the cache (then the caller falls back to JPEG decoding). `root`: the data
        root the cache was prepared with (default: the cache directory itself)."""
        where = {p: i for i, p in enumerate(self.paths)}
        rows = [where.get(p) for p in relative_paths([r.path for r in split.images], root or self.path)]
        return None if any(r is None for r in rows) else np.asarray(rows, dtype=np.int64)


class PreparedDataset(EpochCaptions, torch.utils.data.Dataset):  # captions: the same rule as TrainDataset
    """uint8 images from a prepared cache: batches are fetched with one fancy-index read.

    Items are (image uint8 [S, S, 3], text_emb [D] or None, image row); `__getitems__` returns the
    whole batch at once (DataLoader uses it), already collated as
    (images uint8 [B, S, S, 3], texts [B, D], rows [B], n_skipped).
    """

    def __init__(self, prepared: PreparedImages, rows: np.ndarray, text_embeds: torch.Tensor | None = None,
                 offsets: Sequence[int] | None = None, seed: int = 0):
        self.prepared, self.rows = prepared, rows
        self.text_embeds, self.offsets, self.seed, self.epoch = text_embeds, offsets, seed, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, idx: list[int]):
        n_asked = len(idx)
        idx = [i for i in idx if self.prepared.ok[self.rows[i]]]  # unreadable at prepare time
        n_skipped = n_asked - len(idx)
        order = np.argsort(self.rows[idx])  # sequential reads are faster on a memmap
        idx = [idx[j] for j in order]
        images = torch.from_numpy(np.ascontiguousarray(self.prepared.array[self.rows[idx]]))  # [B, S, S, 3]
        index = torch.as_tensor(idx, dtype=torch.long)
        if self.text_embeds is None:
            return images, index, n_skipped
        texts = self.text_embeds[[self.caption_index(i) for i in idx]]  # [B, D]
        return images, texts, index, n_skipped

    def __getitem__(self, i: int):
        return self.__getitems__([i])


class PreparedLoader:
    """Batches of a PreparedDataset, read by one background thread instead of worker processes.

    A prepared batch is one fancy-index copy out of the page cache (~3 ms for 128 rows of 224 px).
    Worker processes would add more than that: each batch is copied into shared memory and mapped
    again by the trainer (measured on the 2-core CI machine: raw uint8 batches at 2,800 images/s
    through 2 DataLoader workers, 4,600 read in-process). The thread reads (and, for CUDA, pins)
    batch k+1 while the trainer uses batch k; numpy's fancy-index copy and `pin_memory` release the
    GIL, so the two overlap.

    Iterating yields what `PreparedDataset.__getitems__` returns, one tuple per `batch_size`
    consecutive entries of `indices` (the last one may be shorter): the same batches a
    `DataLoader(ds, batch_size, sampler=indices)` gives, in the same order.
    """

    def __init__(self, ds: PreparedDataset, indices: Sequence[int], batch_size: int, pin_memory: bool = False,
                 prefetch: int = 2):
        self.ds, self.indices, self.batch_size = ds, list(indices), batch_size
        self.pin_memory, self.prefetch = pin_memory, prefetch

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def _read(self, k: int):
        batch = self.ds.__getitems__(self.indices[k * self.batch_size:(k + 1) * self.batch_size])
        if self.pin_memory:  # page-locked: the trainer's .to(cuda, non_blocking=True) is a true async copy
            batch = tuple(x.pin_memory() if isinstance(x, torch.Tensor) else x for x in batch)
        return batch

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for k in range(len(self)):
                    item = (self._read(k), None)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put((None, None))
            except BaseException as e:  # handed to the consumer, raised there with its traceback
                q.put((None, e))

        thread = threading.Thread(target=produce, name="clipft-prepared-reader", daemon=True)
        thread.start()
        try:
            while True:
                batch, err = q.get()
                if err is not None:
                    raise err
                if batch is None:
                    return
                yield batch
        finally:  # also when the consumer stops early (generator closed): let the thread end
            stop.set()
            while thread.is_alive():
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass


def identity_collate(batch):
    """The dataset already returns collated batches (`__getitems__`)."""
    return batch


class DeviceTransform(torch.nn.Module):
    """uint8 [B, S, S, 3] (any device) -> normalised float [B, 3, size, size] on that device.

    Eval: resize the square to `size` (bilinear, antialiased). Train with augment: per-sample random
    resized crop (scale range, aspect 3/4..4/3) and horizontal flip via one batched affine grid_sample.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], augment: bool = False,
                 scale: tuple[float, float] = (0.5, 1.0), flip: bool = True):
        super().__init__()
        self.size, self.augment, self.scale, self.flip = size, augment, scale, flip
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    @staticmethod
    def sample_keys(seed: int, epoch: int, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """[B] int64 augmentation seeds of the samples `indices` (dataset rows) in `epoch`:
        `datasets.sample_seed`, the rule of the JPEG path too."""
        from .datasets import sample_seed
        return torch.tensor([sample_seed(seed, epoch, int(i)) for i in indices], dtype=torch.int64)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                keys: torch.Tensor | None = None) -> torch.Tensor:
        """keys [B] (`sample_keys`): each sample's crop and flip drawn from its own generator, so they
        depend on (seed, epoch, sample) only, not on the batch it came in or the RNG's state (an
        exact mid-epoch resume). Without keys: from `generator` (or the global CPU RNG)."""
        x = images.permute(0, 3, 1, 2)  # [B, 3, S, S] uint8, a channels_last view (no copy)
        if self.augment:
            x = self._random_resized_crop(x.float(), generator, keys)
        elif x.shape[-1] != self.size:
            # CPU: resize the uint8 batch itself (a vectorised uint8 kernel, ~10x the float one);
            # CUDA: in float, where the resize is cheap next to the model.
            x = x if x.device.type == "cpu" else x.float()
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] (uint8 or float, NCHW or channels_last) -> float (x - mean) / std, same layout.

        On a channels_last tensor the channel is the innermost dim (size 3): broadcasting a
        [1, 3, 1, 1] mean there defeats vectorisation (~5x slower on CPU). So channels_last input is
        viewed as rows [B, H, W*3] and scaled by the per-channel constants tiled to length W*3."""
        b, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            rows = x.permute(0, 2, 3, 1).float().view(b, h, w * c)  # [B, H, W*3], a fresh copy
            scale = (1.0 / self.std).view(c).repeat(w).to(rows.device)  # [W*3]: 1/std of each pixel's channel
            shift = (self.mean / self.std).view(c).repeat(w).to(rows.device)
            return rows.mul_(scale).sub_(shift).view(b, h, w, c).permute(0, 3, 1, 2)  # channels_last [B, 3, H, W]
        return x.float().sub_(self.mean.to(x.device)).div_(self.std.to(x.device))  # in place on the fresh copy

    @staticmethod
    def _draws(b: int, generator: torch.Generator | None, keys: torch.Tensor | None) -> torch.Tensor:
        """[B, 5] uniforms in [0, 1): area, log-ratio, centre x, centre y, flip of each sample; row k from
        torch.Generator().manual_seed(keys[k]) when keys are given (B tiny draws: ~10 us a sample)."""
        if keys is None:
            return torch.rand(b, 5, generator=generator)
        return torch.stack([torch.rand(5, generator=torch.Generator().manual_seed(int(k))) for k in keys.tolist()])

    def _random_resized_crop(self, x: torch.Tensor, generator: torch.Generator | None,
                             keys: torch.Tensor | None = None) -> torch.Tensor:
        # Crop parameters are drawn on the CPU (5 numbers a sample, tiny) so CPU generators seed them.
        b = x.shape[0]
        u = self._draws(b, generator, keys)  # [B, 5]
        lo, hi = self.scale
        area = lo + (hi - lo) * u[:, 0]  # crop area / image area
        ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (u[:, 2] * 2 - 1) * (1 - w)  # centre in [-1+w, 1-w] (normalised coords)
        cy = (u[:, 3] * 2 - 1) * (1 - h)
        sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if self.flip else torch.ones(b)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        # CUDA: page-locked + non_blocking, since a plain .to() would wait for the GPU queue.
        theta = theta.pin_memory().to(x.device, non_blocking=True) if x.device.type == "cuda" else theta.to(x.device)
        grid = F.affine_grid(theta, [b, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
