"""Decode every image once into a uint8 memory-mapped cache (`clipft prepare-images`). Training reads
the cache with `prepared_reader` and turns uint8 batches into model input with `device_transform`.

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


import ctypes
import errno
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..config import Config
from .caches import data_root, prepared_split_dir
from .images import CenterSquareResize, load_image
from ..runtime import atomic_write_text, check_free_space, ensure_writable_dir, storage_error
from .records import CaptionedImages
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
    (`caches.prepared_split_dir`, at `size` px; default: data.prepared_size, what training reads, even
    for images smaller than that: they are resized as evaluation resizes them, so the next `clipft
    train` uses the cache). Returns `prepare_images`'s dict with "size" added."""
    data = load_split(Path(root), split, cfg.data)
    size = size or cfg.data.prepared_size
    info = prepare_images(data, prepared_split_dir(root, split, cfg, size), size=size, workers=workers,
                          progress=progress, root=data_root(root, split, cfg))
    return {**info, "size": size}


def _digest(paths: Sequence[str], size: int) -> str:
    h = hashlib.sha256(f"{size}\n".encode())
    for p in paths:
        h.update(p.encode() + b"\0")
    return h.hexdigest()
