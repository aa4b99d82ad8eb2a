"""Evaluation of a checkpoint on a split: embed its images, score them with the pure metrics of
`clipft.eval.metrics`, and write the figures (metrics.json, CSV, tables)."""

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
from .metrics import (DIRECTIONS, TIE_ATOL, EvaluationError, check_finite, format_fold_spread,  # noqa: F401
                      format_recall_table, mean_recall, recall_from_ranks, retrieval_ranks, retrieval_recall)
from .protocols import EvalSplit
from ..runtime import worker_count

log = logging.getLogger(__name__)


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
                         amp_dtype: torch.dtype | None = None, progress: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`embed_images` with the images split over the ranks (contiguous chunks) and the results
    gathered to every rank: (emb [N_ok, D] CPU, rows [N_ok]) equal to a single-process
    embed_images, rows ascending. `model` is the bare ImageTower (never the DDP wrapper, whose forward
    would broadcast buffers a different number of times on ranks with more batches).
    progress: a bar on rank 0 only (it shows rank 0's chunk)."""
    if not distributed.is_distributed():
        return embed_images(model, split, cfg, device, amp_dtype, progress=progress)
    rank, world, n = distributed.get_rank(), distributed.get_world_size(), len(split)
    start, stop = rank * n // world, (rank + 1) * n // world
    part = CaptionedImages(images=split.images[start:stop], name=f"{split.name}:shard{rank}of{world}")
    if stop > start:
        emb, rows = embed_images(model, part, cfg, device, amp_dtype, progress=progress and distributed.is_main())
        rows = rows + start
    else:  # more ranks than images: contribute nothing
        emb, rows = torch.zeros(0, distributed.unwrap(model).embed_dim), torch.zeros(0, dtype=torch.long)
    # Chunks are in rank order and each is in row order, so the concatenation is sorted by row.
    return distributed.all_gather_cat(emb.float()), distributed.all_gather_cat(rows)


def row_of_images(num_images: int, rows: torch.Tensor) -> torch.Tensor:
    """[num_images] row of each split image in an embedding matrix that holds only `rows` (the images
    that decoded, in that order); -1 for an image that was skipped."""
    row_of = torch.full((num_images,), -1, dtype=torch.long)
    row_of[rows] = torch.arange(rows.numel())
    return row_of


def kept_captions(caption_to_image: torch.Tensor, num_images: int,
                  rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [M] bool: the caption's image decoded, caption_to_row [M_kept]: its row in the embeddings)."""
    c2r = row_of_images(num_images, rows)[caption_to_image]  # [M], -1 where the image was skipped
    keep = c2r >= 0
    return keep, c2r[keep]


def evaluate_split(image_emb: torch.Tensor, rows: torch.Tensor, split: CaptionedImages,
                   text_emb: torch.Tensor, ks=(1, 5, 10), logit_scale: float | None = None,
                   batch_size: int = 256) -> dict:
    """Recall@K (and, given logit_scale, the validation loss) for the images in `rows`.

    Captions of images that could not be read are dropped with them, so every remaining caption
    query still has its image among the candidates.
    """
    check_finite(image_emb, text_emb, where=f"split {split.name!r}")
    keep, caption_rows = kept_captions(split.caption_to_image, len(split), rows)
    metrics = retrieval_recall(image_emb, text_emb[keep], caption_rows, ks=ks)
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
    pos = row_of_images(len(split), rows)  # row of each decoded image in image_emb
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
        return kept_captions(self.data.caption_to_image, len(self.data), self.rows)


def checkpoint_embeddings(checkpoint: str | Path, data_root: str | Path, split: str = "val",
                          cfg: Config | None = None, device: str = "auto", karpathy: str | Path | None = None,
                          progress: bool = False, with_text: bool = True) -> tuple[SplitEmbeddings, Config]:
    """Resolve the protocol `split` (see clipft.eval.protocols), embed its captions with the checkpoint's
    frozen text encoder (cached under the protocol's name) and its images with the trained tower.
    `cfg` defaults to the config saved in the checkpoint. Returns (embeddings, config used).
    with_text=False skips the captions (text_emb is then None): zero-shot needs images only.

    Under torchrun (a process group is initialised) each rank embeds its own contiguous part of the
    images and every rank receives all of them, in the single-process order; only rank 0 embeds the
    captions (it alone scores recall), so text_emb is None on the other ranks."""
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
    text_emb = None
    # Rank 0 first: it writes the split's caches (shard captions, caption embeddings); if it fails
    # (a bad text encoder, a dimension mismatch) the other ranks stop with its error instead of
    # waiting in the image gather below.
    with distributed.main_process_first("loading the split and its caption embeddings"):
        es = resolve_eval_split(data_root, split, cfg, karpathy)
        if with_text and distributed.is_main():
            text_emb, _ = get_text_embeddings(es.data.captions, cfg.text.encoder,
                                              eval_text_cache_file(data_root, es.name, cfg),
                                              device=dev, batch_size=cfg.text.batch_size,
                                              max_length=cfg.text.max_length, on_mismatch=cfg.text.on_mismatch,
                                              amp=cfg.train.amp, progress=None if progress else False)
        if text_emb is not None and text_emb.shape[1] != model.embed_dim:
            raise ModelError(f"{checkpoint}: image tower outputs {model.embed_dim}-d embeddings but text encoder "
                             f"{cfg.text.encoder!r} gives {text_emb.shape[1]}-d")
    model = model.to(dev)
    emb, rows = sharded_embed_images(model, es.data, cfg, dev, amp_dtype_for(dev, cfg.train.amp, cfg.data.image_size),
                                     progress=progress)
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
                        embeddings: SplitEmbeddings | None = None) -> dict | None:
    """Recall@K of a trained checkpoint under a protocol (`split`: val, val-full, karpathy-test, ...).

    Writes metrics_<split>.json and metrics_<split>.csv beside the checkpoint (or `out` and
    `out` with .csv), and also metrics.json for the default `val` protocol (what older readers
    expect). `cfg` defaults to the config saved in the checkpoint. With `compare_zero_shot` (a full
    HF CLIP model), the same protocol is run on that model's own towers and stored under
    "zero_shot". With `save_embeddings` (a path), the split's embeddings are written as safetensors.
    Pass precomputed `embeddings` to skip embedding (the demo reuses them for its pictures).

    Under torchrun the ranks share out the image embedding (`checkpoint_embeddings`); rank 0 alone
    scores, runs the zero-shot comparison and writes files. The other ranks return None.
    """
    checkpoint = Path(checkpoint)
    emb = embeddings
    if emb is None:
        emb, cfg = checkpoint_embeddings(checkpoint, data_root, split, cfg, device, karpathy, progress)
    if not distributed.is_main():
        return None
    elif cfg is None:
        from ..config import from_dict
        from ..model import TOWER_KEYS, read_checkpoint
        cfg = from_dict(read_checkpoint(checkpoint, require=(*TOWER_KEYS, "config"))["config"])
    data = emb.data
    metrics = score_split(emb.image_emb, emb.rows, emb.split, emb.text_emb, cfg.eval.ks)
    metrics.update(split=emb.split.name, skipped_images=len(data) - int(emb.rows.numel()), checkpoint=str(checkpoint),
                   protocol=emb.split.protocol, protocol_name=emb.split.label, text_encoder=cfg.text.encoder)
    if emb.split.selection_overlap is not None:  # Karpathy figures: images that also chose the checkpoint
        metrics["selection_overlap"] = emb.split.selection_overlap
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
