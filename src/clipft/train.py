"""Training: data + cached text -> image tower, with one plainly written training step.

Writes a run directory (its layout: `runfiles.py`). Under torchrun every process runs `train`; rank 0
alone writes the files (see distributed.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from .config import Config, ConfigError, save_config, to_dict, validate
from .data import (FLIP_MODES, CaptionedImages, TrainDataset, build_transform, collate_train, left_right_captions,
                   load_split, prepared_split_dir, swapped_text_cache_file, text_cache_file)
from .evaluate import EvaluationError, evaluate_split, mean_recall, sharded_embed_images
from .health import HealthMonitor, pairwise_cosine
from .loss import chance_loss, clip_loss
from .model import build_image_tower, count_parameters, ensure_image_weights, parameter_parts, tower_state
from .runfiles import RunFiles, read_records, write_epochs_csv
from .runtime import (amp_dtype_for, atomic_torch_save, hardware_info, rng_state, seed_everything, set_rng_state,
                      worker_count)
from .text import get_text_embeddings, load_text_encoder
from .data.caches import unused_prepared_note
from .data.prepare import DeviceTransform, PreparedDataset, PreparedImages, PreparedLoader
from .data.validate import preflight

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
        return _adamw([g for g in groups if g["params"]], lr)
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
    return _adamw([g for g in groups if g["params"]], lr)


def _adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """Fused AdamW where PyTorch has the kernel (CUDA, CPU): one kernel for all parameters, and it
    honours `found_inf`, which lets `train_step` skip a bad update on the device without a sync."""
    try:  # private, but the list PyTorch itself checks against: ["cuda", ...], "cpu" from torch 2.4 on
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        supported = _get_fused_kernels_supported_devices()
    except ImportError:
        supported = ["cuda"]
    params = [p for g in groups for p in g["params"]]
    if all(p.device.type in supported and p.is_floating_point() for p in params):
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.AdamW(groups, lr=lr)


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
    """Load and validate both splits (refusing bad annotation files, missing images and a train/val
    leak before anything trains: `validate.preflight`), then load or build the cached caption
    embeddings; the text encoder is freed afterwards."""
    data_root = Path(data_root)
    train = load_split(data_root, cfg.data.train_split, cfg.data)
    val = load_split(data_root, cfg.data.val_split, cfg.data)
    if len(train) == 0 or len(val) == 0:
        raise TrainingError(f"{data_root}: no captioned images in split "
                            f"{cfg.data.train_split if len(train) == 0 else cfg.data.val_split!r}")
    preflight(train, val, cfg.data)
    # Everything that can fail without computing fails here, before the captions are embedded.
    ensure_image_weights(cfg.model.backbone, cfg.model.image_weights)
    encoder = load_text_encoder(cfg.text.encoder, device=device, max_length=cfg.text.max_length)
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
    return PreparedData(train, val, embeds[0], embeds[1], infos, train_flip_text=flip_text, train_flip_rows=flip_rows)


def _left_right_swapped(cfg: Config, train: CaptionedImages, swap_file: Path, encoder, device: torch.device,
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
        swapped, cfg.text.encoder, swap_file, device=device,
        batch_size=cfg.text.batch_size, max_length=cfg.text.max_length, on_mismatch=cfg.text.on_mismatch,
        encoder=encoder)
    infos[name] = {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}
    return emb, rows


def open_prepared_train(cfg: Config, data_root: str | Path, train: CaptionedImages, text: torch.Tensor):
    """(PreparedDataset, DeviceTransform) when a finished `clipft prepare-images` cache covers every
    training image and the augmentation can run on the device; None otherwise (JPEG decoding).

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
    rows = prepared.rows_for(train)
    if rows is None:
        log.info("%s does not hold every training image: decoding JPEGs instead", prepared.path)
        return None
    log.info("training images come from the prepared cache %s (%d px, no JPEG decoding)", prepared.path, prepared.size)
    ds = PreparedDataset(prepared, rows, text, train.caption_offsets().tolist(), seed=cfg.train.seed)
    tf = DeviceTransform(cfg.data.image_size, cfg.data.mean, cfg.data.std, augment=cfg.data.augment,
                         flip=cfg.data.flip == "plain")
    return ds, tf


