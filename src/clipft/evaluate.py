"""Retrieval metrics (pure functions over embeddings) and checkpoint evaluation.

COCO has ~5 captions per image, so every metric takes an explicit caption->image index
(`text_to_image`, LongTensor [M]) instead of assuming a 1:1 diagonal.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import Config
from .data import CaptionedImages, EvalImageDataset, build_transform, collate_eval
from .loss import clip_loss
from .model import ImageTower

log = logging.getLogger(__name__)

DIRECTIONS = ("image_to_text", "text_to_image")


@torch.inference_mode()
def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                    chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0 = top) of the best positive for every image query and every caption query.

    image_emb [N, D], text_emb [M, D], text_to_image [M] (image row of each caption).
    Returns (image_rank [N], text_rank [M]) as LongTensors.

    One pass over row chunks of the score matrix S = image_emb @ text_emb.T; the full [N, M]
    matrix is never held. Instead of sorting, each query's rank is the number of *negatives*
    that score strictly higher than its best positive (ties count in the query's favour):
      image i:   #{captions j of other images : S[i, j] > max_{j' of i} S[i, j']}
      caption j: #{images i != img(j)         : S[i, j] > S[img(j), j]}
    Positives are masked out of the comparison, so their own scores need not be bit-identical
    between the elementwise dot used for thresholds and the chunked matmul.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D] embeddings, got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=image_emb.device)
    n, m = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (m,):
        raise ValueError(f"text_to_image must have shape [{m}], got {tuple(text_to_image.shape)}")
    if m and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n):
        raise ValueError("text_to_image holds an index outside [0, num_images)")
    text_emb = text_emb.to(image_emb.device, image_emb.dtype)

    # Positive score of every caption with its own image: [M].
    pos = (image_emb[text_to_image] * text_emb).sum(-1)
    # Best positive per image: [N]; an image without captions gets +inf (never a hit, rank 0 is
    # meaningless for it, but it is excluded below).
    best_pos = torch.full((n,), float("-inf"), dtype=pos.dtype, device=pos.device)
    best_pos.scatter_reduce_(0, text_to_image, pos, reduce="amax")

    if chunk_size is None:
        # Keep one [chunk, M] fp32 block around 256 MiB.
        chunk_size = max(1, min(n, (256 * 2**20) // max(1, 4 * m)))

    image_rank = torch.zeros(n, dtype=torch.long, device=image_emb.device)
    text_rank = torch.zeros(m, dtype=torch.long, device=image_emb.device)
    cols = torch.arange(m, device=image_emb.device)
    above = torch.empty(min(n, chunk_size), m, dtype=torch.bool, device=image_emb.device)  # reused [c, M]
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        s = image_emb[start:stop] @ text_emb.T  # [c, M]
        # Mask each caption's own image row inside this chunk (positives never count as negatives).
        own = (text_to_image >= start) & (text_to_image < stop)
        s[text_to_image[own] - start, cols[own]] = float("-inf")
        buf = above[:stop - start]
        image_rank[start:stop] = torch.gt(s, best_pos[start:stop, None], out=buf).sum(1)
        text_rank += torch.gt(s, pos[None, :], out=buf).sum(0)
        del s
    return image_rank, text_rank


def recall_from_ranks(ranks: torch.Tensor, ks: Iterable[int]) -> dict[str, float]:
    """{"R@k": percent of queries whose best positive ranks < k}."""
    total = max(1, ranks.numel())
    return {f"R@{k}": 100.0 * float((ranks < k).sum()) / total for k in ks}


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk_size: int | None = None) -> dict[str, dict[str, float]]:
    """COCO-protocol Recall@K in percent, both directions.

    image->text: an image is a hit at K if ANY of its captions is in the top K captions.
    text->image: a caption is a hit at K if its image is in the top K images.
    Images that own no caption are not image queries.
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    image_rank, text_rank = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size)
    has_caption = torch.zeros(image_emb.shape[0], dtype=torch.bool, device=image_rank.device)
    has_caption[text_to_image.to(image_rank.device)] = True
    return {
        "image_to_text": recall_from_ranks(image_rank[has_caption], ks),
        "text_to_image": recall_from_ranks(text_rank, ks),
    }


def mean_recall(metrics: dict[str, dict[str, float]], k: int | None = None) -> float:
    """Mean of R@k over both directions (k=None: over every K, the usual 'rsum / 6')."""
    vals = [v for d in DIRECTIONS for name, v in metrics[d].items() if k is None or name == f"R@{k}"]
    return sum(vals) / max(1, len(vals))


def format_recall_table(metrics: dict[str, dict[str, float]]) -> str:
    """A small fixed-width table: one row per direction, one column per K."""
    ks = list(metrics["image_to_text"].keys())
    lines = [f"{'direction':<15}" + "".join(f"{k:>8}" for k in ks)]
    for d in DIRECTIONS:
        lines.append(f"{d:<15}" + "".join(f"{metrics[d][k]:8.2f}" for k in ks))
    return "\n".join(lines)


