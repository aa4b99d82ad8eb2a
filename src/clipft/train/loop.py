"""Training: data + cached text -> image tower. The loop is named phases around one `TrainState`:

  setup_runtime, setup_data, setup_model   run directory and seeds; splits, caption caches, dataset; tower,
                                           optimizer, schedule -> a fresh TrainState
  restore                                  continue from last.pt (`checkpoint.Checkpointer`)
  train_one_epoch -> EpochStats            the optimizer steps (`step.train_step`, one screen)
  validate_epoch, end_epoch                recall on the validation split; log, best.pt / last.pt
  finish                                   summary.json

`_train` reads as that table of contents. Writes a run directory (its layout and `RunLog`:
`runfiles.py`). Under torchrun every process runs `train`; rank 0 alone writes the files (see
distributed.py). `TrainHooks` / `use_hooks` are the seams tests replace parts of the loop through.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import distributed, threads
from . import tensorboard as tblog
from ..config import Config, DataConfig, checkpoint_interval, to_dict, validate
from ..data import TrainDataset, build_transform, collate_train
from ..eval.evaluate import EvaluationError, evaluate_split, mean_recall, sharded_embed_images
from .checkpoint import Checkpointer
from .chunked import train_mode_batchnorms
from .health import HealthMonitor
from ..loss import chance_loss, clip_loss
from ..model import check_model_config, fill_weights_sha256
from ..model import build_image_tower, count_parameters, tower_state
from .rundir import RunFiles, RunLog, read_records
from .preempt import StopFlag, at_step_boundary, between_steps, resume_loader
from .resume import check_config, check_data, check_world_size
from .lock import RunLock
from ..runtime import Precision, atomic_write_text, hardware_info, overriding, rng_state, seed_everything, select_precision, worker_count
from .batches import keyed_transform, micro_batch_groups
from .optim import build_optimizer, build_scheduler
from .step import StepStats, non_finite_state, step_values, train_step
from ..data.device_transform import DeviceTransform
from ..data.prepared_reader import PreparedDataset, PreparedLoader
from ..data.shards import ShardTrainDataset, is_shard_split
from .data_setup import PreparedData, open_prepared_train, prepare_data
from .errors import TrainingError  # noqa: F401 (re-exported for callers of the loop)
from . import clustered
from .ema import WeightEMA
from ..config import parse_text_negatives
from ..data import text_cache_file
from ..objectives import SIGLIP_INIT_BIAS, SIGLIP_INIT_SCALE, Recipe

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data

def make_train_loader(ds: TrainDataset | PreparedDataset, cfg: Config, epoch: int, device: torch.device,
                      skip_batches: int = 0) -> DataLoader | PreparedLoader:
    """A fresh loader per epoch: the shuffle order and each image's caption depend only on
    (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would. Under
    torchrun this process reads its slice of every global batch (`distributed.shard_train_indices`).
    skip_batches: the loader batches a mid-epoch checkpoint already trained on (never decoded again)."""
    ds.set_epoch(epoch)
    # Shards: an order that reads a few shards at a time (`ShardTrainDataset.epoch_order`), same rules.
    order = ds.epoch_order(cfg.train.seed, epoch) if hasattr(ds, "epoch_order") else None
    if getattr(ds, "clusters", None) is not None:  # data.batch_sampler=clustered (train/clustered.py)
        indices = clustered.shard_clustered_indices(ds.clusters, cfg.train.batch_size, cfg.train.seed, epoch,
                                                    distributed.get_rank(), distributed.get_world_size())
    else:
        indices = distributed.shard_train_indices(len(ds), cfg.train.batch_size, cfg.train.seed, epoch,
                                                  distributed.get_rank(), distributed.get_world_size(), order=order)
    indices = indices[skip_batches * cfg.train.batch_size:]  # runs of batch_size: whole batches
    if isinstance(ds, PreparedDataset):
        # A prepared batch is one memcpy: a reader thread beats worker processes (see PreparedLoader).
        return PreparedLoader(ds, indices, cfg.train.batch_size, pin_memory=device.type == "cuda")
    return DataLoader(ds, batch_size=cfg.train.batch_size, sampler=indices, num_workers=worker_count(cfg.data.num_workers),
                      collate_fn=collate_train, pin_memory=device.type == "cuda")


# --------------------------------------------------------------------------- seams

@dataclass
class TrainHooks:
    """The parts of the loop that can be replaced, each the real one by default: seams for tests (a
    crash at an epoch, a poisoned loss, a spy on the step). Install them with `use_hooks`."""
    make_loader: Callable[..., Any] = make_train_loader
    build_tower: Callable[..., Any] = build_image_tower
    step: Callable[..., dict] = train_step
    loss: Callable[..., dict] = clip_loss
    metric: Callable[[dict, int], float] = mean_recall  # the selection metric: mean R@K of an epoch
    started: Callable[[Config, Path], None] | None = None  # called as a run starts (cfg, run dir)


_HOOKS = TrainHooks()


def use_hooks(**parts: Any) -> contextlib.AbstractContextManager[TrainHooks]:
    """`train` runs with these parts of `TrainHooks` replaced inside the block (also under `cli.main`)."""
    return overriding(_HOOKS, **parts)


# --------------------------------------------------------------------------- state

@dataclass
class Runtime:
    """Where this process trains: the process group, its device and the precision (`select_precision`)."""
    ctx: distributed.DistContext
    device: torch.device
    precision: Precision

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.precision.dtype

    @property
    def world(self) -> int:
        return self.ctx.world_size

    @property
    def main(self) -> bool:
        return self.ctx.is_main


@dataclass
class Plan:
    """What stays fixed for the whole run: the data, the dataset the loaders read, the step budget."""
    data: PreparedData
    dataset: TrainDataset | PreparedDataset
    device_transform: torch.nn.Module  # uint8 batches -> normalised float, on the device
    steps_per_epoch: int
    accum: int  # micro-batches per optimizer step
    global_batch: int  # batch_size x processes: the negatives of one loss


@dataclass
class TrainState:
    """Everything an epoch changes: what a checkpoint saves and `restore` puts back."""
    model: torch.nn.Module  # the bare ImageTower (evaluation, checkpoints)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ddp_model: torch.nn.Module | None = None  # what train_step runs (DDP / compile wrapper, or the model)
    epoch: int = 0  # last completed epoch
    global_step: int = 0
    best_metric: float = -1.0  # best mean validation R@5 so far
    best_epoch: int = -1
    totals: dict[str, int] = field(default_factory=lambda: {"skipped_images": 0, "skipped_steps": 0})
    prior_seconds: float = 0.0  # training time of earlier invocations (resumed runs)
    start_epoch: int = 0  # the epoch this invocation started after
    epoch_steps: int = 0  # optimizer steps of epoch `epoch + 1` done (a mid-epoch checkpoint; else 0)
    resume_rng: dict | None = None  # a mid-epoch checkpoint's RNG state, put back once the loader exists
    t_train: float = field(default_factory=time.time)  # when this invocation's training began
    recipe: Recipe | None = None  # the caption bank / image queue / SigLIP loss (objectives.py), when on
    ema: WeightEMA | None = None  # train.ema > 0: the averaged weights (ema.py)

    def eval_model(self) -> torch.nn.Module:
        """What validation, best.pt and export use: the EMA weights when train.ema is on."""
        return self.ema.module if self.ema is not None else self.model

    def train_seconds(self) -> float:
        return self.prior_seconds + (time.time() - self.t_train)

    def state_dict(self, cfg: Config, data: PreparedData) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.recipe is not None:
            extra["recipe"] = self.recipe.state_dict()  # the image queue
        if self.ema is not None:  # "model" = the EMA weights (export, clipft.load); the raw ones to resume
            extra.update(tower_state(self.ema.module), train_model=self.model.state_dict(), ema=self.ema.state_dict())
        return {**tower_state(self.model), **extra, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "step": self.global_step, "epoch_steps": self.epoch_steps, "config": to_dict(cfg), "best_metric": self.best_metric,
                "best_epoch": self.best_epoch, "totals": self.totals, "text": data.text_info, "data": data.identity,
                "train_seconds": self.train_seconds()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["train_model"] if "train_model" in ckpt else ckpt["model"])
        saved_groups = len(ckpt["optimizer"].get("param_groups", []))
        if saved_groups != len(self.optimizer.param_groups):
            # e.g. a run started by clipft 0.1 with train.freeze_backbone_epochs > 0 and
            # backbone_lr_ratio=1 (one group then; the backbone has its own groups now, for its warm-up).
            raise TrainingError(f"the checkpoint's optimizer has {saved_groups} parameter groups where this "
                                f"version builds {len(self.optimizer.param_groups)}: it was written by an older "
                                "clipft; finish it with that version, or rerun with --no-resume to start over")
        if self.ema is not None:
            if "ema" in ckpt:
                self.ema.load_state_dict(ckpt["model"], ckpt["ema"])
            else:  # not expected (train.ema is part of the resume check); start the average here
                self.ema.load_state_dict(self.model.state_dict(), {"updates": 0})
        if self.recipe is not None:
            self.recipe.load_state_dict(ckpt.get("recipe") or {})
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = self.start_epoch = ckpt["epoch"]
        self.global_step, self.epoch_steps = ckpt["step"], ckpt.get("epoch_steps", 0)
        self.best_metric, self.best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
        self.totals, self.prior_seconds = ckpt["totals"], ckpt.get("train_seconds", 0.0)


@dataclass
class EpochStats:
    """One epoch's training figures (summed over ranks)."""
    epoch: int
    loss_sum: float  # over the good steps
    steps: int  # good (not skipped) steps
    skipped_steps: int
    skipped_images: int
    seconds: float

    def record(self, state: TrainState) -> dict[str, Any]:
        """The epoch record of metrics.jsonl, before validation adds to it."""
        return {"type": "epoch", "epoch": self.epoch, "step": state.global_step,
                "train_loss": self.loss_sum / max(1, self.steps), "steps": self.steps,
                "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images,
                "lr": state.scheduler.get_last_lr()[0], "logit_scale": state.model.logit_scale.exp().item(),
                "train_seconds": self.seconds}


# --------------------------------------------------------------------------- the loop

def train(cfg: Config, data_root: str | Path, out_dir: str | Path, resume: bool = True,
          progress: bool = True) -> dict:
    """Train the image tower; returns the summary dict (also written to RUN/summary.json).

    With resume=True and RUN/last.pt present (or RUN/last.prev.pt when last.pt does not load),
    continues from it exactly (model, optimizer, scheduler, scaler, RNG states, epoch and step),
    appending to the same logs, once `resume.check_config` / `check_data` found that `cfg` and the
    data continue the stored run (ResumeError otherwise, before anything is written).

    Under torchrun (WORLD_SIZE > 1) every process calls this: it joins the process group
    (`distributed.setup`), trains its shard of every global batch under DDP with global negatives,
    and rank 0 alone logs and writes RUN/; the group is left again at the end.
    """
    validate(cfg)  # ranges and choices, before any work (configs built in code skip load_config)
    fill_weights_sha256(cfg.model)  # a weights file's identity, in the config before a resume compares configs
    ctx = distributed.setup(cfg.train.device)
    try:
        # One writer per run directory (rank 0 writes RUN): taken before anything is written.
        with RunLock(out_dir) if ctx.is_main else contextlib.nullcontext():
            return _train(cfg, data_root, RunFiles(Path(out_dir)), resume, progress, ctx, _HOOKS)
    finally:
        distributed.teardown(ctx)


def _train(cfg: Config, data_root: str | Path, run: RunFiles, resume: bool, progress: bool,
           ctx: distributed.DistContext, hooks: TrainHooks) -> dict:
    """The table of contents: setup, restore, then per epoch train / validate / checkpoint, finish."""
    t_start = time.time()
    if hooks.started:
        hooks.started(cfg, run.root)
    rt = setup_runtime(cfg, ctx, run)
    checkpointer = Checkpointer(run, ctx)
    checkpointer.remove_stale_temp()  # a SIGKILL mid-write left it; this process holds the run lock
    ckpt = checkpointer.open_resume(resume)  # last.pt, or last.prev.pt when last.pt does not load
    if ckpt is not None:  # a rerun continues the same run or is refused, before anything is written
        check_config(run.root, ckpt, checkpointer.resumed_from, cfg)
        check_world_size(run.root, ckpt, checkpointer.resumed_from, ctx.world_size)
    # The backbone name, pooling, stages and a weights file (checked against the architecture): before
    # any data is read.
    check_model_config(cfg.model)
    plan = setup_data(cfg, data_root, rt, None if ckpt is None else
                      lambda identity: check_data(run.root, ckpt, checkpointer.resumed_from, identity))
    state = setup_model(cfg, plan, rt, hooks)
    restore(state, checkpointer, cfg, rt, ckpt is not None)
    ckpt = None  # not held for the whole run (the lambda above is done with it)
    if rt.main:  # accepted: only now is the run directory changed (atomically: never a half config.json)
        atomic_write_text(run.config, json.dumps(to_dict(cfg), indent=2) + "\n")
    state.ddp_model = wrap_for_training(state.model, cfg, rt)
    log_plan(cfg, plan, state, rt)
    health = HealthMonitor(cfg.train.warmup_steps, cfg.model.max_logit_scale, cfg.model.learnable_temperature)
    stats = StepStats(rt.device)
    with RunLog(run, rt.main, log) as runlog, StopFlag() as stop:  # SIGTERM/SIGUSR1: saved at a step boundary
        runlog.mirror = tblog.open_mirror(rt.main and cfg.train.tensorboard, run.root,  # train.tensorboard
                                          state.global_step + 1 if state.global_step else None)
        state.t_train = time.time()
        for epoch in range(state.start_epoch + 1, cfg.train.epochs + 1):
            loader = resume_loader(state, hooks.make_loader, plan.dataset, cfg, epoch, rt.device, plan.accum)
            ep = train_one_epoch(state, loader, runlog, epoch, Loop(cfg, rt, plan, health, stats, checkpointer,
                                                                     hooks, progress, stop))
            record = validate_epoch(state, ep, cfg, rt, plan, hooks)
            end_epoch(state, record, runlog, checkpointer, health, cfg, rt, plan)
    return finish(state, cfg, data_root, run, rt, plan, t_start)


def setup_runtime(cfg: Config, ctx: distributed.DistContext, run: RunFiles) -> Runtime:
    """The run directory (writable), seeds, precision and the CUDA math modes."""
    run.root.mkdir(parents=True, exist_ok=True)
    if ctx.is_main and not os.access(run.root, os.W_OK):
        raise TrainingError(f"{run.root}: the run directory is not writable; use another --out")
    seed_everything(cfg.train.seed + ctx.rank)  # rank 0 = the single-process seed; others differ (augmentation)
    rt = Runtime(ctx, ctx.device, select_precision(ctx.device, cfg.train.amp, cfg.train.channels_last,
                                                          image_size=cfg.data.image_size))
    log.info("precision: %s%s (%s)", rt.precision.name, " + channels_last" if rt.precision.channels_last else "",
             rt.precision.reason)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return rt


def setup_data(cfg: Config, data_root: str | Path, rt: Runtime, check: Callable[[dict], None] | None = None) -> Plan:
    """Both splits and their caption caches (`prepare_data`; `check` sees the data identity first),
    the training dataset (prepared images or JPEG decoding) and the step budget of an epoch."""
    with distributed.main_process_first("data preparation"):  # rank 0 builds the text cache, the others read it
        data = prepare_data(cfg, data_root, rt.device, check=check)
    # Workers decode and crop to uint8; normalisation runs once per batch on the device (train_step).
    transform = build_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std, train=True,
                                augment=cfg.data.augment, flip=cfg.data.flip == "plain",
                                color_jitter=cfg.data.color_jitter, output="uint8")
    prepared = open_prepared_train(cfg, data_root, data.train, data.train_text)
    device_transform = (prepared[1] if prepared else
                        DeviceTransform(cfg.data.image_size, cfg.data.mean, cfg.data.std)).to(rt.device)
    if prepared:
        dataset = prepared[0]
    else:
        # draft_size: large JPEGs are DCT-downscaled while decoding (never below image_size).
        dataset = (ShardTrainDataset if is_shard_split(data.train) else TrainDataset)(
                               data.train, data.train_text, transform, seed=cfg.train.seed,
                               draft_size=cfg.data.image_size, flip_embeds=data.train_flip_text,
                               flip_rows=data.train_flip_rows)
    if cfg.data.batch_sampler == "clustered":  # k-means of the caption cache, once (cached beside it)
        with distributed.main_process_first("caption clusters"):
            dataset.clusters = clustered.load_or_build_clusters(
                data.train_text, data.train.caption_offsets(), cfg.train.batch_size * rt.world, cfg.train.seed,
                text_cache_file(data_root, cfg.data.train_split, cfg))
    if len(dataset) < 2 * rt.world:
        raise TrainingError(f"{data_root}: {len(dataset)} training images cannot feed {rt.world} processes "
                            "(each needs at least 2 per batch)")
    accum = cfg.train.grad_accum_steps
    # One optimizer step = accum loader batches per rank (a partial group only when an epoch is shorter).
    n_batches = max(1, distributed.micro_batches_per_epoch(len(dataset), cfg.train.batch_size, rt.world) // accum)
    steps = min(n_batches, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch > 0 else n_batches
    return Plan(data, dataset, device_transform, steps, accum, cfg.train.batch_size * rt.world)


def setup_model(cfg: Config, plan: Plan, rt: Runtime, hooks: TrainHooks) -> TrainState:
    """The tower, its optimizer, LR schedule and gradient scaler, as a fresh TrainState."""
    with distributed.main_process_first("model construction"):  # one download of the ImageNet weights
        model = hooks.build_tower(cfg.model, embed_dim=plan.data.train_text.shape[1]).to(rt.device)
    if rt.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)  # NHWC convs: ~1.5x on tensor cores and oneDNN bf16
    model = distributed.convert_to_sync_batchnorm(model, rt.ctx, cfg.train.sync_batchnorm)
    if cfg.train.loss == "siglip":  # SigLIP's initialisation: t' = log 10 (1/tau = 10), b = -10
        with torch.no_grad():
            model.logit_scale.fill_(math.log(SIGLIP_INIT_SCALE))
        model.add_logit_bias(SIGLIP_INIT_BIAS)
    # Built before any temporary freeze, so a backbone frozen for the first epochs is in it.
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_ratio,
                                split_backbone=cfg.train.freeze_backbone_epochs > 0)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    scheduler = build_scheduler(optimizer, cfg, plan.steps_per_epoch)
    return TrainState(model, optimizer, scheduler, scaler, recipe=build_recipe(cfg, plan, rt, model),
                      ema=WeightEMA(model, cfg.train.ema) if cfg.train.ema > 0 else None)


