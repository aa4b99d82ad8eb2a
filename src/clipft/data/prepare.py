"""Decode every image once into a uint8 memory-mapped cache, and turn uint8 batches into model input
on the device.

JPEG decoding is what starves a GPU training a ResNet on COCO (a 640x480 JPEG costs ~5 ms of CPU).
`prepare_images` decodes each image once (Pillow with JPEG DCT scaling), resizes its short side to
`size`, keeps the centre square, and writes it into one `[N, size, size, 3]` uint8 file. Training then
reads rows with a memcpy; `DeviceTransform` resizes, crops, flips and normalises whole batches on the
device, so only uint8 bytes cross the PCIe bus.

Layout of a prepared split (`<cache_dir>/images/<split>-<size>/`, named by `caches.prepared_dir`):
  images.u8    raw uint8 array [N, size, size, 3] (numpy memmap)
  index.json   {"size", "paths": [...], "ok": [...], "version"}; rows follow `paths`
  done.json    finished chunk numbers while preparing (deleted at the end); makes it resumable
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..config import Config
from .caches import prepared_split_dir
from .datasets import epoch_caption_index
from .images import CenterSquareResize, load_image
from .records import CaptionedImages
from .splits import load_split

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK = 256  # images per work unit: the resume granularity


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


def _work(args: tuple) -> tuple[int, list[tuple[int, str | None]]]:
    """Worker: decode a chunk of images straight into the shared memmap; returns bad rows."""
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
    return chunk_id, bad


def prepare_images(split: CaptionedImages, out_dir: str | Path, size: int = 256, workers: int | None = None,
                   progress: bool = True, chunk: int = CHUNK, work: Callable[[tuple], tuple] = _work) -> dict:
    """Decode+resize every image of `split` into `out_dir` (see module doc). Resumable: rerunning
    continues with the chunks not yet done; a finished cache for the same paths is left as is.
    Returns {"images", "bad", "seconds", "path"}; unreadable images are zero rows marked not ok.

    chunk: images per work unit (the resume granularity); work: decodes one unit (`_work`; it must be
    picklable when workers > 1). Both are seams for tests: a resume needs the chunk size it started with."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(r.path) for r in split.images]
    n = len(paths)
    index_f, done_f, array_f = out / "index.json", out / "done.json", out / "images.u8"
    if index_f.is_file():
        idx = json.loads(index_f.read_text())
        if idx.get("paths") == paths and idx.get("size") == size and idx.get("version") == FORMAT_VERSION:
            log.info("prepared images in %s are complete (%d images)", out, n)
            return {"images": n, "bad": n - sum(idx["ok"]), "seconds": 0.0, "path": str(out)}
        index_f.unlink()  # a different image list: start over
        done_f.unlink(missing_ok=True)
    state = json.loads(done_f.read_text()) if done_f.is_file() else {}
    if state.get("paths_digest") != _digest(paths, size):
        state = {"paths_digest": _digest(paths, size), "done": [], "bad": {}}
        array_f.unlink(missing_ok=True)
    nbytes = n * size * size * 3
    if not array_f.is_file() or array_f.stat().st_size != nbytes:
        with open(array_f, "wb") as f:  # sparse file of the final size; chunks fill it in
            f.truncate(nbytes)
    n_chunks = math.ceil(n / chunk)
    todo = [c for c in range(n_chunks) if c not in set(state["done"])]
    jobs = [(c, c * chunk, paths[c * chunk:(c + 1) * chunk], str(array_f), n, size) for c in todo]
    workers = workers or max(1, (os.cpu_count() or 1))
    bar = tqdm(total=n, initial=(n_chunks - len(todo)) * chunk if todo else n, desc=f"prepare {split.name}",
               unit="img", disable=None if progress else True)

    def finish(chunk_id: int, bad: list) -> None:
        state["done"].append(chunk_id)
        state["bad"].update({str(r): why for r, why in bad})
        tmp = done_f.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, done_f)  # progress survives a kill: finished chunks are never redone
        bar.update(min(chunk, n - chunk_id * chunk))

    if workers == 1:
        for job in jobs:
            finish(*work(job))
    else:
        with ProcessPoolExecutor(workers) as pool:
            for chunk_id, bad in pool.map(work, jobs):
                finish(chunk_id, bad)
    bar.close()
    bad_rows = {int(r) for r in state["bad"]}
    for r, why in sorted(state["bad"].items(), key=lambda kv: int(kv[0]))[:20]:
        log.warning("skipped %s: %s", paths[int(r)], why)
    ok = [i not in bad_rows for i in range(n)]
    tmp = index_f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": FORMAT_VERSION, "size": size, "paths": paths, "ok": ok,
                               "bad": {paths[int(r)]: why for r, why in state["bad"].items()}}))
    os.replace(tmp, index_f)
    done_f.unlink(missing_ok=True)
    return {"images": n, "bad": len(bad_rows), "seconds": time.perf_counter() - t0, "path": str(out)}


