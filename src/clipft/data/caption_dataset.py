"""A public PyTorch dataset for writing your own training loop on clipft's data and caption cache.

    ds = clipft.CaptionDataset("data/coco", split="train", text_encoder="openai/clip-vit-base-patch32")
    loader = DataLoader(ds, batch_size=64, shuffle=True, collate_fn=collate_captions)
    for batch in loader: batch["image"], batch["text_embedding"], batch["caption"], batch["image_id"]

It reads every format clipft reads (COCO, CSV/TSV, JSONL, caption folders) and the same
fingerprinted caption cache `clipft train` builds (`data.text_cache_file`), so a notebook and a
`clipft train` run on the same data share one cache and the same embeddings. Each item is one
image with one of its captions, chosen as training chooses it: a pure function of (seed, epoch,
image) (`data.epoch_caption_index`), so call `set_epoch` once per epoch for fresh captions.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from ..config import Config
from . import build_transform, load_image, load_split, text_cache_file
from .datasets import EpochCaptions


class CaptionDataset(EpochCaptions, Dataset):
    """Items {"image": [3, S, S] float (normalised), "text_embedding": [D], "caption": str,
    "image_id": int}; with return_all_captions=True, "text_embeddings" [n, D] and "captions" (all n
    of the image's captions) instead. An unreadable image gives None, which `collate_captions` drops.

    data: a COCO root, CSV/TSV/JSONL file or caption folder; split: as `clipft train` names them
    (train / val, or "all" for a file); text_encoder: HF name or local directory (default: the
    config's, openai/clip-vit-base-patch32); transform: PIL RGB image -> tensor (default: the
    evaluation transform at config.data.image_size: centre square, resized, normalised).
    config: data options (format, val_fraction, subsets, image size, normalisation, cache dir) and
    the caption-choice seed (config.train.seed); default Config().
    """

    def __init__(self, data: str | Path, split: str = "train", text_encoder: str | None = None,
                 transform: Callable | None = None, return_all_captions: bool = False,
                 config: Config | None = None, device: str | torch.device = "cpu", progress: bool = False):
        from ..text import get_text_embeddings
        cfg = deepcopy(config) if config is not None else Config()
        if text_encoder is not None:
            cfg.text.encoder = str(text_encoder)
        self.root, self.split, self.config = Path(data), split, cfg
        self.data = load_split(self.root, split, cfg.data)  # CaptionedImages
        self.cache_file = text_cache_file(self.root, split, cfg)
        self.text_embeds, _ = get_text_embeddings(  # [M, D], caption order, from or into the cache
            self.data.captions, cfg.text.encoder, self.cache_file, device=device, batch_size=cfg.text.batch_size,
            max_length=cfg.text.max_length, on_mismatch=cfg.text.on_mismatch, progress=progress)
        self.transform = transform or build_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std, train=False)
        self.return_all_captions = return_all_captions
        self.offsets = self.data.caption_offsets().tolist()  # image i owns captions offsets[i]:offsets[i+1]
        self.captions = self.data.captions
        self.seed, self.epoch = cfg.train.seed, 0

    @property
    def embed_dim(self) -> int:
        return int(self.text_embeds.shape[1])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        rec = self.data.images[i]
        img, _reason = load_image(rec.path, draft_size=self.config.data.image_size)
        if img is None:
            return None
        item: dict[str, Any] = {"image": self.transform(img), "image_id": rec.image_id}
        if self.return_all_captions:
            start, end = self.offsets[i], self.offsets[i + 1]
            item["text_embeddings"] = self.text_embeds[start:end].clone()  # [n, D]
            item["captions"] = self.captions[start:end]
        else:
            j = self.caption_index(i)
            # clone: a view would drag the whole [M, D] storage through worker shared memory
            item["text_embedding"] = self.text_embeds[j].clone()
            item["caption"] = self.captions[j]
        return item


def collate_captions(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """DataLoader collate_fn for CaptionDataset: drops unreadable images (None) and stacks the rest.

    -> {"image": [B, 3, S, S], "image_id": [B] long, "text_embedding": [B, D], "caption": list[str]}
    or, with return_all_captions, "text_embeddings": list of B [n_i, D] and "captions": list of B lists;
    plus "skipped": how many items of this batch were dropped."""
    items = [b for b in batch if b is not None]
    out: dict[str, Any] = {"skipped": len(batch) - len(items)}
    if not items:
        return {**out, "image": torch.zeros(0), "image_id": torch.zeros(0, dtype=torch.long)}
    for key in items[0]:
        column = [it[key] for it in items]
        if key in ("image", "text_embedding"):
            out[key] = torch.stack(column)
        elif key == "image_id":
            out[key] = torch.tensor(column, dtype=torch.long)
        else:  # caption, captions, text_embeddings: kept per item (lengths differ)
            out[key] = column
    return out