def make_train_loader(ds: TrainDataset | PreparedDataset, cfg: Config, epoch: int, device: torch.device
                      ) -> DataLoader | PreparedLoader:
    """A fresh loader per epoch: the shuffle order and each image's caption depend only on
    (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would. Under
    torchrun this process reads its slice of every global batch (`distributed.shard_train_indices`)."""
    ds.set_epoch(epoch)
    indices = distributed.shard_train_indices(len(ds), cfg.train.batch_size, cfg.train.seed, epoch,
                                              distributed.get_rank(), distributed.get_world_size())
    if isinstance(ds, PreparedDataset):
        # A prepared batch is one memcpy: a reader thread beats worker processes (see PreparedLoader).
        return PreparedLoader(ds, indices, cfg.train.batch_size, pin_memory=device.type == "cuda")
    return DataLoader(ds, batch_size=cfg.train.batch_size, sampler=indices, num_workers=worker_count(cfg.data.num_workers),
                      collate_fn=collate_train, pin_memory=device.type == "cuda")


def micro_batch_groups(loader: DataLoader, k: int, counts: dict) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The loader's (images, texts) batches grouped k at a time, one group per optimizer step (the
    last group of an epoch may be shorter). A batch is left out, by every rank alike, when some rank
    holds fewer than 2 readable images (the loss needs negatives). Updates counts (all ranks
    summed): "skipped_images" (unreadable), "images" (in kept batches), "batch" (last kept global batch)."""
    group = []
    for images, texts, _idx, n_skipped in loader:
        per_rank = distributed.all_gather_ints([images.shape[0], n_skipped])  # [[B_r, skipped_r], ...]
        counts["skipped_images"] += sum(r[1] for r in per_rank)
        if min(r[0] for r in per_rank) < 2:
            continue
        counts["batch"] = sum(r[0] for r in per_rank)
        counts["images"] += counts["batch"]
        group.append((images, texts))
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


# --------------------------------------------------------------------------- the training step

def train_step(model: torch.nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, grad_clip: float,
               gather: bool = False, channels_last: bool = False,
               transform: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One optimisation step over K micro-batches [(images [B, 3, H, W], texts [B, D] cached caption
    embeddings), ...] (K = 1 without gradient accumulation); tensors are moved to the model's device here.
    `model` is the ImageTower or its DDP wrapper; gather=True (DDP): the loss uses every process's
    batch as negatives (`clip_loss`), and DDP averages the gradients on the last micro-batch.
    transform: for uint8 batches (prepared cache or JPEG workers), the on-device resize/crop/flip/normalise.

    Returns 0-d tensors on the device, never read here (the host does not wait for the GPU inside
    the step; the loop reads them every train.log_every steps, see `step_values`): "loss",
    "loss_i2t", "loss_t2i" (averaged over the micro-batches), "grad_norm", "logit_scale",
    "embed_cos" (mean pairwise cosine of the last micro-batch's image embeddings, the collapse check
    in `health`) and "skipped" (1.0 if the update was skipped, else 0.0).

    NaN guard, without a host sync: a micro-batch whose loss is not finite back-propagates NaN
    gradients (its backward is scaled by NaN instead of 1), DDP's all-reduce spreads them to every
    rank, so the clipped gradient norm is NaN on every rank alike, and the update is skipped on the
    device: fp16 by the GradScaler (which also lowers its scale), fp32/bf16 by handing the fused
    AdamW `found_inf` (the same mechanism). One bad micro-batch drops the whole step: a non-finite
    loss says the weights or the data are broken. Optimizers without `found_inf` support (SGD in
    tests) fall back to one host read of the verdict. A skipped step also restores every buffer
    (BatchNorm running statistics, which the forward pass already moved) from a copy taken at the
    start, with `torch.where` on the device: parameters, optimizer state and buffers stay unchanged.
    """
    tower = distributed.unwrap(model)  # the ImageTower: logit_scale, clamp
    device = tower.logit_scale.device
    k = len(micro_batches)
    # The train-mode forward updates BatchNorm running statistics before any guard can act: keep
    # a device copy of every buffer so a skipped step leaves the whole model unchanged (below).
    buffers = [b for b in tower.buffers()]
    saved_buffers = [b.detach().clone() for b in buffers]
    terms_sum: dict[str, torch.Tensor] = {}
    for i, (images, texts) in enumerate(micro_batches):
        images = images.to(device, non_blocking=True)
        if transform is not None:
            images = transform(images)  # uint8 [B, S, S, 3] -> normalised float [B, 3, H, W], on device
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        texts = texts.to(device, non_blocking=True)
        # Gradients accumulate locally; DDP all-reduces them only in the last micro-batch's backward.
        no_sync = model.no_sync() if i < k - 1 and hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync:
            # Forward under autocast (bf16/fp16 on CUDA, off on CPU); the loss itself runs in fp32.
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                image_emb = model(images)  # [B, D], L2-normalised fp32
            logit_scale = tower.logit_scale.exp()  # 1/tau, scalar
            terms = clip_loss(image_emb, texts, logit_scale, gather=gather)
            loss = terms["loss"]
            # 1 for a finite loss, NaN otherwise: NaN * gradient is NaN even where the gradient is 0,
            # so every parameter the loss reaches reports the failure (the NaN guard in the docstring).
            poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
            # / k: the accumulated gradient is the mean over micro-batches (each one's loss only has
            # its own batch as negatives: accumulation enlarges the gradient's batch, not the softmax).
            scaler.scale(loss * poison / k).backward()
        for name, v in terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + v.detach() / k

    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    params = [p for p in model.parameters() if p.requires_grad]
    # Identical on every rank (the gradients were all-reduced); NaN/inf when any micro-batch failed.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    skipped = (~torch.isfinite(grad_norm)).float()  # 0-d, on the device
    if scaler.is_enabled():
        scaler.step(optimizer)  # fp16: the scaler found the same non-finite gradients and skips
    elif getattr(optimizer, "_step_supports_amp_scaling", False):  # fused: skips on the device
        optimizer.found_inf = skipped
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(skipped):  # host read: optimizers without found_inf support only
        optimizer.step()
    with torch.no_grad():  # a skipped step restores the buffers, on the device (no host read)
        for b, saved in zip(buffers, saved_buffers):
            b.copy_(torch.where(skipped > 0, saved, b))
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()  # also after a skipped step: the schedule follows attempted steps
    tower.clamp_logit_scale_()  # keep 1/tau <= max_logit_scale (only moves if learnable)
    return {**terms_sum, "grad_norm": grad_norm.detach(), "logit_scale": logit_scale.detach(),
            "embed_cos": pairwise_cosine(image_emb), "skipped": skipped}


