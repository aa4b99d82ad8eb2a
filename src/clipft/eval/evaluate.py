"""Retrieval metrics (pure functions over embeddings) and checkpoint evaluation.

COCO has ~5 captions per image, so every metric takes an explicit caption->image index
(`text_to_image`, LongTensor [M]) instead of assuming a 1:1 diagonal.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import distributed
from ..config import Config
from ..data import CaptionedImages, EvalImageDataset, build_transform, collate_eval, eval_text_cache_file
from ..loss import clip_loss
from ..model import ImageTower
from .protocols import EvalSplit
from ..runtime import worker_count

log = logging.getLogger(__name__)

DIRECTIONS = ("image_to_text", "text_to_image")


class EvaluationError(ValueError):
    """Embeddings that cannot be scored (non-finite values, wrong shapes): refused, never ranked."""


def check_finite(image_emb: torch.Tensor, text_emb: torch.Tensor, where: str = "embeddings") -> None:
    """Raise EvaluationError naming `where` and how many image/text rows hold NaN or inf.

    Every comparison with NaN is false, so a NaN query would otherwise outrank every negative and
    score a perfect recall: a broken model must never look good."""
    bad_img = int((~torch.isfinite(image_emb)).any(dim=-1).sum()) if image_emb.numel() else 0
    bad_txt = int((~torch.isfinite(text_emb)).any(dim=-1).sum()) if text_emb.numel() else 0
    if bad_img or bad_txt:
        raise EvaluationError(f"{where}: {bad_img} of {image_emb.shape[0]} image embeddings and {bad_txt} of "
                              f"{text_emb.shape[0]} text embeddings are not finite (NaN/inf): the model diverged "
                              "or its input is broken; refusing to score them")


# Scores are compared in float64: fp32 inputs give float64 dot products exact to ~1e-16, so two
# scores that are equal in exact arithmetic (identical embeddings) are equal here within TIE_ATOL,
# whichever kernel computed them (the elementwise positive vs the chunked matmul), while two scores
# that differ in fp32 differ by far more.
TIE_ATOL = 1e-9


@torch.inference_mode()
def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                    chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0 = top) of the best positive for every image query and every caption query.

    image_emb [N, D], text_emb [M, D], text_to_image [M] (image row of each caption).
    Returns (image_rank [N], text_rank [M]) as LongTensors. Non-finite embeddings are refused
    (`EvaluationError`).

    One pass over row chunks of the score matrix S = image_emb @ text_emb.T (float64); the full
    [N, M] matrix is never held. Instead of sorting, each query's rank is the number of *negatives*
    that score at least as high as its best positive. Ties count AGAINST the query: a negative
    scoring equal to the positive ranks ahead of it, so a collapsed tower (every image the same
    embedding) scores 0 text->image and about chance image->text, never better.
      image i:   #{captions j of other images : S[i, j] >= max_{j' of i} S[i, j'] - TIE_ATOL}
      caption j: #{images i != img(j)         : S[i, j] >= S[img(j), j] - TIE_ATOL}
    Positives are masked out of the comparison (they are not negatives, even when tied).
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise EvaluationError(f"expected [N, D] and [M, D] embeddings, got {tuple(image_emb.shape)} "
                              f"and {tuple(text_emb.shape)}")
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=image_emb.device)
    n, m = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (m,):
        raise EvaluationError(f"text_to_image must have shape [{m}], got {tuple(text_to_image.shape)}")
    if m and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n):
        raise EvaluationError("text_to_image holds an index outside [0, num_images)")
    check_finite(image_emb, text_emb)
    image_emb = image_emb.double()
    text_emb = text_emb.to(image_emb.device, torch.float64)

    # Positive score of every caption with its own image: [M].
    pos = (image_emb[text_to_image] * text_emb).sum(-1)
    # Best positive per image: [N]; an image without captions keeps -inf (it is no image query;
    # retrieval_recall leaves it out).
    best_pos = torch.full((n,), float("-inf"), dtype=pos.dtype, device=pos.device)
    best_pos.scatter_reduce_(0, text_to_image, pos, reduce="amax")
    pos_lo, best_lo = pos - TIE_ATOL, best_pos - TIE_ATOL  # a score >= these counts as a tie or better

    if chunk_size is None:
        # Keep one [chunk, M] float64 block around 256 MiB.
        chunk_size = max(1, min(n, (256 * 2**20) // max(1, 8 * m)))

    image_rank = torch.zeros(n, dtype=torch.long, device=image_emb.device)
    text_rank = torch.zeros(m, dtype=torch.long, device=image_emb.device)
    cols = torch.arange(m, device=image_emb.device)
    above = torch.empty(min(n, chunk_size), m, dtype=torch.bool, device=image_emb.device)  # reused [c, M]
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        s = image_emb[start:stop] @ text_emb.T  # [c, M] float64
        # Mask each caption's own image row inside this chunk (positives never count as negatives).
        own = (text_to_image >= start) & (text_to_image < stop)
        s[text_to_image[own] - start, cols[own]] = float("-inf")
        buf = above[:stop - start]
        image_rank[start:stop] = torch.ge(s, best_lo[start:stop, None], out=buf).sum(1)
        text_rank += torch.ge(s, pos_lo[None, :], out=buf).sum(0)
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


def format_fold_spread(metrics: dict) -> str:
    """The per-fold spread of a protocol with folds: std (min-max) per direction and K."""
    f = metrics["folds"]
    lines = [f"mean over {f['count']} folds; per-fold spread, std (min-max):"]
    for d in DIRECTIONS:
        lines.append(f"{d:<15}" + "  ".join(f"{k} {f['std'][d][k]:.2f} ({f['min'][d][k]:.2f}-{f['max'][d][k]:.2f})"
                                            for k in f["std"][d]))
    return "\n".join(lines)


@torch.inference_mode()
def embed_images(model: ImageTower, split: CaptionedImages, cfg: Config, device: torch.device,
                 amp_dtype: torch.dtype | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every image of a split: returns (emb [N_ok, D] fp32 on CPU, rows [N_ok] of the images
    that decoded; unreadable images are left out and counted by the caller)."""
    tf = build_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std, train=False)
    loader = DataLoader(EvalImageDataset(split, tf, draft_size=cfg.data.image_size), batch_size=cfg.eval.batch_size,
                        shuffle=False, num_workers=worker_count(cfg.data.num_workers), collate_fn=collate_eval,
                        pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    embs, rows = [], []
    for images, idx, _skipped in tqdm(loader, desc="embed images", disable=None if progress else True, leave=False):
        if images.shape[0] == 0:
            continue
        images = images.to(device, non_blocking=True)
        if cfg.train.channels_last and (device.type == "cuda" or amp_dtype is not None):  # NHWC where autocast runs
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            embs.append(model(images).float().cpu())  # [B, D]
        rows.append(idx)
    model.train(was_training)
    d = model.embed_dim
    return (torch.cat(embs) if embs else torch.zeros(0, d)), (torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long))



