"""Images: robust decoding to RGB, the train/eval transforms, and left/right-aware flips."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from ..config import ConfigError, Flip, choices

from ..preprocess import CenterSquareResize, decode_image  # the one geometry (re-exported)

log = logging.getLogger(__name__)

_warned: set[str] = set()  # per process: DataLoader workers each warn at most once per path


def _warn_once(path: Path, reason: str) -> None:
    key = str(path)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s: skipping image (%s)", path, reason)




def load_image(path: str | Path, draft_size: int | None = None, warn: bool = True
               ) -> tuple[Image.Image | None, str | None]:
    """Decode an image as RGB: (image, None), or (None, reason) if it cannot be used.

    reason is "missing", "unreadable: ...", "truncated: ..." or "undecodable: ...". The format is
    sniffed from the content, not the extension. With draft_size, JPEGs are decoded at the
    smallest DCT scale whose sides are still >= draft_size (much faster for big photos).
    Each bad path is logged once per process (unless warn=False: `clipft validate` reports them).
    """
    rgb, reason = decode_image(path, draft_size)  # one decoder for training, evaluation and the API
    if rgb is None and warn:
        _warn_once(Path(path), reason)
    return rgb, reason


def build_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    train: bool = False, augment: bool = False, flip: bool = True,
                    color_jitter: float = 0.0, output: str = "float") -> T.Compose:
    """PIL RGB image -> normalised float tensor [3, image_size, image_size], or with
    output="uint8" the raw pixels [image_size, image_size, 3] uint8: training then normalises whole
    batches on the device (`device_transform.DeviceTransform`), so workers skip the per-image float work and
    4x fewer bytes cross to the GPU.

    eval (and train without augment): the centre square, resized to image_size (bicubic, antialiased),
    in one pass (`CenterSquareResize`).
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
        geometry = [CenterSquareResize(image_size)]
    if color_jitter < 0:
        raise ConfigError(f"data.color_jitter must be >= 0, got {color_jitter}")
    photometric = [T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)] \
        if train and color_jitter > 0 else []
    if output == "uint8":
        return T.Compose(geometry + photometric + [_to_uint8_hwc])
    return T.Compose(geometry + photometric + [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def _to_uint8_hwc(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 [H, W, 3] tensor (a copy of the pixel buffer, no float conversion)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


# --------------------------------------------------------------------------- left/right-aware flips

FLIP_MODES = choices(Flip)  # data.flip: plain, swap, off
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

