"""Captioned-image datasets: one format-independent interface, lazy image loading, collation.

Every on-disk format is read by a loader that returns a `CaptionedImages` (a list of images,
each with its captions). Only the COCO 2014 caption layout exists today; a CSV / JSONL /
image-folder loader is one more function registered in `_LOADERS` plus a rule in
`detect_format`. Nothing downstream (text-embedding cache, training, evaluation) sees the format.

Loaders validate annotations up front and raise `DataError("PATH: problem")`, but never open
image files: images are decoded lazily by the datasets, and an unreadable one becomes a `None`
item that `collate_skip` drops and counts, so one bad JPEG never stops a run.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from .config import ConfigError, DataConfig

log = logging.getLogger(__name__)


class DataError(Exception):
    """Bad dataset input. The message is one line: the offending path, then the problem."""


@dataclass
class ImageRecord:
    image_id: int
    path: Path
    captions: list[str]
    caption_ids: list[int]


@dataclass
class CaptionedImages:
    """One split, format-independent. Flat caption order = image order, then caption order."""

    images: list[ImageRecord]
    name: str  # e.g. "coco:/data/coco:val"; identifies the split in logs and caches
    dropped_images: int = 0  # images in the annotations that had no (non-empty) caption
    dropped_captions: int = 0  # captions that were empty after stripping whitespace

    def __len__(self) -> int:
        return len(self.images)

    @property
    def captions(self) -> list[str]:
        return [c for rec in self.images for c in rec.captions]

    @property
    def caption_ids(self) -> list[int]:
        return [c for rec in self.images for c in rec.caption_ids]

    @property
    def image_ids(self) -> list[int]:
        return [rec.image_id for rec in self.images]

    @property
    def caption_to_image(self) -> torch.Tensor:
        """Row index into `images` of every flat caption: LongTensor [M]."""
        counts = torch.tensor([len(rec.captions) for rec in self.images], dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(self.images)), counts)

    def caption_offsets(self) -> torch.Tensor:
        """LongTensor [N+1]: image i owns flat captions offsets[i]:offsets[i+1]."""
        counts = torch.tensor([len(rec.captions) for rec in self.images], dtype=torch.long)
        return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])

    def subset(self, n: int, seed: int) -> "CaptionedImages":
        """n images drawn with random.Random(seed), kept in their original order.

        n <= 0 or n >= len(self) returns self unchanged.
        """
        if n <= 0 or n >= len(self.images):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.images)), n))
        return CaptionedImages(images=[self.images[i] for i in keep],
                               name=f"{self.name}:subset={n},seed={seed}",
                               dropped_images=self.dropped_images,
                               dropped_captions=self.dropped_captions)


# --------------------------------------------------------------------------- COCO 2014


def coco_annotation_path(root: str | Path, split: str) -> Path:
    """ROOT/annotations/captions_{split}2014.json"""
    return Path(root) / "annotations" / f"captions_{split}2014.json"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def load_coco_captions(root: str | Path, split: str) -> CaptionedImages:
    """Parse and validate ROOT/annotations/captions_{split}2014.json; images in ROOT/{split}2014/.

    Images are ordered by image id, captions by annotation id (independent of file order).
    Caption whitespace is stripped; empty captions and images left without captions are
    dropped and counted. Image files are not opened here.
    """
    root = Path(root)
    path = coco_annotation_path(root, split)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is a JSON {type(data).__name__}, expected an object "
                        "with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if key not in data:
            raise DataError(f"{path}: missing '{key}' list")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: '{key}' is a JSON {type(data[key]).__name__}, expected a list")

    files: dict[int, str] = {}
    for k, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: images[{k}] is not an object")
        if not _is_int(entry.get("id")):
            raise DataError(f"{path}: images[{k}] has no integer 'id' (got {entry.get('id')!r})")
        if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            raise DataError(f"{path}: images[{k}] (id {entry['id']}) has no string 'file_name'")
        if entry["id"] in files:
            raise DataError(f"{path}: images[{k}]: duplicate image id {entry['id']}")
        files[entry["id"]] = entry["file_name"]

    per_image: dict[int, list[tuple[int, str]]] = {i: [] for i in files}
    seen_ids: set[int] = set()
    dropped_captions = 0
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{k}] is not an object")
        for key in ("id", "image_id", "caption"):
            if key not in ann:
                raise DataError(f"{path}: annotations[{k}] has no '{key}'")
        if not _is_int(ann["id"]):
            raise DataError(f"{path}: annotations[{k}]: 'id' is not an integer (got {ann['id']!r})")
        if ann["id"] in seen_ids:
            raise DataError(f"{path}: annotations[{k}]: duplicate annotation id {ann['id']}")
        seen_ids.add(ann["id"])
        if not _is_int(ann["image_id"]) or ann["image_id"] not in per_image:
            raise DataError(f"{path}: annotations[{k}] (id {ann['id']}): image_id "
                            f"{ann['image_id']!r} is not in 'images'")
        if not isinstance(ann["caption"], str):
            raise DataError(f"{path}: annotations[{k}] (id {ann['id']}): caption is a "
                            f"{type(ann['caption']).__name__}, expected a string")
        caption = ann["caption"].strip()
        if not caption:
            dropped_captions += 1
            continue
        per_image[ann["image_id"]].append((ann["id"], caption))

    img_dir = root / f"{split}2014"
    if files and not img_dir.is_dir():
        raise DataError(f"{img_dir}: image directory not found (annotations: {path})")
    images, dropped_images = [], 0
    for image_id in sorted(per_image):
        caps = sorted(per_image[image_id])
        if not caps:
            dropped_images += 1
            continue
        images.append(ImageRecord(image_id=image_id, path=img_dir / files[image_id],
                                  captions=[c for _, c in caps], caption_ids=[i for i, _ in caps]))
    if not images:
        raise DataError(f"{path}: no image has a caption")
    if dropped_images or dropped_captions:
        log.warning("%s: dropped %d image(s) without captions and %d empty caption(s)",
                    path, dropped_images, dropped_captions)
    return CaptionedImages(images=images, name=f"coco:{root}:{split}",
                           dropped_images=dropped_images, dropped_captions=dropped_captions)


# --------------------------------------------------------------------------- dispatch

# format name -> loader(root, split). A new format = a loader here + a rule in detect_format.
_LOADERS: dict[str, Callable[[Path, str], CaptionedImages]] = {"coco": load_coco_captions}


def detect_format(path: str | Path) -> str:
    """The dataset format of `path` ("coco" for a dir with annotations/captions_*2014.json)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data path not found")
    if path.is_dir() and any((path / "annotations").glob("captions_*2014.json")):
        return "coco"
    raise DataError(f"{path}: unrecognised dataset layout (expected a COCO 2014 directory with "
                    "annotations/captions_<split>2014.json)")


