"""Data pipeline throughput: images/s delivered as normalised float batches, same workers.

  baseline  PIL.Image.open -> Resize((224, 224)) -> ToTensor -> Normalize, standard DataLoader
  jpeg      clipft's JPEG fallback as training runs it: Pillow draft (DCT downscaling while decoding)
            + short-side resize + centre crop to uint8 in the workers (`data.build_transform(...,
            output="uint8")`, `TrainDataset`), normalised per batch by `prepare.DeviceTransform`
  prepared  clipft's prepared cache: uint8 memmap rows read per batch (`prepare.PreparedDataset`),
            resized + normalised per batch by `prepare.DeviceTransform` (on the CPU here; on a GPU
            in training, where only uint8 crosses the bus)

Inputs: synthetic COCO-sized 640x480 JPEGs (smooth random colour fields plus noise, quality 90,
~100-150 KB like COCO photos), written to a temp dir. The prepared cache is built before timing
(it is a one-off cost per dataset, reported separately).

    python benchmarks/data_pipeline.py [--images 1000] [--workers 2] [--batch 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from clipft.config import DataConfig
from clipft.data import CaptionedImages, ImageRecord, TrainDataset, build_transform, collate_train
from clipft.prepare import DeviceTransform, PreparedDataset, PreparedImages, identity_collate, prepare_images

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
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        paths = write_jpegs(tmp / "img", args.images)
        kb = np.mean([q.stat().st_size for q in paths]) / 1024
        print(f"torch {torch.__version__}; {args.images} JPEGs 640x480 (~{kb:.0f} KB), {args.workers} workers, "
              f"batch {args.batch}, output {args.size} px")
        split = CaptionedImages([ImageRecord(i, q, ["x"], [i]) for i, q in enumerate(paths)], "bench")
        text = torch.zeros(len(paths), 8)
        kw = dict(batch_size=args.batch, num_workers=args.workers, shuffle=True, drop_last=False,
                  persistent_workers=False)

        base = throughput(DataLoader(Baseline(paths), **kw), args.images)
        print(f"baseline  (PIL -> Resize((224,224)) -> ToTensor -> Normalize): {base:8.1f} img/s")

        jpeg_ds = TrainDataset(split, text, build_transform(args.size, MEAN, STD, output="uint8"), draft_size=args.size)
        norm = DeviceTransform(args.size, MEAN, STD)  # batch normalisation only (already args.size)
        jpeg = throughput(DataLoader(jpeg_ds, collate_fn=collate_train, **kw), args.images, to_model=norm)
        print(f"jpeg      (draft decode + resize + crop, uint8; batch normalise): {jpeg:8.1f} img/s  ({jpeg / base:.1f}x)")

        # 256 px squares (the default: room for random resized crops) resized to 224 per batch, and
        # squares stored at the training size (no augmentation: the device only normalises).
        for size, what in ((256, "batched resize + normalise"), (args.size, "batched normalise only")):
            t = time.perf_counter()
            prepare_images(split, tmp / f"prepared{size}", size=size, workers=args.workers, progress=False)
            t_prep = time.perf_counter() - t
            prepared = PreparedImages.open(tmp / f"prepared{size}")
            ds = PreparedDataset(prepared, prepared.rows_for(split), text, list(range(len(paths) + 1)))
            tf = DeviceTransform(args.size, MEAN, STD)
            prep = throughput(DataLoader(ds, collate_fn=identity_collate, **kw), args.images, to_model=tf)
            print(f"prepared {size} px (uint8 memmap rows, {what}): {prep:8.1f} img/s  ({prep / base:.1f}x)"
                  f"   [one-off prepare-images: {t_prep:.1f} s = {args.images / t_prep:.0f} img/s]")


if __name__ == "__main__":
    main()