def build_recipe(cfg: Config, plan: Plan, rt: Runtime, model: torch.nn.Module) -> Recipe | None:
    """The recipe loss when train.text_negatives / train.image_queue / train.loss ask for it, else None
    (the default in-batch InfoNCE, `loss.clip_loss`, unchanged). The caption bank is every training
    caption embedding on the device in the run's precision, with each caption's image index."""
    t = cfg.train
    negatives = parse_text_negatives(t.text_negatives)
    if negatives == 0 and t.image_queue == 0 and t.loss == "infonce":
        return None
    data = plan.data
    offsets = data.train.caption_offsets()
    cap2img = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets[1:] - offsets[:-1])  # [M]
    return Recipe(negatives=negatives, queue_size=t.image_queue, kind=t.loss, seed=t.seed,
                  bank=data.train_text if negatives else None, cap2img=cap2img if negatives else None,
                  device=rt.device, dtype=rt.amp_dtype or torch.float32, tower=model, dim=data.train_text.shape[1])


def restore(state: TrainState, checkpointer: Checkpointer, cfg: Config, rt: Runtime, resume: bool) -> None:
    """Continue from the checkpoint `Checkpointer.open_resume` found (logs cut back to it); else a
    fresh start: fresh logs, and an earlier run's checkpoints removed."""
    if resume:
        ckpt = checkpointer.load_last(rt.device, cfg.train.seed)
        state.load_state_dict(ckpt)
        checkpointer.reconcile_best(ckpt)  # best.pt == the best epoch summary.json will name, after any kill
        del ckpt
        if state.epoch_steps:  # mid-epoch: this RNG state again once the epoch's loader has drawn its seed
            state.resume_rng = rng_state()
        checkpointer.truncate_logs(state.epoch, state.global_step if state.epoch_steps else None)
        log.info("resuming %s from epoch %d (step %d)", checkpointer.run.root,
                 state.epoch + (state.epoch_steps > 0), state.global_step)
    else:
        checkpointer.start_over()
        checkpointer.truncate_logs(0)  # a fresh run into an old directory starts fresh logs


