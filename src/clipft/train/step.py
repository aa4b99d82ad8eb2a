"""The training step: one optimiser update over K micro-batches, written out flat, and the device-side
sums the loop reads every train.log_every steps (`StepStats`). No host synchronisation inside a step.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging

import torch

from .. import distributed
from .chunked import batchnorm_on_running_statistics, chunked_clip_backward
from .health import pairwise_cosine
from ..loss import clip_loss

log = logging.getLogger(__name__)


def train_step(model: torch.nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, grad_clip: float,
               gather: bool = False, channels_last: bool = False,
               transform: torch.nn.Module | None = None, loss_fn=clip_loss,
               embed_chunk: int = 0) -> dict[str, torch.Tensor]:
    """One optimisation step over K micro-batches [(images [B, 3, H, W], texts [B, D] cached caption
    embeddings), ...] (K = 1 without gradient accumulation); tensors are moved to the model's device here.
    `model` is the ImageTower or its DDP wrapper; gather=True (DDP): the loss uses every process's
    batch as negatives (`clip_loss`), and DDP averages the gradients on the last micro-batch.
    transform: for uint8 batches (prepared cache or JPEG workers), the on-device resize/crop/flip/normalise.
    embed_chunk: 0 = each micro-batch in one forward pass; N > 0 = a chunked run: a micro-batch of B > N
    images has its loss over all B computed with the tower run on N at a time, twice
    (`chunked.chunked_clip_backward`: activations for N images, not B), and every step (B <= N too)
    runs every BatchNorm on its running statistics (eval mode; per-chunk statistics would be another
    loss): the gradient equals the unchunked one with BatchNorm in eval mode. The loop passes 0 when
    train.embed_chunk >= train.batch_size (no chunking: BatchNorm as configured).
    loss_fn: `clip_loss` (a seam: tests poison the loss through it).

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

    def objective(loss: torch.Tensor) -> torch.Tensor:
        """What a micro-batch back-propagates. poison: 1 for a finite loss, NaN otherwise (NaN x gradient
        is NaN even where the gradient is 0, so every parameter the loss reaches reports the failure:
        the NaN guard in the docstring). / k: the accumulated gradient is the mean over micro-batches
        (each one's loss only has its own batch as negatives: accumulation enlarges the gradient's
        batch, not the softmax)."""
        poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
        return scaler.scale(loss * poison / k)

    for i, (images, texts, *extras) in enumerate(micro_batches):
        # extras: an optional dict of keyword arguments for the loss (a recipe's image ids, step: objectives.Recipe)
        loss_of = functools.partial(loss_fn, **extras[0]) if extras else loss_fn
        images = images.to(device, non_blocking=True)
        if transform is not None:
            images = transform(images)  # uint8 [B, S, S, 3] -> normalised float [B, 3, H, W], on device
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        texts = texts.to(device, non_blocking=True)
        # Gradients accumulate locally; DDP all-reduces them only in the last micro-batch's backward.
        no_sync = model.no_sync() if i < k - 1 and hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync:
            if 0 < embed_chunk < images.shape[0]:  # N images' activations at a time (chunked.py: when exact)
                terms, image_emb, logit_scale = chunked_clip_backward(model, images, texts, embed_chunk, objective,
                                                                      amp_dtype, gather=gather, loss_fn=loss_of)
            else:
                # Forward under autocast (bf16/fp16 where supported, else fp32); the loss itself runs in fp32.
                # The logit scale comes out of the forward (DDP must see every parameter the loss uses).
                # A chunked run's batch of <= embed_chunk images: BatchNorm as in its chunked steps.
                bn = batchnorm_on_running_statistics(tower) if embed_chunk > 0 else contextlib.nullcontext()
                with bn, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    image_emb, logit_scale = model(images, with_logit_scale=True)  # [B, D] fp32; 1/tau 0-d
                terms = loss_of(image_emb, texts, logit_scale, gather=gather)
                objective(terms["loss"]).backward()
        for name, v in terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + v.detach() / k

    grad_norm, skipped = apply_update(model, optimizer, scaler, grad_clip, buffers, saved_buffers)
    scheduler.step()  # also after a skipped step: the schedule follows attempted steps
    tower.clamp_logit_scale_()  # keep 1/tau <= max_logit_scale (only moves if learnable)
    return {**terms_sum, "grad_norm": grad_norm.detach(), "logit_scale": logit_scale.detach(),
            "embed_cos": pairwise_cosine(image_emb), "skipped": skipped}


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler, grad_clip: float,
                 buffers: list[torch.Tensor], saved_buffers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The update half of `train_step`: unscale, clip, step unless a gradient is non-finite (decided
    on the device, see the NaN guard there), restore the buffers of a skipped step, zero the
    gradients. Returns (grad_norm, skipped), 0-d tensors on the device."""
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
    return grad_norm, skipped


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