@torch.inference_mode()
def sharded_embed_images(model: torch.nn.Module, split: CaptionedImages, cfg: Config, device: torch.device,
                         amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`embed_images` with the images split over the ranks (contiguous chunks) and the results
    gathered to every rank: (emb [N_ok, D] CPU, rows [N_ok]) equal to a single-process
    embed_images, rows ascending. `model` is the bare ImageTower (never the DDP wrapper, whose forward
    would broadcast buffers a different number of times on ranks with more batches)."""
    if not distributed.is_distributed():
        return embed_images(model, split, cfg, device, amp_dtype)
    rank, world, n = distributed.get_rank(), distributed.get_world_size(), len(split)
    start, stop = rank * n // world, (rank + 1) * n // world
    part = CaptionedImages(images=split.images[start:stop], name=f"{split.name}:shard{rank}of{world}")
    if stop > start:
        emb, rows = embed_images(model, part, cfg, device, amp_dtype)
        rows = rows + start
    else:  # more ranks than images: contribute nothing
        emb, rows = torch.zeros(0, distributed.unwrap(model).embed_dim), torch.zeros(0, dtype=torch.long)
    # Chunks are in rank order and each is in row order, so the concatenation is sorted by row.
    return distributed.all_gather_cat(emb.float()), distributed.all_gather_cat(rows)


def evaluate_split(image_emb: torch.Tensor, rows: torch.Tensor, split: CaptionedImages,
                   text_emb: torch.Tensor, ks=(1, 5, 10), logit_scale: float | None = None,
                   batch_size: int = 256) -> dict:
    """Recall@K (and, given logit_scale, the validation loss) for the images in `rows`.

    Captions of images that could not be read are dropped with them, so every remaining caption
    query still has its image among the candidates.
    """
    check_finite(image_emb, text_emb, where=f"split {split.name!r}")
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


def evaluate_folds(image_emb: torch.Tensor, rows: torch.Tensor, split: CaptionedImages, text_emb: torch.Tensor,
                   folds: Sequence[Sequence[int]], ks=(1, 5, 10)) -> dict:
    """Recall@K averaged over image folds (COCO's 1K test): each fold (rows of split.images) is a
    gallery of its own, its images against its captions only. Returns the fold means under the
    directions (so tables read it like any metrics), the summed counts, and under "folds" the
    per-fold figures with their spread: std (sample, n-1), min and max per direction and K."""
    pos = torch.full((len(split),), -1, dtype=torch.long)
    pos[rows] = torch.arange(rows.numel())  # row of each decoded image in image_emb
    offsets = split.caption_offsets()
    per_fold = []
    for fold in folds:
        fold_t = torch.as_tensor(list(fold), dtype=torch.long)
        ok = pos[fold_t] >= 0
        caps = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in fold_t.tolist()])  # [M_fold]
        sub = split.select(fold_t.tolist(), f"{split.name}:fold")
        per_fold.append(evaluate_split(image_emb[pos[fold_t[ok]]], torch.nonzero(ok).flatten(), sub,
                                       text_emb[caps], ks))
    out: dict[str, Any] = {"num_images": sum(f["num_images"] for f in per_fold),
                           "num_captions": sum(f["num_captions"] for f in per_fold)}
    spread: dict[str, dict] = {"std": {}, "min": {}, "max": {}}
    for d in DIRECTIONS:
        vals = {k: torch.tensor([f[d][k] for f in per_fold], dtype=torch.float64) for k in per_fold[0][d]}
        out[d] = {k: float(v.mean()) for k, v in vals.items()}
        spread["std"][d] = {k: float(v.std()) if v.numel() > 1 else 0.0 for k, v in vals.items()}
        spread["min"][d] = {k: float(v.min()) for k, v in vals.items()}
        spread["max"][d] = {k: float(v.max()) for k, v in vals.items()}
    out["folds"] = {"count": len(per_fold), **spread,
                    "per_fold": [{d: f[d] for d in (*DIRECTIONS, "num_images", "num_captions")} for f in per_fold]}
    return out


def score_split(image_emb: torch.Tensor, rows: torch.Tensor, split: EvalSplit, text_emb: torch.Tensor,
                ks=(1, 5, 10)) -> dict:
    """Recall@K of a resolved protocol: one gallery, or the mean over its folds (karpathy-test-1k)."""
    if split.folds:
        return evaluate_folds(image_emb, rows, split.data, text_emb, split.folds, ks)
    return evaluate_split(image_emb, rows, split.data, text_emb, ks)


def write_metrics(path: str | Path, metrics: dict) -> None:
    Path(path).write_text(json.dumps(metrics, indent=2) + "\n")


# --------------------------------------------------------------------------- protocols on a checkpoint

@dataclass
class SplitEmbeddings:
    """Everything a split's retrieval needs, computed once and shared by recall, pictures and zero-shot.

    image_emb [N_ok, D] for the images that decoded (rows [N_ok] = their index in split.data.images);
    text_emb [M, D] for every caption of split.data (flat caption order), both L2-normalised fp32 CPU.
    """
    split: EvalSplit
    image_emb: torch.Tensor
    rows: torch.Tensor
    text_emb: torch.Tensor | None
    logit_scale: float = 1.0 / 0.07  # 1/tau of the model (zero-shot probabilities)

    @property
    def data(self) -> CaptionedImages:
        return self.split.data

    def kept_captions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep [M] bool: caption's image decoded, caption_to_row [M_kept]: its row in image_emb)."""
        row_of = torch.full((len(self.data),), -1, dtype=torch.long)
        row_of[self.rows] = torch.arange(self.rows.numel())
        c2r = row_of[self.data.caption_to_image]  # [M]
        keep = c2r >= 0
        return keep, c2r[keep]


def checkpoint_embeddings(checkpoint: str | Path, data_root: str | Path, split: str = "val",
                          cfg: Config | None = None, device: str = "auto", karpathy: str | Path | None = None,
                          progress: bool = False, with_text: bool = True) -> tuple[SplitEmbeddings, Config]:
    """Resolve the protocol `split` (see clipft.eval.protocols), embed its captions with the checkpoint's
    frozen text encoder (cached under the protocol's name) and its images with the trained tower.
    `cfg` defaults to the config saved in the checkpoint. Returns (embeddings, config used).
    with_text=False skips the captions (text_emb is then None): zero-shot needs images only."""
    from ..config import from_dict
    from ..model import TOWER_KEYS, ModelError, read_checkpoint, tower_from_checkpoint
    from .protocols import resolve_eval_split
    from ..runtime import amp_dtype_for, resolve_device
    from ..text import get_text_embeddings

    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint, require=(*TOWER_KEYS, "config"))  # evaluation needs the run's config
    model = tower_from_checkpoint(ckpt)
    cfg = cfg if cfg is not None else from_dict(ckpt["config"])
    del ckpt  # optimizer state is not needed for evaluation
    dev = resolve_device(device if device != "auto" else cfg.train.device)
    es = resolve_eval_split(data_root, split, cfg, karpathy)
    text_emb = None
    if with_text:
        text_emb, _ = get_text_embeddings(es.data.captions, cfg.text.encoder,
                                          eval_text_cache_file(data_root, es.name, cfg),
                                          device=dev, batch_size=cfg.text.batch_size, max_length=cfg.text.max_length,
                                          on_mismatch=cfg.text.on_mismatch, amp=cfg.train.amp,
                                          progress=None if progress else False)
    if text_emb is not None and text_emb.shape[1] != model.embed_dim:
        raise ModelError(f"{checkpoint}: image tower outputs {model.embed_dim}-d embeddings but text encoder "
                         f"{cfg.text.encoder!r} gives {text_emb.shape[1]}-d")
    model = model.to(dev)
    emb, rows = embed_images(model, es.data, cfg, dev, amp_dtype_for(dev, cfg.train.amp, cfg.data.image_size), progress=progress)
    # Every consumer (recall, zero-shot, pictures, report) goes through here: refuse NaN/inf once.
    check_finite(emb, text_emb if text_emb is not None else emb[:0],
                 where=f"{checkpoint} on split {es.name!r}")
    return SplitEmbeddings(es, emb, rows, text_emb, logit_scale=float(model.logit_scale.detach().exp())), cfg


def save_split_embeddings(path: str | Path, emb: SplitEmbeddings, meta: dict | None = None) -> Path:
    """Safetensors with image_emb [N, D], text_emb [M, D], image_ids [N], caption_ids [M] and
    caption_to_image [M] (row of image_emb); only images that decoded and their captions.
    String metadata: split, protocol, plus `meta`."""
    from safetensors.torch import save_file
    path = Path(path)
    keep, c2r = emb.kept_captions()
    image_ids = torch.tensor(emb.data.image_ids, dtype=torch.long)[emb.rows]
    caption_ids = torch.tensor(emb.data.caption_ids, dtype=torch.long)[keep]
    tensors = {"image_emb": emb.image_emb.contiguous(), "text_emb": emb.text_emb[keep].contiguous(),
               "image_ids": image_ids.contiguous(), "caption_ids": caption_ids.contiguous(),
               "caption_to_image": c2r.contiguous()}
    metadata = {"format": "clipft-embeddings-v1", "split": emb.split.name, "protocol": emb.split.protocol,
                "logit_scale": str(emb.logit_scale)}
    metadata.update({k: str(v) for k, v in (meta or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


EMBEDDING_KEYS = ("image_emb", "text_emb", "image_ids", "caption_ids", "caption_to_image")


def load_split_embeddings(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by `save_split_embeddings`; DataError if it is not one."""
    from safetensors import safe_open

    from ..data import DataError
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: embeddings file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for garbled files
        raise DataError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    missing = [k for k in EMBEDDING_KEYS if k not in tensors]
    if missing:
        raise DataError(f"{path}: not a clipft embeddings file (missing {', '.join(missing)})")
    return tensors, meta


def split_embeddings_from_file(path: str | Path, checkpoint: str | Path, data_root: str | Path, split: str = "val",
                               cfg: Config | None = None, karpathy: str | Path | None = None
                               ) -> tuple[SplitEmbeddings, Config]:
    """Rebuild SplitEmbeddings from a `--save-embeddings` file and the split it was made from
    (matched by image and caption ids), without running any model."""
    from ..config import from_dict
    from ..data import DataError
    from ..model import TOWER_KEYS, read_checkpoint
    from .protocols import resolve_eval_split
    tensors, meta = load_split_embeddings(path)
    if cfg is None:
        cfg = from_dict(read_checkpoint(checkpoint, require=(*TOWER_KEYS, "config"))["config"])
    es = resolve_eval_split(data_root, split, cfg, karpathy)
    if meta.get("split") not in (None, split):
        raise DataError(f"{path}: embeddings of split {meta.get('split')!r}, not {split!r}")
    row_of_image = {i: r for r, i in enumerate(es.data.image_ids)}
    try:
        rows = torch.tensor([row_of_image[int(i)] for i in tensors["image_ids"]], dtype=torch.long)
    except KeyError as e:
        raise DataError(f"{path}: image id {e.args[0]} is not in split {split!r} of {data_root}") from None
    pos_of_caption = {c: j for j, c in enumerate(es.data.caption_ids)}
    text = torch.zeros(len(es.data.caption_ids), tensors["text_emb"].shape[1])
    for c, e in zip(tensors["caption_ids"].tolist(), tensors["text_emb"]):
        if c not in pos_of_caption:
            raise DataError(f"{path}: caption id {c} is not in split {split!r} of {data_root}")
        text[pos_of_caption[c]] = e
    scale = float(meta.get("logit_scale", 1.0 / cfg.model.temperature))
    return SplitEmbeddings(es, tensors["image_emb"], rows, text, logit_scale=scale), cfg


def metrics_csv_rows(metrics: dict, model: str = "fine-tuned") -> list[dict]:
    """One row per (direction, K): model, split, direction, k, recall, num_images, num_captions; for a
    protocol with folds (karpathy-test-1k) recall is the fold mean, followed by folds and the
    per-fold spread recall_std, recall_min, recall_max."""
    rows = []
    folds = metrics.get("folds")
    for d in DIRECTIONS:
        for k, v in metrics[d].items():
            row = {"model": model, "split": metrics.get("split", ""), "direction": d, "k": int(k.split("@")[1]),
                   "recall": round(float(v), 4), "num_images": metrics.get("num_images"),
                   "num_captions": metrics.get("num_captions")}
            if folds:
                row.update(folds=folds["count"], **{f"recall_{s}": round(float(folds[s][d][k]), 4)
                                                    for s in ("std", "min", "max")})
            rows.append(row)
    return rows


def write_metrics_csv(path: str | Path, metrics: dict) -> Path:
    """metrics_<split>.csv: rows for the fine-tune and, if present, the zero-shot CLIP baseline."""
    rows = metrics_csv_rows(metrics, "fine-tuned")
    if "zero_shot" in metrics:
        zs = {**metrics["zero_shot"], "split": metrics.get("split", "")}
        rows += metrics_csv_rows(zs, f"zero-shot {zs['model']}")
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def format_comparison_table(metrics: dict) -> str:
    """Fine-tune vs zero-shot CLIP, side by side: one row per direction and K."""
    zs = metrics["zero_shot"]
    lines = [f"{'direction':<15}{'K':>4}{'fine-tuned':>12}{'zero-shot':>12}{'delta':>9}"]
    for d in DIRECTIONS:
        for k, v in metrics[d].items():
            z = zs[d][k]
            lines.append(f"{d:<15}{k.split('@')[1]:>4}{v:12.2f}{z:12.2f}{v - z:+9.2f}")
    return "\n".join(lines)


def metrics_paths(checkpoint: str | Path, split: str) -> tuple[Path, Path]:
    """Default (json, csv) paths beside the checkpoint: metrics_<split>.json / .csv."""
    root = Path(checkpoint).parent
    return root / f"metrics_{split}.json", root / f"metrics_{split}.csv"


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path, split: str = "val",
                        cfg: Config | None = None, out: str | Path | None = None,
                        device: str = "auto", progress: bool = True, karpathy: str | Path | None = None,
                        compare_zero_shot: str | None = None, save_embeddings: str | Path | None = None,
                        embeddings: SplitEmbeddings | None = None) -> dict:
    """Recall@K of a trained checkpoint under a protocol (`split`: val, val-full, karpathy-test, ...).

    Writes metrics_<split>.json and metrics_<split>.csv beside the checkpoint (or `out` and
    `out` with .csv), and also metrics.json for the default `val` protocol (what older readers
    expect). `cfg` defaults to the config saved in the checkpoint. With `compare_zero_shot` (a full
    HF CLIP model), the same protocol is run on that model's own towers and stored under
    "zero_shot". With `save_embeddings` (a path), the split's embeddings are written as safetensors.
    Pass precomputed `embeddings` to skip embedding (the demo reuses them for its pictures).
    """
    checkpoint = Path(checkpoint)
    emb = embeddings
    if emb is None:
        emb, cfg = checkpoint_embeddings(checkpoint, data_root, split, cfg, device, karpathy, progress)
    elif cfg is None:
        from ..config import from_dict
        from ..model import TOWER_KEYS, read_checkpoint
        cfg = from_dict(read_checkpoint(checkpoint, require=(*TOWER_KEYS, "config"))["config"])
    data = emb.data
    metrics = score_split(emb.image_emb, emb.rows, emb.split, emb.text_emb, cfg.eval.ks)
    metrics.update(split=emb.split.name, skipped_images=len(data) - int(emb.rows.numel()), checkpoint=str(checkpoint),
                   protocol=emb.split.protocol, protocol_name=emb.split.label, text_encoder=cfg.text.encoder)
    if compare_zero_shot:
        metrics["zero_shot"] = zero_shot_clip_metrics(compare_zero_shot, emb.split, cfg, data_root, device, progress)
    json_path, csv_path = metrics_paths(checkpoint, emb.split.name)
    if out:
        json_path = Path(out)
        csv_path = json_path.with_suffix(".csv")
    if save_embeddings:
        metrics["embeddings"] = str(save_split_embeddings(save_embeddings, emb, {
            "checkpoint": checkpoint, "text_encoder": cfg.text.encoder}))
    write_metrics(json_path, metrics)
    write_metrics_csv(csv_path, metrics)
    metrics["files"] = [str(json_path), str(csv_path)]
    legacy = checkpoint.parent / "metrics.json"
    if emb.split.name == "val" and json_path != legacy and not out:
        write_metrics(legacy, {k: v for k, v in metrics.items() if k != "files"})  # what older readers use
        metrics["files"].append(str(legacy))
    return metrics


def zero_shot_clip_metrics(model_name: str, split: "EvalSplit", cfg: Config, data_root: str | Path,
                           device: str = "auto", progress: bool = False) -> dict:
    """Recall@K of a full HF CLIP model (its own image and text towers) under the same protocol."""
    from .clip_baseline import clip_baseline_embeddings
    from ..runtime import amp_dtype_for, resolve_device
    dev = resolve_device(device if device != "auto" else cfg.train.device)
    cache = eval_text_cache_file(data_root, split.name, cfg, encoder=model_name)
    image_emb, rows, text_emb = clip_baseline_embeddings(
        model_name, split.data, cache, dev, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
        max_length=cfg.text.max_length, amp_dtype=amp_dtype_for(dev, cfg.train.amp), progress=progress)
    m = score_split(image_emb, rows, split, text_emb, cfg.eval.ks)
    return {"model": model_name, **m, "skipped_images": len(split.data) - int(rows.numel())}