@torch.inference_mode()
def embed_images(model: ImageTower, split: CaptionedImages, cfg: Config, device: torch.device,
                 amp_dtype: torch.dtype | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every image of a split: returns (emb [N_ok, D] fp32 on CPU, rows [N_ok] of the images
    that decoded; unreadable images are left out and counted by the caller)."""
    tf = build_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std, train=False)
    loader = DataLoader(EvalImageDataset(split, tf, draft_size=cfg.data.image_size), batch_size=cfg.eval.batch_size,
                        shuffle=False, num_workers=cfg.data.num_workers, collate_fn=collate_eval,
                        pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    embs, rows = [], []
    for images, idx, _skipped in tqdm(loader, desc="embed images", disable=None if progress else True, leave=False):
        if images.shape[0] == 0:
            continue
        images = images.to(device, non_blocking=True)
        if device.type == "cuda" and cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            embs.append(model(images).float().cpu())  # [B, D]
        rows.append(idx)
    model.train(was_training)
    d = model.embed_dim
    return (torch.cat(embs) if embs else torch.zeros(0, d)), (torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long))


def evaluate_split(image_emb: torch.Tensor, rows: torch.Tensor, split: CaptionedImages,
                   text_emb: torch.Tensor, ks=(1, 5, 10), logit_scale: float | None = None,
                   batch_size: int = 256) -> dict:
    """Recall@K (and, given logit_scale, the validation loss) for the images in `rows`.

    Captions of images that could not be read are dropped with them, so every remaining caption
    query still has its image among the candidates.
    """
    c2i = split.caption_to_image  # [M] image row per caption
    row_of = torch.full((len(split),), -1, dtype=torch.long)
    row_of[rows] = torch.arange(rows.numel())
    new_c2i = row_of[c2i]  # [M] row in image_emb, -1 if its image was skipped
    keep = new_c2i >= 0
    metrics = retrieval_recall(image_emb, text_emb[keep], new_c2i[keep], ks=ks)
    out: dict[str, Any] = {**metrics, "num_images": int(rows.numel()), "num_captions": int(keep.sum())}
    if logit_scale is not None and rows.numel() > 1:
        # Validation loss: each image with its first caption, in fixed batches, like training.
        offsets = split.caption_offsets()
        first_text = text_emb[offsets[rows]]  # [N_ok, D]
        losses, weights = [], []
        for s in range(0, rows.numel(), batch_size):
            i, t = image_emb[s:s + batch_size], first_text[s:s + batch_size]
            if i.shape[0] < 2:
                continue
            losses.append(float(clip_loss(i, t, torch.tensor(logit_scale))["loss"]))
            weights.append(i.shape[0])
        out["val_loss"] = sum(l * w for l, w in zip(losses, weights)) / max(1, sum(weights))
    return out


def write_metrics(path: str | Path, metrics: dict) -> None:
    Path(path).write_text(json.dumps(metrics, indent=2) + "\n")


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path, split: str = "val",
                        cfg: Config | None = None, out: str | Path | None = None,
                        device: str = "auto", progress: bool = True) -> dict:
    """Recall@K of a trained checkpoint on a split; writes metrics.json beside the checkpoint
    (or to `out`). `cfg` defaults to the config saved in the checkpoint (data subset, image size,
    text encoder), so the protocol matches training unless overridden."""
    from .config import from_dict
    from .data import load_split, text_cache_file
    from .model import read_checkpoint, tower_from_checkpoint
    from .text import get_text_embeddings
    from .runtime import amp_dtype_for, resolve_device

    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint)
    model = tower_from_checkpoint(ckpt)
    cfg = cfg if cfg is not None else from_dict(ckpt["config"])
    del ckpt  # optimizer state is not needed for evaluation
    dev = resolve_device(device if device != "auto" else cfg.train.device)
    data_root = Path(data_root)
    data = load_split(data_root, split, cfg.data)
    text_emb, _ = get_text_embeddings(data.captions, cfg.text.encoder, text_cache_file(data_root, split, cfg),
                                      device=dev, batch_size=cfg.text.batch_size, max_length=cfg.text.max_length,
                                      on_mismatch=cfg.text.on_mismatch)
    if text_emb.shape[1] != model.embed_dim:
        raise ValueError(f"{checkpoint}: image tower outputs {model.embed_dim}-d embeddings but text encoder "
                         f"{cfg.text.encoder!r} gives {text_emb.shape[1]}-d")
    model = model.to(dev)
    emb, rows = embed_images(model, data, cfg, dev, amp_dtype_for(dev, cfg.train.amp), progress=progress)
    metrics = evaluate_split(emb, rows, data, text_emb, cfg.eval.ks)
    metrics.update(split=split, skipped_images=len(data) - int(rows.numel()), checkpoint=str(checkpoint),
                   protocol=f"{data.name}: {metrics['num_images']} images x {metrics['num_captions']} captions, "
                            "all captions per image")
    write_metrics(Path(out) if out else checkpoint.parent / "metrics.json", metrics)
    return metrics
