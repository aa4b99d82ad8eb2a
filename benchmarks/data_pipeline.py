"""Data pipeline throughput: images/s delivered as normalised float batches, at most --workers processes.

  baseline  PIL.Image.open -> Resize((224, 224)) -> ToTensor -> Normalize, standard DataLoader
            with --workers workers
  jpeg      clipft's JPEG fallback as training runs it, same workers: Pillow draft (DCT downscaling
            while decoding) + the centre square resized in one pass (`data.CenterSquareResize`) to
            uint8 in the workers (`data.build_transform(..., output="uint8")`, `TrainDataset`),
            normalised per batch by `device_transform.DeviceTransform`
  shards    clipft's webdataset shards (`clipft shard`: short side resized to 256 once, JPEG q95),
            read by index through wids (`data.shards`), in training's shard-windowed order, same
            workers and decoding as jpeg (the shard members are smaller JPEGs: less to decode)
  prepared  clipft's prepared cache: uint8 memmap rows read per batch by a background thread
            (`prepared_reader.PreparedLoader`: no worker processes, a batch is one memcpy), resized +
            normalised per batch by `device_transform.DeviceTransform` (on the CPU here; on a GPU in
            training, where only uint8 crosses the bus)

Inputs: synthetic COCO-sized 640x480 JPEGs (smooth random colour fields plus noise, quality 90,
~100-150 KB like COCO photos), written to a temp dir. The prepared cache is built before timing
(it is a one-off cost per dataset, reported separately).

    python benchmarks/data_pipeline.py [--images 2000] [--workers 2] [--batch 128] [--rounds 3]
"""

from __future__ import annotations

import os

# Before torch allocates anything: PyTorch's CPU allocator then asks for transparent huge pages for
# buffers >= 2 MB (a float batch is 77 MB; 4 KB page faults cost more than normalising it). The
# `clipft` CLI sets the same. It applies to every approach below alike.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from clipft.config import DataConfig
from clipft.data import CaptionedImages, ImageRecord, TrainDataset, build_transform, collate_train, load_split
from clipft.data import shard_writer
from clipft.data import shards as shards_mod
from clipft.data.device_transform import DeviceTransform
from clipft.data.prepared_reader import PreparedDataset, PreparedImages, PreparedLoader
from clipft.data.prepare import prepare_images

MEAN, STD = DataConfig().mean, DataConfig().std


def write_jpegs(out: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)  # a smooth colour field...
        img = np.asarray(Image.fromarray(low).resize((640, 480), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)  # ...with texture
        p = out / f"{i:06d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


class Baseline(Dataset):
    def __init__(self, paths):
        self.paths = paths
        self.tf = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.tf(Image.open(self.paths[i]).convert("RGB")), i


def throughput(loader, n: int, to_model=None) -> float:
    """Images/s over one full pass (the first batch, i.e. worker start-up, is excluded)."""
    it = iter(loader)
    first = next(it)
    if to_model:
        to_model(first[0])
    seen, t = 0, time.perf_counter()
    for batch in it:
        x = to_model(batch[0]) if to_model else batch[0]
        assert x.dtype == torch.float32
        seen += x.shape[0]
    return seen / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3, help="passes per approach, interleaved; the median is reported")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        paths = write_jpegs(tmp / "img", args.images)
        kb = np.mean([q.stat().st_size for q in paths]) / 1024
        print(f"torch {torch.__version__}; {args.images} JPEGs 640x480 (~{kb:.0f} KB), {args.workers} workers, "
              f"batch {args.batch}, output {args.size} px, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, "
              f"median of {args.rounds} passes")
        split = CaptionedImages([ImageRecord(i, q, ["x"], [i]) for i, q in enumerate(paths)], "bench")
        text = torch.zeros(len(paths), 8)
        kw = dict(batch_size=args.batch, num_workers=args.workers, shuffle=True, drop_last=False,
                  persistent_workers=False)
        norm = DeviceTransform(args.size, MEAN, STD)  # uint8 batch -> normalised float (resizing if needed)
        jpeg_ds = TrainDataset(split, text, build_transform(args.size, MEAN, STD, output="uint8"), draft_size=args.size)

        # 256 px squares (the default: room for random resized crops) resized to 224 per batch, and
        # squares stored at the training size (the "device" only normalises).
        prepared, prep_note = {}, {}
        for size in (256, args.size):
            t = time.perf_counter()
            prepare_images(split, tmp / f"prepared{size}", size=size, workers=args.workers, progress=False)
            t_prep = time.perf_counter() - t
            prepared[size] = PreparedImages.open(tmp / f"prepared{size}")
            prep_note[size] = f"[one-off prepare-images, {args.workers} processes: {args.images / t_prep:.0f} img/s]"

        t = time.perf_counter()
        (tmp / "shards").mkdir()
        shard_writer.write_split_shards(split, tmp / "shards", "train", shard_size=256, image_size=256)
        shard_note = f"[one-off clipft shard, 1 process: {args.images / (time.perf_counter() - t):.0f} img/s]"
        shard_split = load_split(tmp / "shards", "train", DataConfig())
        shard_ds = shards_mod.ShardTrainDataset(shard_split, torch.zeros(len(shard_split), 8),
                                                build_transform(args.size, MEAN, STD, output="uint8"),
                                                draft_size=args.size)

        def shard_loader():  # as training reads it: the windowed (seed, epoch) order, map-style workers
            order = shard_ds.epoch_order(0, 1).tolist()
            return DataLoader(shard_ds, batch_size=args.batch, sampler=order, num_workers=args.workers,
                              collate_fn=collate_train)

        def prepared_loader(size):
            ds = PreparedDataset(prepared[size], prepared[size].rows_for(split), text, list(range(len(paths) + 1)))
            return PreparedLoader(ds, torch.randperm(len(ds)).tolist(), args.batch)  # as training reads it

        runs = {
            "baseline": ("PIL -> Resize((224,224)) -> ToTensor -> Normalize, DataLoader",
                         lambda: throughput(DataLoader(Baseline(paths), **kw), args.images), ""),
            "jpeg": ("draft decode + resize + crop to uint8 in the workers; batch normalise",
                     lambda: throughput(DataLoader(jpeg_ds, collate_fn=collate_train, **kw), args.images, norm), ""),
            "shards": ("wids indexed tar members, 256 px JPEGs; as jpeg in the workers",
                       lambda: throughput(shard_loader(), args.images, norm), shard_note),
            "prepared 256 px": ("memmap rows read by a thread; batch resize + normalise",
                                lambda: throughput(prepared_loader(256), args.images, norm), prep_note[256]),
            f"prepared {args.size} px": ("memmap rows read by a thread; batch normalise only",
                                         lambda: throughput(prepared_loader(args.size), args.images, norm),
                                         prep_note[args.size]),
        }
        results = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, (_what, run, _note) in runs.items():
                results[name].append(run())
        base = statistics.median(results["baseline"])
        for name, (what, _run, note) in runs.items():
            med = statistics.median(results[name])
            print(f"{name:16s} {med:8.1f} img/s  {med / base:4.1f}x  ({what}) {note}")
            print(f"{'':16s} passes: {', '.join(f'{v:.0f}' for v in results[name])}")


if __name__ == "__main__":
    main()