def load_split(root: str | Path, split: str, cfg: DataConfig) -> CaptionedImages:
    """Load one split in cfg.format (or the detected one) and apply the configured subset.

    The subset size is cfg.train_images when split == cfg.train_split, cfg.val_images when
    split == cfg.val_split (0 = all), drawn with cfg.subset_seed.
    """
    root = Path(root)
    fmt = detect_format(root) if cfg.format == "auto" else cfg.format
    if fmt not in _LOADERS:
        raise DataError(f"{root}: unknown data format {fmt!r} (known: auto, {', '.join(_LOADERS)})")
    full = _LOADERS[fmt](root, split)
    n = cfg.train_images if split == cfg.train_split else cfg.val_images if split == cfg.val_split else 0
    out = full.subset(n, cfg.subset_seed)
    log.info("%s: %d images, %d captions%s", full.name, len(out), len(out.caption_ids),
             f" (subset of {len(full)})" if out is not full else "")
    return out


# --------------------------------------------------------------------------- images

_warned: set[str] = set()  # per process: DataLoader workers each warn at most once per path


def _warn_once(path: Path, reason: str) -> None:
    key = str(path)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s: skipping image (%s)", path, reason)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited onto white, high bit depths scaled."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        # 16/32-bit grey (e.g. 16-bit PNG): PIL's own convert clips instead of rescaling.
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif arr.size and np.nanmax(arr) > 255:
            arr = arr * (255.0 / 65535.0)
        arr = np.nan_to_num(np.clip(arr, 0, 255)).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")  # 2-D uint8 -> "L"
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def load_image(path: str | Path, draft_size: int | None = None
               ) -> tuple[Image.Image | None, str | None]:
    """Decode an image as RGB: (image, None), or (None, reason) if it cannot be used.

    reason is "missing", "unreadable: ...", "truncated: ..." or "undecodable: ...". The format is
    sniffed from the content, not the extension. With draft_size, JPEGs are decoded at the
    smallest DCT scale whose sides are still >= draft_size (much faster for big photos).
    Each bad path is logged once per process.
    """
    path = Path(path)
    try:
        # Open the file ourselves: closing a PIL-owned handle would also destroy the pixels.
        with open(path, "rb") as f:
            im = Image.open(f)
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
        rgb = _to_rgb(im)
    except FileNotFoundError:
        reason = "missing"
    except (PermissionError, IsADirectoryError) as e:
        reason = f"unreadable: {e.strerror or e}"
    except Image.DecompressionBombError as e:
        reason = f"undecodable: {e}"
    except UnidentifiedImageError:
        reason = "undecodable: not a recognised image format"
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        msg = str(e) or type(e).__name__
        low = msg.lower()
        kind = "truncated" if ("truncated" in low or "broken data stream" in low
                               or isinstance(e, EOFError)) else "undecodable"
        reason = f"{kind}: {msg}"
    else:
        return rgb, None
    _warn_once(path, reason)
    return None, reason