def wrap_for_training(model: torch.nn.Module, cfg: Config, rt: Runtime) -> torch.nn.Module:
    """DDP after loading: it broadcasts rank 0's weights so every rank starts identical. A backbone
    frozen for the first epochs gets no gradients then: DDP must not wait for them."""
    ddp_model = distributed.wrap_model(model, rt.ctx, find_unused_parameters=cfg.train.freeze_backbone_epochs > 0)
    if cfg.train.compile:
        # Compile the wrapper (DDP first, then compile: the order PyTorch documents), so DDP's bucketed
        # all-reduce still overlaps the backward. The first steps pay the compilation.
        ddp_model = torch.compile(ddp_model)
    return ddp_model


def log_plan(cfg: Config, plan: Plan, state: TrainState, rt: Runtime) -> None:
    params = count_parameters(state.model)
    log.info("image tower %s: %d trainable / %d parameters; %d train / %d val images; device %s",
             cfg.model.backbone, params["trainable"], params["total"], len(plan.data.train), len(plan.data.val),
             rt.device)
    log_normalisation(cfg, getattr(state.model, "weights_info", None))
    if rt.world > 1 or plan.accum > 1:
        log.info("%d process(es) x batch %d = %d negatives per loss; x %d accumulated micro-batches = %d images "
                 "per optimizer step", rt.world, cfg.train.batch_size, plan.global_batch, plan.accum,
                 plan.global_batch * plan.accum)
    r = state.recipe
    if r is not None:  # what the recipe levers cost (docs: recipe)
        n_bank = 0 if r.bank is None else (r.bank.shape[0] if r.negatives < 0 else min(r.negatives, r.bank.shape[0]))
        log.info("objective: %s; image->text over %d batch + %d bank captions per loss%s%s", cfg.train.loss,
                 plan.global_batch, n_bank,
                 "" if r.bank is None else f" (caption bank {r.bank.shape[0]} x {r.bank.shape[1]} "
                 f"{str(r.bank.dtype).replace('torch.', '')}: {r.bank.nelement() * r.bank.element_size() / 2**20:.0f} MB "
                 "on the device, every process)",
                 "" if r.queue is None else f"; text->image also over a queue of {r.queue.emb.shape[0]} images")
    if state.ema is not None:
        log.info("train.ema=%g: validation, best.pt and export use the averaged weights", cfg.train.ema)
    if 0 < cfg.train.embed_chunk < cfg.train.batch_size:
        log.info("train.embed_chunk=%d: each batch of %d is embedded in chunks of %d, twice (activations for %d "
                 "images at a time; the loss still has all %d negatives)", cfg.train.embed_chunk,
                 cfg.train.batch_size, cfg.train.embed_chunk, cfg.train.embed_chunk, plan.global_batch)
        state.model.set_backbone_trainable(True)  # what the tower is once every freeze is over
        state.model.train()
        if train_mode_batchnorms(state.model):  # the chunked step puts them in eval mode (chunked.py)
            log.warning("train.embed_chunk=%d: every BatchNorm layer runs on its running statistics (eval mode, "
                        "not updated) so that the chunked loss is exactly the unchunked one; set "
                        "model.freeze_bn_stats=true to say so in the config", cfg.train.embed_chunk)


