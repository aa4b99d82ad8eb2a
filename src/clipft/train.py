"""Training: data + cached text -> image tower, with one plainly written training step.

Layout of a run directory (RUN):
  config.json       resolved config (also what a rerun into RUN resumes with)
  metrics.jsonl     one JSON record per logged step and per epoch: the source of truth
  epochs.csv        the epoch records, flat, for spreadsheets
  last.pt / best.pt atomic checkpoints (best by mean validation Recall@5 over both directions)
  loss_curves.png   loss and Recall@K per epoch
  summary.json      wall time, hardware, dataset sizes, best epoch, skipped images/steps
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from .config import Config, ConfigError, from_dict, load_config, save_config, to_dict
from .data import (FLIP_MODES, CaptionedImages, TrainDataset, build_transform, collate_train,
                   left_right_captions, load_split)
from .evaluate import embed_images, evaluate_split, mean_recall
from .loss import chance_loss, clip_loss
from .model import ImageTower, build_image_tower, count_parameters, parameter_parts, tower_state
from .runtime import (amp_dtype_for, atomic_torch_save, hardware_info, resolve_device, rng_state,
                      seed_everything, set_rng_state)
from .text import get_text_embeddings, load_text_encoder, text_cache_path

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that had to stop (e.g. diverged); the message says what is intact."""


# --------------------------------------------------------------------------- small pieces

def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup from 0 to 1 over warmup_steps, then cosine to min_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    backbone_lr_ratio: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad now; no weight decay on biases, norm weights and
    the logit scale (all 1-d or 0-d).

    backbone_lr_ratio == 1: two groups (decay, no_decay). Otherwise groups per part, named
    head/decay, head/no_decay, logit_scale, backbone/decay, backbone/no_decay (empty ones dropped),
    the backbone's at lr * backbone_lr_ratio. Parameters frozen only for a while (see
    train.freeze_backbone_epochs) must require grad when this is called: AdamW then skips them
    while their .grad is None (no update, no weight decay).
    """
    if backbone_lr_ratio < 0:
        raise TrainingError(f"train.backbone_lr_ratio must be >= 0, got {backbone_lr_ratio}")
    if backbone_lr_ratio == 1.0 or not hasattr(model, "backbone"):
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    parts = parameter_parts(model)
    groups = []
    for part, part_lr in (("head", lr), ("logit_scale", lr), ("backbone", lr * backbone_lr_ratio)):
        params = [p for _, p in parts[part] if p.requires_grad]
        if part == "logit_scale":
            groups.append({"name": part, "params": params, "lr": part_lr, "weight_decay": 0.0})
            continue
        groups.append({"name": f"{part}/decay", "params": [p for p in params if p.ndim >= 2],
                       "lr": part_lr, "weight_decay": weight_decay})
        groups.append({"name": f"{part}/no_decay", "params": [p for p in params if p.ndim < 2],
                       "lr": part_lr, "weight_decay": 0.0})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


@dataclass
class RunFiles:
    """Paths inside a run directory."""
    root: Path
    config: Path = field(init=False)
    metrics: Path = field(init=False)
    epochs_csv: Path = field(init=False)
    last: Path = field(init=False)
    best: Path = field(init=False)
    summary: Path = field(init=False)
    curves: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.epochs_csv = self.root / "epochs.csv"
        self.last = self.root / "last.pt"
        self.best = self.root / "best.pt"
        self.summary = self.root / "summary.json"
        self.curves = self.root / "loss_curves.png"


def resolve_run_config(out_dir: str | Path, config_file: str | Path | None = None,
                       overrides: list[str] | None = None, base: Config | None = None,
                       resume: bool = True) -> Config:
    """The config a run uses: a resumed run starts from its saved config.json (big_vision-style
    auto-resume), a new one from `base` (defaults when None); then the file, then the overrides."""
    saved = Path(out_dir) / "config.json"
    if resume and saved.is_file():
        base = from_dict(json.loads(saved.read_text()))
    return load_config(config_file, overrides, base=base)


def read_records(path: Path, kind: str | None = None) -> list[dict]:
    """Records of a metrics.jsonl (optionally only those of one `type`)."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if kind is None or rec.get("type") == kind:
                out.append(rec)
    return out


# --------------------------------------------------------------------------- data

@dataclass
class PreparedData:
    train: CaptionedImages
    val: CaptionedImages
    train_text: torch.Tensor  # [M_train, D], L2-normalised, caption order of `train`
    val_text: torch.Tensor  # [M_val, D]
    text_info: dict
    # data.flip=swap only: embeddings [K, D] of the train captions with left/right swapped, and
    # each train caption's row in it [M_train] (-1 = no left/right); see data.left_right_captions.
    train_flip_text: torch.Tensor | None = None
    train_flip_rows: torch.Tensor | None = None


