"""The data a training run reads: both splits loaded and checked, their caption embeddings
(cached once, `text.get_text_embeddings`), and the prepared image cache when one covers the train
split. `train.setup_data` builds the datasets and loaders from this.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..config import Config
from .errors import TrainingError
from ..data import CaptionedImages, left_right_captions, load_split
from ..data import prepared_split_dir, swapped_text_cache_file, text_cache_file
from ..data.caches import data_root as data_root_of, unused_prepared_note
from ..data.prepare import VERIFY_SAMPLE
from ..data.device_transform import DeviceTransform
from ..data.prepared_reader import PreparedDataset, PreparedImages
from ..data.validate import preflight
from ..model import ensure_image_weights
from ..text import get_text_embeddings, load_text_encoder

log = logging.getLogger("clipft.train.loop")  # part of the trainer: its messages keep the trainer's logger name



def _digest(items: Iterable[str]) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


# Images whose whole content goes into the identity (evenly spaced over the split): with the byte
# size of every image, an image edited in place is seen, whatever the split's size, at the cost of
# one stat per image plus reading IDENTITY_SAMPLE files.
IDENTITY_SAMPLE = 32


def _byte_size(path: str | Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _file_digest(path: str | Path) -> str:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:16]
    except OSError:
        return "unreadable"


def split_identity(split: CaptionedImages) -> dict[str, Any]:
    """What identifies one split's data whatever its path (and its files' times, which a copy
    changes): format, sizes, caption and file-name digests, the byte size of every image and the
    content of IDENTITY_SAMPLE of them."""
    paths = [rec.path for rec in split.images]
    n = len(paths)
    sample = sorted({i * n // IDENTITY_SAMPLE for i in range(IDENTITY_SAMPLE)}) if n else []
    return {"format": split.name.split(":", 1)[0], "images": len(split), "captions": len(split.captions),
            "captions_sha256": _digest(split.captions),
            "image_names_sha256": _digest(Path(p).name for p in paths),
            "image_bytes_sha256": _digest(str(_byte_size(p)) for p in paths),
            "image_sample_sha256": _digest(_file_digest(paths[i]) for i in sample)}


def data_identity(data_root: str | Path, train: CaptionedImages, val: CaptionedImages) -> dict[str, Any]:
    """The identity of a run's data, stored in every checkpoint (key "data") and compared on resume
    (`resume.check_data`)."""
    return {"path": str(Path(data_root).resolve()), "train": split_identity(train), "val": split_identity(val)}


@dataclass
class PreparedData:
    train: CaptionedImages
    val: CaptionedImages
    train_text: torch.Tensor  # [M_train, D], L2-normalised, caption order of `train`
    val_text: torch.Tensor  # [M_val, D]
    text_info: dict
    identity: dict  # resume.data_identity: checked when a rerun resumes the run
    # data.flip=swap only: embeddings [K, D] of the train captions with left/right swapped, and
    # each train caption's row in it [M_train] (-1 = no left/right); see data.left_right_captions.
    train_flip_text: torch.Tensor | None = None
    train_flip_rows: torch.Tensor | None = None


def prepare_data(cfg: Config, data_root: str | Path, device: torch.device,
                 check: Callable[[dict], None] | None = None) -> PreparedData:
    """Load and validate both splits (refusing bad annotation files, missing images and a train/val
    leak before anything trains: `validate.preflight`), then load or build the cached caption
    embeddings; the text encoder is freed afterwards. check(data identity): a resume's data check,
    before any caption is embedded."""
    data_root = Path(data_root)
    train = load_split(data_root, cfg.data.train_split, cfg.data)
    val = load_split(data_root, cfg.data.val_split, cfg.data)
    if len(train) == 0 or len(val) == 0:
        raise TrainingError(f"{data_root}: no captioned images in split "
                            f"{cfg.data.train_split if len(train) == 0 else cfg.data.val_split!r}")
    preflight(train, val, cfg.data)
    identity = data_identity(data_root, train, val)
    if check is not None:
        check(identity)
    # Everything that can fail without computing fails here, before the captions are embedded.
    ensure_image_weights(cfg.model.backbone, cfg.model.image_weights)
    encoder = load_text_encoder(cfg.text.encoder, device=device, max_length=cfg.text.max_length, amp=cfg.train.amp)
    embeds, infos = [], {}
    for name, split in ((cfg.data.train_split, train), (cfg.data.val_split, val)):
        emb, info = get_text_embeddings(
            split.captions, cfg.text.encoder, text_cache_file(data_root, name, cfg),
            device=device, batch_size=cfg.text.batch_size, max_length=cfg.text.max_length,
            on_mismatch=cfg.text.on_mismatch, encoder=encoder)
        embeds.append(emb)
        infos[name] = {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}
    infos["encoder_dim"] = encoder.dim
    flip_text, flip_rows = _left_right_swapped(cfg, train, swapped_text_cache_file(data_root, cfg), encoder, device,
                                               infos)
    del encoder  # frozen and no longer needed: training reads the cache only
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return PreparedData(train, val, embeds[0], embeds[1], infos, identity, flip_text, flip_rows)


def _left_right_swapped(cfg: Config, train: CaptionedImages, swap_file: Path, encoder, device: torch.device,
                        infos: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For data.flip=swap: embeddings of the train captions that mention left/right, with the two
    words swapped, cached like any caption list (fingerprinted, `<split>-lrswap` cache file)."""
    if not cfg.data.augment or cfg.data.flip == "off":
        return None, None
    rows, swapped = left_right_captions(train.captions)
    if cfg.data.flip == "plain":
        if swapped:
            log.warning("%d of %d train captions mention left/right: with data.flip=plain they are wrong for "
                        "flipped images (data.flip=swap fixes that, data.flip=off avoids it)",
                        len(swapped), len(rows))
        return None, None
    if not swapped:
        return torch.zeros(0, encoder.dim), rows
    name = f"{cfg.data.train_split}-lrswap"
    emb, info = get_text_embeddings(
        swapped, cfg.text.encoder, swap_file, device=device,
        batch_size=cfg.text.batch_size, max_length=cfg.text.max_length, on_mismatch=cfg.text.on_mismatch,
        encoder=encoder)
    infos[name] = {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}
    return emb, rows