def log_normalisation(cfg: Config, weights: dict | None) -> None:
    """Say which mean/std the images get, and the one the backbone's pretrained weights expect."""
    if not weights:
        return
    used = f"mean {list(cfg.data.mean)}, std {list(cfg.data.std)}"
    clip = tuple(cfg.data.mean) == DataConfig().mean and tuple(cfg.data.std) == DataConfig().std
    expected = weights.get("mean"), weights.get("std")
    log.info("image weights: %s; normalisation: %s (%s)", weights["source"], used,
             "CLIP's, the default" if clip else "data.mean/data.std")
    if expected[0] and (tuple(expected[0]) != tuple(cfg.data.mean) or tuple(expected[1]) != tuple(cfg.data.std)):
        log.info("the backbone's pretrained weights were trained with mean %s, std %s (set data.mean/data.std to "
                 "use theirs)", [round(x, 6) for x in expected[0]], [round(x, 6) for x in expected[1]])


@dataclass
class Loop:
    """What `train_one_epoch` reads besides the state: fixed for the whole run."""
    cfg: Config
    rt: Runtime
    plan: Plan
    health: HealthMonitor
    stats: StepStats
    checkpointer: Checkpointer
    hooks: TrainHooks
    progress: bool
    stop: StopFlag = field(default_factory=StopFlag)  # set by SIGTERM / SIGUSR1
    checkpoint_every: tuple[str, float] = field(init=False)  # train.checkpoint_every, parsed once

    def __post_init__(self) -> None:
        self.checkpoint_every = checkpoint_interval(self.cfg.train.checkpoint_every)