def non_finite_state(model: torch.nn.Module) -> str | None:
    """None if every parameter and buffer of `model` is finite, else a short description (one host
    read per epoch: a checkpoint is never written from a model holding NaN/inf)."""
    bad = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return None
    return f"{len(bad)} weight/buffer tensor(s) hold NaN/inf (first: {bad[0]})"


def step_values(out: dict[str, torch.Tensor]) -> dict[str, float]:
    """`train_step`'s tensors as Python floats, read in one device->host transfer."""
    names = list(out)
    values = torch.stack([out[n].detach().float() for n in names]).tolist()  # all 0-d, on one device
    return dict(zip(names, values))


class StepStats:
    """Sums of `train_step` outputs kept on the device between host reads, so the loop syncs with the
    GPU only every train.log_every steps and at the end of an epoch.

    ep_*: this epoch (loss summed over good steps); win_*: since the last step record (the health
    check's window); bad_run: skipped updates in a row now (carried across epochs), worst_run: the
    longest such run seen (what the divergence check compares with train.max_bad_steps).
    """

    NAMES = ("ep_loss", "ep_good", "ep_skipped", "win_loss", "win_good", "bad_run", "worst_run")

    def __init__(self, device: torch.device):
        self.v = torch.zeros(len(self.NAMES), device=device)  # [7], indexed as NAMES
        self._skipped_seen = 0.0  # ep_skipped at the last read (for the warning)

    def new_epoch(self) -> None:
        self.v[:3] = 0
        self._skipped_seen = 0.0
        self.new_window()

    def new_window(self) -> None:
        self.v[3:5] = 0

    def add(self, out: dict[str, torch.Tensor]) -> None:
        skipped = out["skipped"]
        good = 1.0 - skipped
        loss = torch.where(skipped > 0, 0.0, out["loss"])  # a skipped step's NaN must not reach the sums
        bad_run = (self.v[5] + 1.0) * skipped  # +1 when skipped, back to 0 when not
        self.v += torch.stack([loss, good, skipped, loss, good, bad_run - self.v[5],
                               torch.clamp(bad_run - self.v[6], min=0.0)])

    def read(self, step: int) -> dict[str, float]:
        """The sums as floats (one device->host copy); warns about updates skipped since the last read."""
        seen = dict(zip(self.NAMES, self.v.tolist()))
        new = int(seen["ep_skipped"] - self._skipped_seen)
        if new:
            log.warning("%d update(s) skipped by step %d: non-finite loss/gradients (%d in a row now)",
                        new, step, int(seen["bad_run"]))
        self._skipped_seen = seen["ep_skipped"]
        return seen