def prepare_data(cfg: Config, data_root: str | Path, device: torch.device) -> PreparedData:
    """Load and validate both splits (refusing bad annotation files before anything trains), then
    load or build the cached caption embeddings; the text encoder is freed afterwards."""
    data_root = Path(data_root)
    train = load_split(data_root, cfg.data.train_split, cfg.data)
    val = load_split(data_root, cfg.data.val_split, cfg.data)
    if len(train) == 0 or len(val) == 0:
        raise TrainingError(f"{data_root}: no captioned images in split "
                            f"{cfg.data.train_split if len(train) == 0 else cfg.data.val_split!r}")
    cache_dir = Path(cfg.text.cache_dir) if cfg.text.cache_dir else data_root / "cache"
    encoder = load_text_encoder(cfg.text.encoder, device=device, max_length=cfg.text.max_length)
    embeds, infos = [], {}
    for name, split in ((cfg.data.train_split, train), (cfg.data.val_split, val)):
        emb, info = get_text_embeddings(
            split.captions, cfg.text.encoder, text_cache_path(cache_dir, name, cfg.text.encoder),
            device=device, batch_size=cfg.text.batch_size, max_length=cfg.text.max_length,
            on_mismatch=cfg.text.on_mismatch, encoder=encoder)
        embeds.append(emb)
        infos[name] = {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}
    infos["encoder_dim"] = encoder.dim
    flip_text, flip_rows = _left_right_swapped(cfg, train, cache_dir, encoder, device, infos)
    del encoder  # frozen and no longer needed: training reads the cache only
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return PreparedData(train, val, embeds[0], embeds[1], infos, train_flip_text=flip_text, train_flip_rows=flip_rows)