def train_one_epoch(state: TrainState, loader: Any, runlog: RunLog, epoch: int, loop: Loop) -> EpochStats:
    """One epoch of optimizer steps: a host read of the step outputs every train.log_every steps (step
    records, health checks, the divergence check), none in between."""
    cfg, rt, stats = loop.cfg, loop.rt, loop.stats
    if rt.device.type == "cpu":
        threads.replan()  # other work may have started or stopped since the last epoch (threads.py)
    if cfg.train.freeze_backbone_epochs > 0:  # a pure function of the epoch: resumes exactly
        state.model.set_backbone_trainable(epoch > cfg.train.freeze_backbone_epochs)
    state.ddp_model.train()
    # disable=None: bars only on a terminal, so logs redirected to a file stay readable.
    bar = tqdm(total=loop.plan.steps_per_epoch, desc=f"epoch {epoch}/{cfg.train.epochs}",
               disable=None if loop.progress and rt.main else True, dynamic_ncols=True, leave=False)
    t_ep = time.time()
    counts = {"skipped_images": 0, "images": 0, "batch": 0}  # summed over ranks
    t_log, n_img_logged = time.time(), 0
    stats.new_epoch()
    groups = micro_batch_groups(loader, loop.plan.accum, counts, keep_ids=state.recipe is not None)
    done, state.epoch_steps = state.epoch_steps, 0  # steps of this epoch a mid-epoch checkpoint holds
    bar.update(done)
    # After each step, before the next batch is read: a signal or train.checkpoint_every saves here.
    checked = between_steps(groups, done, lambda n: at_step_boundary(state, epoch, n, loop, groups))
    for micro in itertools.islice(checked, loop.plan.steps_per_epoch - done):  # one group = one attempted step
        # Each sample's augmentation from (seed, epoch, sample index), whatever the workers (preempt: exact resume).
        transform = keyed_transform(loop.plan.device_transform, micro, cfg.train.seed, epoch)
        if state.recipe is not None:  # each micro-batch's loss extras: its image ids, and the bank sample's key
            micro = [(im, tx, {"image_ids": ids, "epoch": epoch, "step": state.global_step, "micro": j})
                     for j, (im, tx, ids) in enumerate(micro)]
        out = loop.hooks.step(state.ddp_model, micro, state.optimizer, state.scheduler, state.scaler, rt.amp_dtype,
                              cfg.train.grad_clip, gather=rt.world > 1,
                              channels_last=rt.precision.channels_last, transform=transform,
                              loss_fn=state.recipe or loop.hooks.loss,
                              embed_chunk=cfg.train.embed_chunk if cfg.train.embed_chunk < cfg.train.batch_size else 0)
        if state.ema is not None:
            state.ema.update(state.model)
        state.global_step += 1
        stats.add(out)  # device-side sums: the host does not wait for this step here
        bar.update(1)
        if state.global_step % cfg.train.log_every:
            continue
        # Every log_every steps: the one host read of the step outputs (the same values on every rank).
        now_out, seen = step_values(out), stats.read(state.global_step)
        check_divergence(seen, state, epoch, loop)
        chance = chance_loss(counts["batch"])  # ln(global batch): the loss of a model that guesses
        if state.recipe is not None:  # more columns than the batch (bank, queue), or SigLIP (no such reference)
            chance = state.recipe.chance(counts["batch"])
        skipped_so_far = state.totals["skipped_steps"] + int(seen["ep_skipped"])
        bar.set_postfix(loss=f"{now_out['loss']:.3f}", chance=f"{chance:.2f}",
                        scale=f"{now_out['logit_scale']:.1f}", gnorm=f"{now_out['grad_norm']:.2f}",
                        img_s=f"{counts['images'] / max(1e-9, time.time() - t_ep):.0f}", skipped=skipped_so_far)
        if now_out["skipped"] or seen["win_good"] == 0:
            continue  # nothing finite to log; the skipped steps were reported by stats.read
        now = time.time()
        runlog.record({"type": "step", "epoch": epoch, "step": state.global_step, "loss": now_out["loss"],
                       "chance_loss": chance, "lr": state.scheduler.get_last_lr()[0],
                       "logit_scale": now_out["logit_scale"], "grad_norm": now_out["grad_norm"],
                       "images_per_s": (counts["images"] - n_img_logged) / max(1e-9, now - t_log),
                       "skipped_steps": skipped_so_far, "embed_cos": now_out["embed_cos"]})
        runlog.warnings(loop.health.step(epoch, state.global_step, seen["win_loss"] / seen["win_good"], chance,
                                         now_out["embed_cos"], now_out["logit_scale"]))
        t_log, n_img_logged = now, counts["images"]
        stats.new_window()
    seen = stats.read(state.global_step)  # the epoch's sums, and the verdict on its last steps
    check_divergence(seen, state, epoch, loop)
    bar.close()
    groups.close()  # also closes the loader (its workers) when the epoch stopped early
    ep = EpochStats(epoch, seen["ep_loss"], int(seen["ep_good"]), int(seen["ep_skipped"]),
                    counts["skipped_images"], time.time() - t_ep)
    state.totals["skipped_images"] += ep.skipped_images
    state.totals["skipped_steps"] += ep.skipped_steps
    return ep


