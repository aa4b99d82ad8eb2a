"""Reading a prepared image cache in training: `PreparedImages` (a finished cache, opened read-only,
checked by size and a seeded sample of chunk checksums), `PreparedDataset` (a split's rows with their
captions, collated batches) and `PreparedLoader` (a background thread that reads batches, pinned for
CUDA: a batch is one memcpy, cheaper than DataLoader workers' shared-memory hand-over). The cache's
layout and how it is written: `clipft.data.prepare`.
"""


import logging
import math
import queue
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .datasets import EpochCaptions
from .records import CaptionedImages, DataError

log = logging.getLogger(__name__)

from .prepare import CHUNK, FORMAT_VERSION, _chunk_rows, _range_digest, _read_json, relative_paths

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
