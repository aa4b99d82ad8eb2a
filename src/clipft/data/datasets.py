"""Datasets over a `CaptionedImages` split: training items, evaluation items, and the collation that
drops unreadable images and counts them."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import load_image
from .records import CaptionedImages


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


def sample_seed(seed: int, epoch: int, i: int) -> int:
    """The augmentation seed of sample i in `epoch` (random crop, flip, colour jitter): a pure
    function of (seed, epoch, i), so which DataLoader worker decodes the sample, how many workers
    there are, and which batches a resumed epoch skipped change no pixel. 63 bits (a valid
    torch.Generator seed and int64)."""
    return _mix(seed, epoch, i, 0xA116) >> 1


def epoch_caption_index(offsets: Sequence[int], seed: int, epoch: int, i: int) -> int:
    """The flat caption index image i uses in `epoch`: a pure function of (seed, epoch, i), so it is
    the same in every DataLoader worker, after a resume, and for every image source (JPEG or
    prepared cache). Image i owns captions offsets[i]:offsets[i+1]."""
    start, end = offsets[i], offsets[i + 1]
    return start + _mix(seed, epoch, i) % (end - start)


class EpochCaptions:
    """The caption rule the training-style datasets share (TrainDataset, data.prepared_reader.PreparedDataset,
    clipft.CaptionDataset): set_epoch(e), then image i uses caption `caption_index(i)`
    (`epoch_caption_index`), so switching the image source changes no caption. Needs `offsets`,
    `seed` and `epoch` attributes."""

    offsets: Sequence[int]
    seed: int
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        """Captions are drawn per (seed, epoch, image): a new epoch, new captions."""
        self.epoch = epoch

    def caption_index(self, i: int) -> int:
        """Flat caption index used for image i in the current epoch."""
        return epoch_caption_index(self.offsets, self.seed, self.epoch, i)


class TrainDataset(EpochCaptions, Dataset):
    """(image [3,H,W], text embedding [D] of one of its captions, image row) per image.

    The caption and the augmentation (crop, flip, colour jitter: `augment`) are pure functions of
    (seed, epoch, i), so they are reproducible and identical whether items are loaded in the main
    process or in any number of DataLoader workers, and after a mid-epoch resume. set_epoch must be
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

    def augment(self, img: Image.Image, i: int):
        """self.transform(img) with the CPU RNG seeded from (seed, epoch, i) (`sample_seed`); the
        process's own RNG stream is put back afterwards, so the main process (num_workers=0) draws
        the same numbers as with workers. torchvision's random transforms draw from the global CPU
        generator: seeding that one (not torch.manual_seed, which also reseeds CUDA) is enough."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, i))
            return self.transform(img)

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
        return self.augment(img, i), text.clone(), i


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