def build_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    train: bool = False, augment: bool = False, flip: bool = True,
                    color_jitter: float = 0.0) -> T.Compose:
    """PIL RGB image -> normalised float tensor [3, image_size, image_size].

    eval (and train without augment): bicubic resize of the short side + center crop.
    train with augment: RandomResizedCrop(scale 0.5-1) + horizontal flip (unless flip=False; the
    caption-aware flip of data.flip=swap happens in TrainDataset instead).
    train with color_jitter=s > 0: ColorJitter(brightness=s, contrast=s, saturation=s), no hue
    jitter: captions name colours ("a red square"), and a hue shift would make them false.
    """
    if train and augment:
        geometry = [T.RandomResizedCrop(image_size, scale=(0.5, 1.0),
                                        interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
        if flip:  # plain flip: "left"/"right" in a caption become wrong (see data.flip=swap)
            geometry.append(T.RandomHorizontalFlip())
    else:
        geometry = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                    T.CenterCrop(image_size)]
    if color_jitter < 0:
        raise ConfigError(f"data.color_jitter must be >= 0, got {color_jitter}")
    photometric = [T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)] \
        if train and color_jitter > 0 else []
    return T.Compose(geometry + photometric + [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


# --------------------------------------------------------------------------- left/right-aware flips

FLIP_MODES = ("plain", "swap", "off")
# "left"/"right" as whole words, with the suffixes that keep the meaning directional
# (leftmost, rightward(s), lefthand; "left-hand" matches at the hyphen).
_LEFT_RIGHT = re.compile(r"\b(left|right)(most|wards?|hand(ed)?)?\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """The caption of the mirrored image: every left <-> right swapped, keeping case
    ("Left" -> "Right", "LEFTMOST" -> "RIGHTMOST"). Non-directional senses ("right now", "he
    left") are swapped too: a known, rare imprecision."""
    def repl(m: re.Match) -> str:
        word = m.group(1)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + (m.group(2) or "")
    return _LEFT_RIGHT.sub(repl, caption)


def left_right_captions(captions: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """Which captions change under a horizontal flip, and how.

    Returns (flip_row [M] LongTensor: row in the swapped list for caption j, or -1 if caption j
    does not mention left/right; swapped [K] the swapped captions of those K, in caption order).
    """
    rows, swapped = [], []
    for c in captions:
        if _LEFT_RIGHT.search(c):
            rows.append(len(swapped))
            swapped.append(swap_left_right(c))
        else:
            rows.append(-1)
    return torch.tensor(rows, dtype=torch.long), swapped


# --------------------------------------------------------------------------- datasets

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """Stateless 64-bit hash of a few ints (splitmix64 rounds): same value in every process."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


class TrainDataset(Dataset):
    """(image [3,H,W], text embedding [D] of one of its captions, image row) per image.

    The caption is a pure function of (seed, epoch, i), so it is reproducible and identical
    whether items are loaded in the main process or in DataLoader workers. set_epoch must be
    called before the DataLoader is iterated; with persistent_workers=True the workers keep
    the dataset copy (and epoch) they started with, so do not combine the two.

    With `flip_embeds` / `flip_rows` (data.flip=swap, see `left_right_captions`) the dataset
    mirrors half of the images itself (also a pure function of (seed, epoch, i)) and, when the
    chosen caption mentions left/right, returns the embedding of its swapped version, so the
    caption stays true for the flipped image.
    """

    def __init__(self, split: CaptionedImages, text_embeds: torch.Tensor, transform: Callable,
                 seed: int = 0, draft_size: int | None = None, flip_embeds: torch.Tensor | None = None,
                 flip_rows: torch.Tensor | None = None):
        offsets = split.caption_offsets()  # [N+1]
        if text_embeds.ndim != 2 or text_embeds.shape[0] != int(offsets[-1]):
            raise ValueError(f"{split.name}: text_embeds must be [{int(offsets[-1])}, D] (one row per "
                             f"caption), got {tuple(text_embeds.shape)}")
        if (flip_embeds is None) != (flip_rows is None) or (
                flip_rows is not None and flip_rows.shape != (text_embeds.shape[0],)):
            raise ValueError(f"{split.name}: flip_embeds [K, D] and flip_rows [M] come together, one row per caption")
        self.paths = [rec.path for rec in split.images]
        self.offsets = offsets.tolist()  # plain ints: cheap to index, cheap to pickle to workers
        self.text_embeds = text_embeds  # [M, D]
        self.flip_embeds = flip_embeds  # [K, D] embeddings of the left/right-swapped captions
        self.flip_rows = flip_rows  # [M] row in flip_embeds, -1 = caption has no left/right
        self.transform = transform
        self.seed = seed
        self.draft_size = draft_size
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption_index(self, i: int) -> int:
        """Flat caption index used for image i in the current epoch."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return start + _mix(self.seed, self.epoch, i) % (end - start)

    def flipped(self, i: int) -> bool:
        """Whether image i is mirrored in the current epoch (caption-aware flips only)."""
        return self.flip_rows is not None and _mix(self.seed, self.epoch, i, 0xF11B) & 1 == 1

    def __getitem__(self, i: int):
        img, _reason = load_image(self.paths[i], self.draft_size)
        if img is None:
            return None
        j = self.caption_index(i)
        text = self.text_embeds[j]
        if self.flipped(i):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            row = int(self.flip_rows[j])
            if row >= 0:
                text = self.flip_embeds[row]
        # clone: a view would drag the whole [M, D] storage through worker shared memory
        return self.transform(img), text.clone(), i


class EvalImageDataset(Dataset):
    """(image [3,H,W], image row) for every image once; captions come from the text cache."""

    def __init__(self, split: CaptionedImages, transform: Callable, draft_size: int | None = None):
        self.paths = [rec.path for rec in split.images]
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img, _reason = load_image(self.paths[i], self.draft_size)
        if img is None:
            return None
        return self.transform(img), i


def collate_skip(batch: list, n_fields: int = 3) -> tuple:
    """Drop None items, stack the rest; the last element is n_skipped (an int).

    TrainDataset items -> (images [B,3,H,W], texts [B,D], index [B], n_skipped)
    EvalImageDataset items -> (images [B,3,H,W], index [B], n_skipped)
    n_fields (3 for train, 2 for eval items) only matters when every item is None: the result
    is then n_fields empty tensors (first dim 0) + n_skipped. Use `collate_train` /
    `collate_eval` as DataLoader collate_fn.
    """
    items = [b for b in batch if b is not None]
    n_skipped = len(batch) - len(items)
    if not items:
        empties = [torch.empty(0) for _ in range(n_fields - 1)] + [torch.empty(0, dtype=torch.long)]
        return (*empties, n_skipped)
    fields = []
    for column in zip(*items):
        if isinstance(column[0], torch.Tensor):
            fields.append(torch.stack(column))
        else:
            fields.append(torch.tensor(column, dtype=torch.long))
    return (*fields, n_skipped)


collate_train = functools.partial(collate_skip, n_fields=3)
collate_eval = functools.partial(collate_skip, n_fields=2)
