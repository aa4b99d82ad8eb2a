"""Embedding a folder: `clipft embed`'s pipeline vs a plain loop, images per second side by side.

clipft (`embed.embed_paths`): JPEG draft decoding and resizing in DataLoader worker processes,
the model run on batches in the main process. Plain loop: one image at a time, decoded, resized
and pushed through the model in the main process (`model.encode_images([path])`), the way a
notebook usually does it. Both give the same embeddings (checked, max abs difference printed).

    python benchmarks/embed.py                          # 256 synthetic 640x480 JPEGs, ResNet-50 at 224 px
    python benchmarks/embed.py --model DIR --images FOLDER [--device cuda]

Without --model a randomly initialised ResNet-50 tower (1024 hidden, 512-d) is exported to a
temporary folder: speed does not depend on the weights. Without --images, photo-like JPEGs
(smooth gradients + noise, COCO's typical 640x480) are written to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipft.inference import load
from clipft.embed import default_workers, embed_paths, list_images


def write_photos(folder: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n):
        base = rng.uniform(0, 255, 3)
        grad = (xx[..., None] * rng.uniform(-0.2, 0.2, 3) + yy[..., None] * rng.uniform(-0.2, 0.2, 3))
        img = np.clip(base + grad + rng.normal(0, 12, (480, 640, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"photo_{i:05d}.jpg", quality=90)
    return folder


def random_export(folder: Path, backbone: str = "resnet50", image_size: int = 224) -> Path:
    """A random tower in the export layout (config.json + model.safetensors); no text encoder needed."""
    from safetensors.torch import save_file

    from clipft.config import DataConfig, ModelConfig
    from clipft.export import export_config
    from clipft.model import ImageTower
    tower = ImageTower(ModelConfig(backbone=backbone, image_weights="none"), 512).eval()
    data = DataConfig()
    cfg = {"data": {"image_size": image_size, "mean": data.mean, "std": data.std}}
    text = {"name": "openai/clip-vit-base-patch32", "max_length": 77, "fingerprint": "0" * 64}
    config = export_config(tower, cfg, text, {"checkpoint": "random"})
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="export folder, checkpoint or HF CLIP model (default: random ResNet-50)")
    p.add_argument("--images", help="folder of images (default: synthetic 640x480 JPEGs)")
    p.add_argument("--n", type=int, default=256, help="synthetic images (default 256)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help=f"decoding processes (default {default_workers()})")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for sub in ("photos", "model"):
            (tmp / sub).mkdir()
        folder = Path(args.images) if args.images else write_photos(tmp / "photos", args.n)
        model_src = args.model or random_export(tmp / "model")
        model = load(model_src, device=args.device)
        paths = list_images(folder)
        workers = default_workers() if args.workers is None else args.workers
        model.encode_images([folder / paths[0]] * 2)  # warm-up: allocator, kernels, lazy imports

        t0 = time.perf_counter()
        fast, rows = embed_paths(model, folder, paths, batch_size=args.batch_size, workers=workers, progress=False)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = torch.cat([model.encode_images([folder / p]) for p in paths])
        t_plain = time.perf_counter() - t0

    n = len(paths)
    print(f"{n} images ({'synthetic 640x480 JPEG' if not args.images else args.images}), model "
          f"{model.name if args.model else 'ResNet-50 tower (random weights)'} at {model.image_size} px on "
          f"{args.device}, {os.cpu_count()} CPUs")
    print(f"{'pipeline':<44}{'images/s':>10}{'seconds':>10}")
    print(f"{'plain loop (one image at a time)':<44}{n / t_plain:10.1f}{t_plain:10.1f}")
    print(f"{f'clipft embed (batch {args.batch_size}, {workers} decode workers)':<44}{n / t_fast:10.1f}{t_fast:10.1f}")
    print(f"speed-up {t_plain / t_fast:.2f}x; max abs difference of the embeddings "
          f"{float((fast - plain[rows]).abs().max()):.1e}")


if __name__ == "__main__":
    main()
