"""One optimizer step's batches: the loader's micro-batches grouped per step (the same on every rank),
and the keyed device augmentation that makes a resumed epoch augment as an uninterrupted one."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from .. import distributed


def micro_batch_groups(loader: DataLoader, k: int, counts: dict,
                       keep_ids: bool = False) -> Iterator[list[tuple[torch.Tensor, ...]]]:
    """The loader's (images, texts) batches grouped k at a time, one group per optimizer step (the
    last group of an epoch may be shorter). A batch is left out, by every rank alike, when some rank
    holds fewer than 2 readable images (the loss needs negatives). Updates counts (all ranks
    summed): "skipped_images" (unreadable), "images" (in kept batches), "batch" (last kept global batch).
    keep_ids: (images, texts, image ids [B]) triples (the recipe's losses need each row's image)."""
    group = MicroBatches()
    for images, texts, idx, n_skipped in loader:
        per_rank = distributed.all_gather_ints([images.shape[0], n_skipped])  # [[B_r, skipped_r], ...]
        counts["skipped_images"] += sum(r[1] for r in per_rank)
        if min(r[0] for r in per_rank) < 2:
            continue
        counts["batch"] = sum(r[0] for r in per_rank)
        counts["images"] += counts["batch"]
        group.append((images, texts, idx) if keep_ids else (images, texts))
        group.indices.append(idx)
        if len(group) == k:
            yield group
            group = MicroBatches()
    if group:
        yield group


class MicroBatches(list):
    """One optimizer step's [(images, texts), ...], with `indices`: each micro-batch's dataset rows [B]
    (the keys of its on-device augmentation, `keyed_transform`)."""

    def __init__(self) -> None:
        super().__init__()
        self.indices: list[torch.Tensor] = []


def keyed_transform(transform: Any, micro: list, seed: int, epoch: int) -> Any:
    """The device transform for one step's micro-batches: with augmentation, each call (train_step
    makes one per micro-batch, in order) crops and flips its samples by their (seed, epoch, row)
    (`DeviceTransform.sample_keys`), so a resumed epoch augments exactly as an uninterrupted one."""
    indices = getattr(micro, "indices", None)
    if not getattr(transform, "augment", False) or not indices or len(indices) != len(micro):
        return transform
    keys = iter([transform.sample_keys(seed, epoch, idx) for idx in indices])
    return lambda images: transform(images, keys=next(keys))