def check_divergence(seen: dict, state: TrainState, epoch: int, loop: Loop) -> None:
    """Stop once train.max_bad_steps updates in a row were skipped. The check runs at host reads
    only, but skipped updates change no weight, so stopping a few steps late loses nothing."""
    if seen["worst_run"] < loop.cfg.train.max_bad_steps:
        return
    last = loop.checkpointer.last_good(epoch, state.start_epoch, none="no checkpoint yet")
    raise TrainingError(
        f"training diverged: {int(seen['worst_run'])} consecutive non-finite steps by epoch {epoch}, "
        f"step {state.global_step}. Last good checkpoint intact: {last}. Lower train.lr or "
        f"raise train.warmup_steps, then rerun the same command to resume.")


def validate_epoch(state: TrainState, ep: EpochStats, cfg: Config, rt: Runtime, plan: Plan,
                   hooks: TrainHooks) -> dict[str, Any]:
    """The epoch record with validation recall (every eval.every epochs and the last), and under
    "diverged" why the epoch must not count (non-finite weights, embeddings or validation loss)."""
    record = ep.record(state)
    model = state.eval_model()  # the EMA weights when train.ema is on
    # One set of BatchNorm running statistics (rank 0's) for evaluation and the checkpoint.
    distributed.broadcast_buffers(state.model)
    if model is not state.model:
        distributed.broadcast_buffers(model)
    if rt.main:
        record["diverged"] = non_finite_state(model)  # None when every weight and buffer is finite
    if ep.epoch % cfg.eval.every == 0 or ep.epoch == cfg.train.epochs:
        # Every rank embeds a shard of the images; rank 0 scores the gathered set (= single process).
        emb, rows = sharded_embed_images(model, plan.data.val, cfg, rt.device, rt.amp_dtype)
        if rt.main and record["diverged"] is None:
            try:
                # val loss in batches of the global batch: the negatives the train loss has.
                val = evaluate_split(emb, rows, plan.data.val, plan.data.val_text, cfg.eval.ks,
                                     logit_scale=model.logit_scale.exp().item(), batch_size=plan.global_batch)
            except EvaluationError as e:  # non-finite validation embeddings
                record["diverged"] = str(e)
            else:
                if not math.isfinite(val.get("val_loss", 0.0)):
                    record["diverged"] = f"the validation loss is {val['val_loss']}"
                record.update(val_loss=val.get("val_loss"), val=val,
                              val_skipped_images=len(plan.data.val) - val["num_images"])
                record["mean_R@5"] = hooks.metric(val, 5)
    if rt.world > 1:
        record = distributed.all_gather_objects(record)[0]  # rank 0's: the same best/early decisions everywhere
    return record