def open_prepared_train(cfg: Config, data_root: str | Path, train: CaptionedImages, text: torch.Tensor):
    """(PreparedDataset, DeviceTransform) when a finished `clipft prepare-images` cache covers every
    training image and the augmentation can run on the device; None otherwise (JPEG decoding).
    A cache whose sizes or sampled chunk checksums do not match is refused (DataError, one line).

    The device transform does resize, random resized crop and plain flips; left/right caption
    swapping and colour jitter live in the JPEG path only, so those settings fall back to it."""
    if not cfg.data.prepared:
        return None
    prepared = PreparedImages.open(prepared_split_dir(data_root, cfg.data.train_split, cfg))
    if prepared is None:
        note = unused_prepared_note(data_root, cfg.data.train_split, cfg)  # one at another size: say so
        if note:
            log.warning("%s", note)
        return None
    if cfg.data.augment and (cfg.data.flip == "swap" or cfg.data.color_jitter > 0):
        log.info("prepared images found, but data.flip=swap / data.color_jitter need the JPEG path")
        return None
    if prepared.size < cfg.data.image_size:
        log.info("prepared images are %d px, smaller than data.image_size=%d: decoding JPEGs instead",
                 prepared.size, cfg.data.image_size)
        return None
    rows = prepared.rows_for(train, data_root_of(data_root, cfg.data.train_split, cfg))
    if rows is None:
        log.info("%s does not hold every training image: decoding JPEGs instead", prepared.path)
        return None
    prepared.verify(sample=VERIFY_SAMPLE, seed=cfg.train.seed)  # sizes were checked by open(); DataError if damaged
    log.info("training images come from the prepared cache %s (%d px, no JPEG decoding)", prepared.path, prepared.size)
    ds = PreparedDataset(prepared, rows, text, train.caption_offsets().tolist(), seed=cfg.train.seed)
    tf = DeviceTransform(cfg.data.image_size, cfg.data.mean, cfg.data.std, augment=cfg.data.augment,
                         flip=cfg.data.flip == "plain")
    return ds, tf
