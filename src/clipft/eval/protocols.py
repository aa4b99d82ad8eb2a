"""Evaluation protocols: which images and captions a Recall@K figure is computed on.

Published COCO retrieval numbers use Karpathy's 5k test split; the validation subset used during
training is only comparable with itself. Every protocol resolves to a `CaptionedImages`, so the
whole pipeline (text cache, image embedding, chunked recall) runs unchanged:

  val            the configured validation subset (data.val_images, data.subset_seed): the
                 protocol of the per-epoch numbers in metrics.jsonl
  val-full       the whole val2014 split (40,504 images, ~202k captions on real COCO)
  val-heldout    the validation split's images outside the `val` subset: they chose nothing (not
                 best.pt, not an ablation winner), so figures on them are free of selection bias
  karpathy-test  Karpathy's COCO test split (5,000 images, 25,010 captions) from
                 `dataset_coco.json` (--karpathy PATH); images from ROOT/train2014 + ROOT/val2014
  karpathy-val   the same file's 5k validation split
  karpathy-test-1k  COCO's other published protocol: the Karpathy 5k test images in 5 folds of
                 1,000 (consecutive in file order, as VSE++ and SCAN cut them); Recall@K is computed
                 per fold (1,000 images x ~5,000 captions) and averaged, with the per-fold spread
  test           on a Flickr8k/Flickr30k folder: its test split (Karpathy's when the folder has
                 dataset_flickr*.json: Flickr30k 1,000 images x 5,000 captions); the protocol is
                 named from where the split came from and the real counts
  <other>        any split name of the dataset (e.g. train), loaded like training does

Each protocol caches its caption embeddings under its own split name, so switching protocols
never invalidates another protocol's cache.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..data import CaptionedImages, DataError, ImageRecord, load_split
from ..data.karpathy import coco_karpathy_images

log = logging.getLogger(__name__)

KARPATHY_PREFIX = "karpathy-"
KARPATHY_1K = "karpathy-test-1k"
N_FOLDS_1K = 5  # 5 folds of 1,000 images of the 5k test split
VAL_PROTOCOLS = ("val", "val-full", "val-heldout")  # drawn from the dataset's validation split
KARPATHY_SPLITS = ("test", "val", "train", "restval")  # the values of `split` in dataset_coco.json
PROTOCOLS = VAL_PROTOCOLS + ("karpathy-test", "karpathy-val")  # and any split name of the dataset
KARPATHY_5K = 5000  # images in each of Karpathy's COCO test and val splits


@dataclass
class EvalSplit:
    """A resolved protocol: the data, the split name for caches/files, and a one-line description."""
    data: CaptionedImages
    name: str  # "val", "val-full", "karpathy-test", ...: names metrics_<name>.json and the text cache
    protocol: str  # human description, written into metrics files and the report
    # karpathy-test-1k: image rows of each fold (a gallery of its own); None = one gallery
    folds: list[list[int]] | None = None
    # Karpathy protocols: how many of its images were in the split that chose the checkpoint
    # (`selection_overlap`); None for the other protocols
    selection_overlap: dict | None = None

    @property
    def label(self) -> str:
        """The protocol's short name: "flickr30k-test" on a Flickr folder, else the split name."""
        return f"{self.data.dataset}-{self.name}" if self.data.dataset else self.name


def load_karpathy_split(split_file: str | Path, image_root: str | Path, split: str = "test",
                        order: str = "id") -> CaptionedImages:
    """Karpathy's `dataset_coco.json` -> the images of one split, as CaptionedImages
    (`clipft.data.karpathy.coco_karpathy_images`, which training's data.val_split=karpathy-val reads too)."""
    return coco_karpathy_images(split_file, image_root, split, order)


def selection_overlap(data_root: str | Path, cfg: Config, data: CaptionedImages) -> dict:
    """How many images of `data` (a Karpathy test or val split) were in the validation split that
    chose the checkpoint (cfg.data.val_split with data.val_images, loaded as training loads it):
    {"images": count or None when the selection split cannot be loaded here, "of": len(data),
    "selection": its name, "note": why unknown}. Matched by resolved image path."""
    try:
        chosen = load_split(data_root, cfg.data.val_split, cfg.data)
    except DataError as e:
        return {"images": None, "of": len(data), "selection": None, "note": str(e)}
    taken = {os.path.abspath(r.path) for r in chosen.images}
    n = sum(os.path.abspath(r.path) in taken for r in data.images)
    return {"images": n, "of": len(data), "selection": chosen.name}


def selection_note(overlap: dict) -> str:
    """The protocol line's statement of `selection_overlap`: zero, a warning, or unknown."""
    n, of = overlap["images"], overlap["of"]
    if n is None:
        return ("; whether its images took part in checkpoint selection is unknown (the run's validation split "
                "cannot be loaded here): the figure may not be comparable with published numbers")
    if n == 0:
        return f"; none of its {of:,} images took part in checkpoint selection ({overlap['selection']})"
    return (f"; WARNING: {n:,} of its {of:,} images were in the validation split that chose the checkpoint "
            f"({overlap['selection']}): the figure is optimistic and not comparable with published numbers")