def end_epoch(state: TrainState, record: dict[str, Any], runlog: RunLog, checkpointer: Checkpointer,
              health: HealthMonitor, cfg: Config, rt: Runtime, plan: Plan) -> None:
    """Log the epoch, keep best.pt / last.pt, or stop the run when the epoch diverged."""
    epoch = record["epoch"]
    reason = record.pop("diverged", None)
    if reason is not None:  # never logged as an epoch, never best, nothing overwritten
        last = checkpointer.last_good(epoch, state.start_epoch, none="no checkpoint was written")
        runlog.warnings([{"type": "warning", "kind": "diverged", "epoch": epoch, "step": state.global_step,
                          "message": f"training diverged in epoch {epoch}: {reason}"}])
        raise TrainingError(f"training diverged in epoch {epoch}: {reason}. Last good checkpoint intact: "
                            f"{last}. Lower train.lr or raise train.warmup_steps, then rerun with another --out "
                            "(or --no-resume)")
    runlog.record(record)
    if rt.main:
        runlog.warnings(health.epoch(epoch, state.global_step, runlog.epoch_done()))
    state.epoch = epoch
    is_best = "mean_R@5" in record and record["mean_R@5"] > state.best_metric
    if is_best:
        state.best_metric, state.best_epoch = record["mean_R@5"], epoch
    checkpointer.save(state.state_dict(cfg, plan.data) if rt.main else {}, is_best)
    runlog.plot_curves()
    msg = f"epoch {epoch}: train loss {record['train_loss']:.4f}"
    if "val" in record:
        v = record["val"]
        msg += (f", val loss {record['val_loss']:.4f}, i2t R@1/5/10 "
                + "/".join(f"{x:.1f}" for x in v["image_to_text"].values())
                + ", t2i R@1/5/10 " + "/".join(f"{x:.1f}" for x in v["text_to_image"].values()))
    log.info(msg)