def prepare_split(root: str | Path, split: str, cfg: Config, size: int | None = None, workers: int | None = None,
                  progress: bool = True) -> dict:
    """`clipft prepare-images` for one split: load it, and prepare it where training looks for it
    (`caches.prepared_split_dir`, at `size` px; default: data.prepared_size, or the images' own short
    side when smaller, `default_size`). Returns `prepare_images`'s dict with "size" added."""
    data = load_split(Path(root), split, cfg.data)
    size = size or default_size(data, cfg.data.prepared_size)
    info = prepare_images(data, prepared_split_dir(root, split, cfg, size), size=size, workers=workers,
                          progress=progress)
    return {**info, "size": size}


def _digest(paths: Sequence[str], size: int) -> str:
    h = hashlib.sha256(f"{size}\n".encode())
    for p in paths:
        h.update(p.encode() + b"\0")
    return h.hexdigest()


@dataclass
class PreparedImages:
    """A finished prepared cache, opened read-only; `rows_for(split)` maps a split's images to rows."""
    path: Path
    size: int
    paths: list[str]
    ok: np.ndarray  # [N] bool
    array: np.ndarray  # memmap [N, size, size, 3] uint8

    @classmethod
    def open(cls, path: str | Path) -> "PreparedImages | None":
        """None when there is no complete cache at `path`."""
        path = Path(path)
        index_f = path / "index.json"
        if not index_f.is_file():
            return None
        idx = json.loads(index_f.read_text())
        if idx.get("version") != FORMAT_VERSION:
            return None
        n, size = len(idx["paths"]), idx["size"]
        arr = np.memmap(path / "images.u8", dtype=np.uint8, mode="r", shape=(n, size, size, 3))
        return cls(path, size, idx["paths"], np.asarray(idx["ok"], dtype=bool), arr)

    def rows_for(self, split: CaptionedImages) -> np.ndarray | None:
        """Row of every image of `split` (a subset of the prepared split works), or None if any
        image is not in the cache (then the caller falls back to JPEG decoding)."""
        where = {p: i for i, p in enumerate(self.paths)}
        rows = [where.get(str(r.path)) for r in split.images]
        return None if any(r is None for r in rows) else np.asarray(rows, dtype=np.int64)


class PreparedDataset(torch.utils.data.Dataset):
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption_index(self, i: int) -> int:
        """Same (seed, epoch, i) rule as the JPEG TrainDataset: switching image source changes nothing."""
        return epoch_caption_index(self.offsets, self.seed, self.epoch, i)

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

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)  # [B, 3, S, S] uint8, a channels_last view (no copy)
        if self.augment:
            x = self._random_resized_crop(x.float(), generator)
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

    def _random_resized_crop(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # Crop parameters are drawn on the CPU (B numbers each, tiny) so a CPU generator seeds them.
        b = x.shape[0]
        g = dict(generator=generator)
        area = torch.empty(b).uniform_(*self.scale, **g)  # crop area / image area
        ratio = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), **g))
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, **g) * 2 - 1) * (1 - w)  # centre in [-1+w, 1-w] (normalised coords)
        cy = (torch.rand(b, **g) * 2 - 1) * (1 - h)
        sign = torch.where(torch.rand(b, **g) < 0.5, -1.0, 1.0) if self.flip else torch.ones(b)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        # CUDA: page-locked + non_blocking, since a plain .to() would wait for the GPU queue.
        theta = theta.pin_memory().to(x.device, non_blocking=True) if x.device.type == "cuda" else theta.to(x.device)
        grid = F.affine_grid(theta, [b, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