def consecutive_folds(n: int, k: int = N_FOLDS_1K) -> list[list[int]]:
    """k folds of consecutive rows of n (sizes differ by at most one): 5,000 -> 5 x 1,000."""
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]


def protocol_description(name: str, data: CaptionedImages, folds: list[list[int]] | None = None) -> str:
    """One line naming the protocol and its size, e.g. for the report's Recall@K table."""
    n, m = len(data), len(data.caption_ids)
    subset = ":subset=" in data.name
    # Named from the real counts: only a 5,000-image Karpathy split is the published "COCO 5k" protocol.
    five_k = n == KARPATHY_5K
    if data.dataset:  # a benchmark with a named protocol (Flickr): "flickr30k-test (Karpathy, 1,000 images x ...)"
        origin = data.split_origin + (", seeded subset" if subset else "")
        return f"{data.dataset}-{name} ({origin}, {n:,} images x {m:,} captions)"
    if folds:
        sizes = sorted({len(f) for f in folds})
        return (f"Karpathy COCO 1K test: the 5k test split in {len(folds)} folds of "
                f"{'-'.join(f'{s:,}' for s in sizes)} images, Recall@K averaged over the folds "
                f"({n:,} images x {m:,} captions in all, all captions per image; {data.name})")
    kind = {
        "val": "validation subset (as during training)" if subset else "full validation split (as during training)",
        "val-full": "full validation split",
        "val-heldout": "validation images held out from checkpoint selection",
        "karpathy-test": ("Karpathy COCO 5k test split (the split published COCO numbers use)" if five_k else
                          f"Karpathy-format test split ({n} images, not the 5,000-image COCO 5k protocol: "
                          "not comparable with published numbers)"),
        "karpathy-val": ("Karpathy COCO 5k validation split" if five_k else
                         f"Karpathy-format validation split ({n} images, not the 5,000-image COCO 5k split)"),
    }.get(name, f"split {name!r}")
    return f"{kind}: {n} images x {m} captions, all captions per image ({data.name})"


def resolve_eval_split(data_root: str | Path, split: str, cfg: Config, karpathy: str | Path | None = None) -> EvalSplit:
    """Resolve a protocol name (see the module docstring) to its data."""
    data_root = Path(data_root)
    if split.startswith(KARPATHY_PREFIX):
        if karpathy is None:
            raise DataError(f"--split {split} needs --karpathy PATH/dataset_coco.json (Karpathy's split file)")
        if split == KARPATHY_1K:
            data = load_karpathy_split(karpathy, data_root, "test", order="file")  # folds are cut in file order
            folds = consecutive_folds(len(data))
            overlap = selection_overlap(data_root, cfg, data)
            return EvalSplit(data=data, name=split, protocol=protocol_description(split, data, folds)
                             + selection_note(overlap), folds=folds, selection_overlap=overlap)
        data = load_karpathy_split(karpathy, data_root, split[len(KARPATHY_PREFIX):])
        overlap = selection_overlap(data_root, cfg, data)
        return EvalSplit(data=data, name=split, protocol=protocol_description(split, data) + selection_note(overlap),
                         selection_overlap=overlap)
    elif karpathy is not None:
        raise DataError(f"{karpathy}: --karpathy is only used with --split karpathy-test (or karpathy-val, "
                        "karpathy-test-1k)")
    elif split == "val-full":
        data = load_split(data_root, cfg.data.val_split, _without_val_subset(cfg).data)
    elif split == "val-heldout":
        data = heldout_val(load_split(data_root, cfg.data.val_split, _without_val_subset(cfg).data), cfg)
    else:
        try:  # "val": the validation split as training selected on it (data.val_split, e.g. karpathy-val)
            data = load_split(data_root, cfg.data.val_split if split == "val" else split, cfg.data)
        except DataError as e:
            if split in (cfg.data.train_split, cfg.data.val_split):
                raise
            raise DataError(f"{e} (--split {split} is read as a split name of the dataset; the protocols are "
                            f"{', '.join(PROTOCOLS)})") from None
    return EvalSplit(data=data, name=split, protocol=protocol_description(split, data))


def heldout_val(full: CaptionedImages, cfg: Config) -> CaptionedImages:
    """The images of the full validation split that are NOT in the seeded `data.val_images` subset
    (the one that chose best.pt); DataError when the subset is the whole split."""
    chosen = full.subset(cfg.data.val_images, cfg.data.subset_seed)
    taken = {(r.image_id, str(r.path)) for r in chosen.images}
    rows = [i for i, r in enumerate(full.images) if (r.image_id, str(r.path)) not in taken]
    if not rows:
        raise DataError(f"{full.name}: data.val_images={cfg.data.val_images} selects the whole validation split "
                        f"({len(full)} images), so no image is held out from checkpoint selection; set "
                        "data.val_images below the split size, or evaluate --split karpathy-test")
    return full.select(rows, f"{full.name}:heldout-of-subset={cfg.data.val_images},seed={cfg.data.subset_seed}")


def _without_val_subset(cfg: Config) -> Config:
    from copy import deepcopy
    full = deepcopy(cfg)
    full.data.val_images = 0
    return full