def finish(state: TrainState, cfg: Config, data_root: str | Path, run: RunFiles, rt: Runtime, plan: Plan,
           t_start: float) -> dict:
    """summary.json (rank 0) and the summary dict every process returns."""
    data = plan.data
    summary = {
        "run_dir": str(run.root), "data_root": str(data_root), "epochs": cfg.train.epochs,
        "steps": state.global_step, "best_epoch": state.best_epoch, "best_mean_R@5": state.best_metric,
        "train_seconds": state.train_seconds(), "wall_seconds_this_invocation": time.time() - t_start,
        "hardware": hardware_info(rt.device), "precision": rt.precision.to_dict(), "parameters": count_parameters(state.model),
        "dataset": {"train_images": len(data.train), "train_captions": len(data.train.captions),
                    "val_images": len(data.val), "val_captions": len(data.val.captions),
                    "source": data.train.name, "val_source": data.val.name},
        "text": data.text_info, **state.totals,
        "health_warnings": [w["kind"] for w in read_records(run.metrics, "warning")],
        "distributed": {"processes": rt.world, "backend": rt.ctx.backend, "batch_per_process": cfg.train.batch_size,
                        "global_batch": plan.global_batch, "grad_accum_steps": plan.accum,
                        "images_per_step": plan.global_batch * plan.accum,
                        "sync_batchnorm": cfg.train.sync_batchnorm, "embed_chunk": cfg.train.embed_chunk},
    }
    if rt.main:
        epochs = read_records(run.metrics, "epoch")
        if epochs and "val" in epochs[-1]:
            summary["final_val"] = epochs[-1]["val"]
        run.summary.write_text(json.dumps(summary, indent=2) + "\n")
    distributed.barrier()  # every process returns once rank 0 has written everything
    return summary