def _left_right_swapped(cfg: Config, train: CaptionedImages, cache_dir: Path, encoder, device: torch.device,
                        infos: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For data.flip=swap: embeddings of the train captions that mention left/right, with the two
    words swapped, cached like any caption list (fingerprinted, `<split>-lrswap` cache file)."""
    if cfg.data.flip not in FLIP_MODES:
        raise ConfigError(f"data.flip must be one of {', '.join(FLIP_MODES)}, got {cfg.data.flip!r}")
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
        swapped, cfg.text.encoder, text_cache_path(cache_dir, name, cfg.text.encoder), device=device,
        batch_size=cfg.text.batch_size, max_length=cfg.text.max_length, on_mismatch=cfg.text.on_mismatch,
        encoder=encoder)
    infos[name] = {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}
    return emb, rows


def make_train_loader(ds: TrainDataset, cfg: Config, epoch: int, device: torch.device) -> DataLoader:
    """A fresh loader per epoch: the shuffle order and each image's caption depend only on
    (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would."""
    ds.set_epoch(epoch)
    g = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)
    return DataLoader(ds, batch_size=cfg.train.batch_size, sampler=RandomSampler(ds, generator=g),
                      num_workers=cfg.data.num_workers, collate_fn=collate_train,
                      pin_memory=device.type == "cuda", drop_last=len(ds) > cfg.train.batch_size)


# --------------------------------------------------------------------------- the training step

def train_step(model: ImageTower, images: torch.Tensor, texts: torch.Tensor,
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, grad_clip: float) -> dict:
    """One optimisation step. images [B, 3, H, W] on device, texts [B, D] cached caption embeddings.

    Returns {"loss", "loss_i2t", "loss_t2i", "grad_norm", "logit_scale", "skipped"}: a non-finite
    loss (or, without a scaler, non-finite gradients) skips the update and reports skipped=True.
    """
    device_type = images.device.type
    # Forward under autocast (bf16/fp16 on CUDA, off on CPU); the loss itself runs in fp32.
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        image_emb = model(images)  # [B, D], L2-normalised fp32
    logit_scale = model.logit_scale.exp()  # 1/tau, scalar
    terms = clip_loss(image_emb, texts, logit_scale)
    loss = terms["loss"]

    # NaN guard: never back-propagate a non-finite loss (one .item() sync per step; we log it anyway).
    loss_value = float(loss.detach())
    out = {k: float(v.detach()) for k, v in terms.items()}
    out.update(logit_scale=float(logit_scale.detach()), grad_norm=float("nan"), skipped=False)
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # the schedule follows attempted steps, so the planned length holds
        out["skipped"] = True
        return out

    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    out["grad_norm"] = float(grad_norm)
    if not scaler.is_enabled() and not math.isfinite(out["grad_norm"]):
        out["skipped"] = True  # fp32/bf16: inf/NaN gradients would poison the weights
    else:
        scaler.step(optimizer)  # with fp16 the scaler itself skips steps whose grads overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    model.clamp_logit_scale_()  # keep 1/tau <= max_logit_scale (only moves if learnable)
    return out


# --------------------------------------------------------------------------- the loop

def train(cfg: Config, data_root: str | Path, out_dir: str | Path, resume: bool = True,
          progress: bool = True) -> dict:
    """Train the image tower; returns the summary dict (also written to RUN/summary.json).

    With resume=True and RUN/last.pt present, continues from it exactly (model, optimizer,
    scheduler, scaler, RNG states, epoch), appending to the same logs.
    """
    t_start = time.time()
    run = RunFiles(Path(out_dir))
    run.root.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    amp_dtype = amp_dtype_for(device, cfg.train.amp)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    data = prepare_data(cfg, data_root, device)
    save_config(cfg, run.config)

    model = build_image_tower(cfg.model, embed_dim=data.train_text.shape[1]).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)  # NHWC convs: ~1.5x on tensor cores
    # Built before any temporary freeze, so a backbone frozen for the first epochs is in it.
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    transform = build_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std, train=True,
                                augment=cfg.data.augment, flip=cfg.data.flip == "plain",
                                color_jitter=cfg.data.color_jitter)
    # draft_size: large JPEGs are DCT-downscaled while decoding (never below image_size).
    train_ds = TrainDataset(data.train, data.train_text, transform, seed=cfg.train.seed,
                            draft_size=cfg.data.image_size, flip_embeds=data.train_flip_text,
                            flip_rows=data.train_flip_rows)
    n_batches = len(train_ds) // cfg.train.batch_size if len(train_ds) > cfg.train.batch_size else 1
    steps_per_epoch = min(n_batches, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch > 0 else n_batches
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio))

    start_epoch, global_step, best_metric, best_epoch = 0, 0, -1.0, -1
    totals = {"skipped_images": 0, "skipped_steps": 0}
    prior_seconds = 0.0
    if resume and run.last.is_file():
        ckpt = torch.load(run.last, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_epoch, global_step = ckpt["epoch"], ckpt["step"]
        best_metric, best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
        totals, prior_seconds = ckpt["totals"], ckpt.get("train_seconds", 0.0)
        # Drop log records written after that checkpoint (a crash mid-epoch), so logs == checkpoint.
        kept = [r for r in read_records(run.metrics) if r.get("epoch", 0) <= start_epoch]
        run.metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        log.info("resuming %s from epoch %d (step %d)", run.root, start_epoch, global_step)
    elif run.metrics.exists():
        run.metrics.unlink()  # a fresh run into an old directory starts fresh logs

    params = count_parameters(model)
    log.info("image tower %s: %d trainable / %d parameters; %d train / %d val images; device %s",
             cfg.model.backbone, params["trainable"], params["total"], len(data.train), len(data.val), device)

    metrics_f = open(run.metrics, "a")

    def log_record(rec: dict) -> None:
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()

    consecutive_bad = 0
    t_train = time.time()
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        if cfg.train.freeze_backbone_epochs > 0:  # a pure function of the epoch: resumes exactly
            model.set_backbone_trainable(epoch > cfg.train.freeze_backbone_epochs)
        model.train()
        loader = make_train_loader(train_ds, cfg, epoch, device)
        # disable=None: bars only on a terminal, so logs redirected to a file stay readable.
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.train.epochs}",
                   disable=None if progress else True, dynamic_ncols=True, leave=False)
        ep_loss, ep_steps, ep_skipped_img, ep_skipped_steps, t_ep = 0.0, 0, 0, 0, time.time()
        t_log, n_img_log = time.time(), 0
        for images, texts, _idx, n_skipped in loader:
            if ep_steps + ep_skipped_steps >= steps_per_epoch:
                break
            ep_skipped_img += n_skipped
            if images.shape[0] < 2:  # contrastive loss needs negatives
                continue
            images = images.to(device, non_blocking=True)
            if device.type == "cuda" and cfg.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            texts = texts.to(device, non_blocking=True)
            out = train_step(model, images, texts, optimizer, scheduler, scaler, amp_dtype, cfg.train.grad_clip)
            global_step += 1
            n_img_log += images.shape[0]
            if out["skipped"]:
                ep_skipped_steps += 1
                consecutive_bad += 1
                log.warning("step %d: non-finite loss/gradients, update skipped (%d in a row)",
                            global_step, consecutive_bad)
                if consecutive_bad >= cfg.train.max_bad_steps:
                    metrics_f.close()
                    last = f"{run.last} (epoch {start_epoch if epoch == start_epoch + 1 else epoch - 1})" \
                        if run.last.exists() else "no checkpoint yet"
                    raise TrainingError(
                        f"training diverged: {consecutive_bad} consecutive non-finite steps at epoch {epoch}, "
                        f"step {global_step}. Last good checkpoint intact: {last}. Lower train.lr or "
                        f"raise train.warmup_steps, then rerun the same command to resume.")
                bar.update(1)
                continue
            consecutive_bad = 0
            ep_loss += out["loss"]
            ep_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.3f}", scale=f"{out['logit_scale']:.1f}")
            if global_step % cfg.train.log_every == 0:
                now = time.time()
                log_record({"type": "step", "epoch": epoch, "step": global_step, "loss": out["loss"],
                            "chance_loss": chance_loss(images.shape[0]), "lr": scheduler.get_last_lr()[0],
                            "logit_scale": out["logit_scale"], "grad_norm": out["grad_norm"],
                            "images_per_s": n_img_log / max(1e-9, now - t_log)})
                t_log, n_img_log = now, 0
        bar.close()
        totals["skipped_images"] += ep_skipped_img
        totals["skipped_steps"] += ep_skipped_steps
        train_seconds = time.time() - t_ep

        record: dict[str, Any] = {"type": "epoch", "epoch": epoch, "step": global_step,
                                  "train_loss": ep_loss / max(1, ep_steps), "steps": ep_steps,
                                  "skipped_steps": ep_skipped_steps, "skipped_images": ep_skipped_img,
                                  "lr": scheduler.get_last_lr()[0],
                                  "logit_scale": model.logit_scale.exp().item(),
                                  "train_seconds": train_seconds}
        if epoch % cfg.eval.every == 0 or epoch == cfg.train.epochs:
            emb, rows = embed_images(model, data.val, cfg, device, amp_dtype)
            val = evaluate_split(emb, rows, data.val, data.val_text, cfg.eval.ks,
                                 logit_scale=model.logit_scale.exp().item(), batch_size=cfg.train.batch_size)
            record.update(val_loss=val.get("val_loss"), val=val, val_skipped_images=len(data.val) - val["num_images"])
            record["mean_R@5"] = mean_recall(val, 5)
        log_record(record)
        _write_epochs_csv(run.epochs_csv, read_records(run.metrics, "epoch"))

        is_best = "mean_R@5" in record and record["mean_R@5"] > best_metric
        if is_best:
            best_metric, best_epoch = record["mean_R@5"], epoch
        ckpt = {**tower_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step": global_step, "rng": rng_state(),
                "config": to_dict(cfg), "best_metric": best_metric, "best_epoch": best_epoch,
                "totals": totals, "text": data.text_info,
                "train_seconds": prior_seconds + (time.time() - t_train)}
        atomic_torch_save(ckpt, run.last)
        if is_best:
            atomic_torch_save(ckpt, run.best)
        _plot_curves(run)
        msg = f"epoch {epoch}: train loss {record['train_loss']:.4f}"
        if "val" in record:
            v = record["val"]
            msg += (f", val loss {record['val_loss']:.4f}, i2t R@1/5/10 "
                    + "/".join(f"{x:.1f}" for x in v["image_to_text"].values())
                    + ", t2i R@1/5/10 " + "/".join(f"{x:.1f}" for x in v["text_to_image"].values()))
        log.info(msg)
    metrics_f.close()

    summary = {
        "run_dir": str(run.root), "data_root": str(data_root), "epochs": cfg.train.epochs, "steps": global_step,
        "best_epoch": best_epoch, "best_mean_R@5": best_metric,
        "train_seconds": prior_seconds + (time.time() - t_train), "wall_seconds_this_invocation": time.time() - t_start,
        "hardware": hardware_info(device), "parameters": count_parameters(model),
        "dataset": {"train_images": len(data.train), "train_captions": len(data.train.captions),
                    "val_images": len(data.val), "val_captions": len(data.val.captions),
                    "source": data.train.name},
        "text": data.text_info, **totals,
    }
    epochs = read_records(run.metrics, "epoch")
    if epochs and "val" in epochs[-1]:
        summary["final_val"] = epochs[-1]["val"]
    run.summary.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_epochs_csv(path: Path, records: list[dict]) -> None:
    """epochs.csv, rewritten whole from the epoch records (a handful of rows), so it always
    matches metrics.jsonl, also after a resume."""
    rows = []
    for rec in records:
        flat = {k: v for k, v in rec.items() if not isinstance(v, dict) and k != "type"}
        for d in ("image_to_text", "text_to_image"):
            for k, v in rec.get("val", {}).get(d, {}).items():
                flat[f"{d}_{k}"] = v
        rows.append(flat)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _plot_curves(run: RunFiles) -> None:
    from .visualize import plot_training_curves  # matplotlib import only when plotting
    plot_training_curves(read_records(run.metrics, "epoch"), run.curves)