# --------------------------------------------------------------------------- the loop

def train(cfg: Config, data_root: str | Path, out_dir: str | Path, resume: bool = True,
          progress: bool = True) -> dict:
    """Train the image tower; returns the summary dict (also written to RUN/summary.json).

    With resume=True and RUN/last.pt present, continues from it exactly (model, optimizer,
    scheduler, scaler, RNG states, epoch), appending to the same logs.

    Under torchrun (WORLD_SIZE > 1) every process calls this: it joins the process group
    (`distributed.setup`), trains its shard of every global batch under DDP with global negatives,
    and rank 0 alone logs and writes RUN/; the group is left again at the end.
    """
    validate(cfg)  # ranges and choices, before any work (configs built in code skip load_config)
    ctx = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, data_root, out_dir, resume, progress, ctx)
    finally:
        distributed.teardown(ctx)


def _train(cfg: Config, data_root: str | Path, out_dir: str | Path, resume: bool, progress: bool,
           ctx: distributed.DistContext) -> dict:
    t_start = time.time()
    if cfg.train.grad_accum_steps < 1:
        raise ConfigError(f"train.grad_accum_steps must be >= 1, got {cfg.train.grad_accum_steps}")
    run = RunFiles(Path(out_dir))
    run.root.mkdir(parents=True, exist_ok=True)
    if ctx.is_main and not os.access(run.root, os.W_OK):
        raise TrainingError(f"{run.root}: the run directory is not writable; use another --out")
    device, world, main = ctx.device, ctx.world_size, ctx.is_main
    seed_everything(cfg.train.seed + ctx.rank)  # rank 0 = the single-process seed; others differ (augmentation)
    amp_dtype = amp_dtype_for(device, cfg.train.amp)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    with distributed.main_process_first("data preparation"):  # rank 0 builds the text cache, the others read it
        data = prepare_data(cfg, data_root, device)
    if main:
        save_config(cfg, run.config)

    with distributed.main_process_first("model construction"):  # one download of the ImageNet weights
        model = build_image_tower(cfg.model, embed_dim=data.train_text.shape[1]).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)  # NHWC convs: ~1.5x on tensor cores
    model = distributed.convert_to_sync_batchnorm(model, ctx, cfg.train.sync_batchnorm)
    # Built before any temporary freeze, so a backbone frozen for the first epochs is in it.
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # Workers decode and crop to uint8; normalisation runs once per batch on the device (train_step).
    transform = build_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std, train=True,
                                augment=cfg.data.augment, flip=cfg.data.flip == "plain",
                                color_jitter=cfg.data.color_jitter, output="uint8")
    prepared = open_prepared_train(cfg, data_root, data.train, data.train_text)
    device_transform = (prepared[1] if prepared else
                        DeviceTransform(cfg.data.image_size, cfg.data.mean, cfg.data.std)).to(device)
    if prepared:
        train_ds = prepared[0]
    else:
        # draft_size: large JPEGs are DCT-downscaled while decoding (never below image_size).
        train_ds = TrainDataset(data.train, data.train_text, transform, seed=cfg.train.seed,
                                draft_size=cfg.data.image_size, flip_embeds=data.train_flip_text,
                                flip_rows=data.train_flip_rows)
    if len(train_ds) < 2 * world:
        raise TrainingError(f"{data_root}: {len(train_ds)} training images cannot feed {world} processes "
                            "(each needs at least 2 per batch)")
    accum = cfg.train.grad_accum_steps
    # One optimizer step = accum loader batches per rank (a partial group only when an epoch is shorter).
    n_batches = max(1, distributed.micro_batches_per_epoch(len(train_ds), cfg.train.batch_size, world) // accum)
    steps_per_epoch = min(n_batches, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch > 0 else n_batches
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio))

    start_epoch, global_step, best_metric, best_epoch = 0, 0, -1.0, -1
    totals = {"skipped_images": 0, "skipped_steps": 0}
    prior_seconds = 0.0
    has_last = resume and run.last.is_file()
    if world > 1 and len(set(distributed.all_gather_objects(has_last))) > 1:
        raise distributed.DistributedError(f"{run.last} is visible to some processes and not to others: the run "
                                           "directory must be on a filesystem shared by all nodes")
    if has_last:
        ckpt = torch.load(run.last, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        # Each rank continues its own RNG stream; with another number of processes the data order
        # and global batch change anyway, so rank 0's state (reseeded per rank) is the best there is.
        rngs = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        if len(rngs) == world:
            set_rng_state(rngs[ctx.rank])
        else:
            log.warning("%s was written by %d process(es), this run has %d: the global batch and data order "
                        "change from here on", run.last, len(rngs), world)
            set_rng_state(rngs[0])
            seed_everything(cfg.train.seed + 1000 * ckpt["epoch"] + ctx.rank)
        start_epoch, global_step = ckpt["epoch"], ckpt["step"]
        best_metric, best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
        totals, prior_seconds = ckpt["totals"], ckpt.get("train_seconds", 0.0)
        del ckpt
        if main:
            # Drop log records written after that checkpoint (a crash mid-epoch), so logs == checkpoint.
            kept = [r for r in read_records(run.metrics) if r.get("epoch", 0) <= start_epoch]
            run.metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        log.info("resuming %s from epoch %d (step %d)", run.root, start_epoch, global_step)
    elif main and run.metrics.exists():
        run.metrics.unlink()  # a fresh run into an old directory starts fresh logs
    # DDP after loading: it broadcasts rank 0's weights so every rank starts identical. `model` stays
    # the bare ImageTower (evaluation, checkpoints); `ddp_model` is what train_step runs.
    # A backbone frozen for the first epochs gets no gradients then: DDP must not wait for them.
    ddp_model = distributed.wrap_model(model, ctx, find_unused_parameters=cfg.train.freeze_backbone_epochs > 0)
    if cfg.train.compile:
        # Compile the wrapper (DDP first, then compile: the order PyTorch documents), so DDP's bucketed
        # all-reduce still overlaps the backward. The first steps pay the compilation.
        ddp_model = torch.compile(ddp_model)

    params = count_parameters(model)
    log.info("image tower %s: %d trainable / %d parameters; %d train / %d val images; device %s",
             cfg.model.backbone, params["trainable"], params["total"], len(data.train), len(data.val), device)
    global_batch = cfg.train.batch_size * world
    if world > 1 or accum > 1:
        log.info("%d process(es) x batch %d = %d negatives per loss; x %d accumulated micro-batches = %d images "
                 "per optimizer step", world, cfg.train.batch_size, global_batch, accum, global_batch * accum)

    metrics_f = open(run.metrics, "a") if main else None

    def log_record(rec: dict) -> None:
        if metrics_f is not None:  # rank 0 only
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()

    stats = StepStats(device)
    health = HealthMonitor(cfg.train.warmup_steps, cfg.model.max_logit_scale, cfg.model.learnable_temperature)

    def log_warnings(records: list[dict]) -> None:
        for w in records:
            if main:
                log.warning("health: %s", w["message"])
            log_record(w)

    def check_divergence(seen: dict, epoch: int) -> None:
        """Stop once train.max_bad_steps updates in a row were skipped. The check runs at host reads
        only, but skipped updates change no weight, so stopping a few steps late loses nothing."""
        if seen["worst_run"] < cfg.train.max_bad_steps:
            return
        if metrics_f is not None:
            metrics_f.close()
        last = f"{run.last} (epoch {start_epoch if epoch == start_epoch + 1 else epoch - 1})" \
            if run.last.exists() else "no checkpoint yet"
        raise TrainingError(
            f"training diverged: {int(seen['worst_run'])} consecutive non-finite steps by epoch {epoch}, "
            f"step {global_step}. Last good checkpoint intact: {last}. Lower train.lr or "
            f"raise train.warmup_steps, then rerun the same command to resume.")

    t_train = time.time()
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        if cfg.train.freeze_backbone_epochs > 0:  # a pure function of the epoch: resumes exactly
            model.set_backbone_trainable(epoch > cfg.train.freeze_backbone_epochs)
        ddp_model.train()
        loader = make_train_loader(train_ds, cfg, epoch, device)
        # disable=None: bars only on a terminal, so logs redirected to a file stay readable.
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.train.epochs}",
                   disable=None if progress and main else True, dynamic_ncols=True, leave=False)
        t_ep = time.time()
        counts = {"skipped_images": 0, "images": 0, "batch": 0}  # summed over ranks
        t_log, n_img_logged = time.time(), 0
        stats.new_epoch()
        groups = micro_batch_groups(loader, accum, counts)
        for micro in itertools.islice(groups, steps_per_epoch):  # one group = one attempted step
            out = train_step(ddp_model, micro, optimizer, scheduler, scaler, amp_dtype, cfg.train.grad_clip,
                             gather=world > 1, channels_last=device.type == "cuda" and cfg.train.channels_last,
                             transform=device_transform)
            global_step += 1
            stats.add(out)  # device-side sums: the host does not wait for this step here
            bar.update(1)
            if global_step % cfg.train.log_every:
                continue
            # Every log_every steps: the one host read of the step outputs (the same values on every rank).
            now_out, seen = step_values(out), stats.read(global_step)
            check_divergence(seen, epoch)
            chance = chance_loss(counts["batch"])  # ln(global batch): the loss of a model that guesses
            skipped_so_far = totals["skipped_steps"] + int(seen["ep_skipped"])
            bar.set_postfix(loss=f"{now_out['loss']:.3f}", chance=f"{chance:.2f}",
                            scale=f"{now_out['logit_scale']:.1f}", gnorm=f"{now_out['grad_norm']:.2f}",
                            img_s=f"{counts['images'] / max(1e-9, time.time() - t_ep):.0f}", skipped=skipped_so_far)
            if now_out["skipped"] or seen["win_good"] == 0:
                continue  # nothing finite to log; the skipped steps were reported by stats.read
            now = time.time()
            log_record({"type": "step", "epoch": epoch, "step": global_step, "loss": now_out["loss"],
                        "chance_loss": chance, "lr": scheduler.get_last_lr()[0],
                        "logit_scale": now_out["logit_scale"], "grad_norm": now_out["grad_norm"],
                        "images_per_s": (counts["images"] - n_img_logged) / max(1e-9, now - t_log),
                        "skipped_steps": skipped_so_far, "embed_cos": now_out["embed_cos"]})
            log_warnings(health.step(epoch, global_step, seen["win_loss"] / seen["win_good"], chance,
                                     now_out["embed_cos"], now_out["logit_scale"]))
            t_log, n_img_logged = now, counts["images"]
            stats.new_window()
        seen = stats.read(global_step)  # the epoch's sums, and the verdict on its last steps
        check_divergence(seen, epoch)
        ep_steps, ep_skipped_steps = int(seen["ep_good"]), int(seen["ep_skipped"])
        ep_loss = seen["ep_loss"]
        bar.close()
        groups.close()  # also closes the loader (its workers) when the epoch stopped early
        ep_skipped_img = counts["skipped_images"]
        totals["skipped_images"] += ep_skipped_img
        totals["skipped_steps"] += ep_skipped_steps
        train_seconds = time.time() - t_ep

        record: dict[str, Any] = {"type": "epoch", "epoch": epoch, "step": global_step,
                                  "train_loss": ep_loss / max(1, ep_steps), "steps": ep_steps,
                                  "skipped_steps": ep_skipped_steps, "skipped_images": ep_skipped_img,
                                  "lr": scheduler.get_last_lr()[0],
                                  "logit_scale": model.logit_scale.exp().item(),
                                  "train_seconds": train_seconds}
        # One set of BatchNorm running statistics (rank 0's) for evaluation and the checkpoint.
        distributed.broadcast_buffers(model)
        if main:
            record["diverged"] = non_finite_state(model)  # None when every weight and buffer is finite
        if epoch % cfg.eval.every == 0 or epoch == cfg.train.epochs:
            # Every rank embeds a shard of the images; rank 0 scores the gathered set (= single process).
            emb, rows = sharded_embed_images(model, data.val, cfg, device, amp_dtype)
            if main and record["diverged"] is None:
                try:
                    # val loss in batches of the global batch: the negatives the train loss has.
                    val = evaluate_split(emb, rows, data.val, data.val_text, cfg.eval.ks,
                                         logit_scale=model.logit_scale.exp().item(), batch_size=global_batch)
                except EvaluationError as e:  # non-finite validation embeddings
                    record["diverged"] = str(e)
                else:
                    if not math.isfinite(val.get("val_loss", 0.0)):
                        record["diverged"] = f"the validation loss is {val['val_loss']}"
                    record.update(val_loss=val.get("val_loss"), val=val,
                                  val_skipped_images=len(data.val) - val["num_images"])
                    record["mean_R@5"] = mean_recall(val, 5)
        if world > 1:
            record = distributed.all_gather_objects(record)[0]  # rank 0's: the same best/early decisions everywhere
        reason = record.pop("diverged", None)
        if reason is not None:  # never logged as an epoch, never best, nothing overwritten
            last = f"{run.last} (epoch {start_epoch if epoch == start_epoch + 1 else epoch - 1})" \
                if run.last.exists() else "no checkpoint was written"
            log_warnings([{"type": "warning", "kind": "diverged", "epoch": epoch, "step": global_step,
                           "message": f"training diverged in epoch {epoch}: {reason}"}])
            if metrics_f is not None:
                metrics_f.close()
            raise TrainingError(f"training diverged in epoch {epoch}: {reason}. Last good checkpoint intact: "
                                f"{last}. Lower train.lr or raise train.warmup_steps, then rerun with another --out "
                                "(or --no-resume)")
        log_record(record)
        if main:
            write_epochs_csv(run.epochs_csv, read_records(run.metrics, "epoch"))
            log_warnings(health.epoch(epoch, global_step, read_records(run.metrics, "epoch")))

        is_best = "mean_R@5" in record and record["mean_R@5"] > best_metric
        if is_best:
            best_metric, best_epoch = record["mean_R@5"], epoch
        rngs = distributed.all_gather_objects(rng_state())  # every rank's stream, for an exact resume
        if main:
            ckpt = {**tower_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch, "step": global_step, "rng": rngs[0],
                    "rng_per_rank": rngs, "world_size": world,
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
    if metrics_f is not None:
        metrics_f.close()

    summary = {
        "run_dir": str(run.root), "data_root": str(data_root), "epochs": cfg.train.epochs, "steps": global_step,
        "best_epoch": best_epoch, "best_mean_R@5": best_metric,
        "train_seconds": prior_seconds + (time.time() - t_train), "wall_seconds_this_invocation": time.time() - t_start,
        "hardware": hardware_info(device), "parameters": count_parameters(model),
        "dataset": {"train_images": len(data.train), "train_captions": len(data.train.captions),
                    "val_images": len(data.val), "val_captions": len(data.val.captions),
                    "source": data.train.name, "val_source": data.val.name},
        "text": data.text_info, **totals,
        "health_warnings": [w["kind"] for w in read_records(run.metrics, "warning")],
        "distributed": {"processes": world, "backend": ctx.backend, "batch_per_process": cfg.train.batch_size,
                        "global_batch": global_batch, "grad_accum_steps": accum,
                        "images_per_step": global_batch * accum, "sync_batchnorm": cfg.train.sync_batchnorm},
    }
    if main:
        epochs = read_records(run.metrics, "epoch")
        if epochs and "val" in epochs[-1]:
            summary["final_val"] = epochs[-1]["val"]
        run.summary.write_text(json.dumps(summary, indent=2) + "\n")
    distributed.barrier()  # every process returns once rank 0 has written everything
    return summary


def _plot_curves(run: RunFiles) -> None:
    from .visualize import plot_training_curves  # matplotlib import only when plotting
    plot_training_curves(read_records(run.metrics, "epoch"), run.curves)
