"""Symmetric InfoNCE (the CLIP loss) with named terms, single-process or with global negatives."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import distributed


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              gather: bool = False) -> dict[str, torch.Tensor]:
    """Mean of image->text and text->image cross-entropies over in-batch negatives.

    image_emb [B, D] and text_emb [B, D] are L2-normalised and row-aligned (row b of each is a
    positive pair); logit_scale is 1/tau (a scalar tensor, already exponentiated).
    Returns {"loss", "loss_i2t", "loss_t2i"}: named terms so logging never guesses.

    gather=True in a multi-process run (DDP): the negatives are the GLOBAL batch, every rank's rows
    (see `_global_clip_loss`); the values are then the loss of the concatenated batch, identical on
    every rank. Without a process group gather=True is the plain loss.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image/text embeddings must match: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    if gather and distributed.is_distributed():
        return _global_clip_loss(image_emb, text_emb, logit_scale)
    logits = logit_scale * image_emb.float() @ text_emb.float().T  # [B, B]; fp32 for a stable softmax
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss_i2t = F.cross_entropy(logits, labels)
    loss_t2i = F.cross_entropy(logits.T, labels)
    return {"loss": 0.5 * (loss_i2t + loss_t2i), "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


def _global_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
                      logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """clip_loss over the batch of all N ranks (B_r rows on rank r, B_tot = sum B_r), computed locally.

    Rank r owns its rows of both directions: its B_r images against all B_tot captions (i2t) and its
    B_r captions against all B_tot images (t2i), logits [B_r, B_tot] each, instead of the full
    [B_tot, B_tot] matrix on every rank. The global loss is L = (S_1 + ... + S_N) / (2 B_tot) with S_r
    the sum of rank r's cross-entropies (both directions).

    Gradient scaling. Images are gathered WITH gradient (`all_gather_with_grad`, whose backward sums
    over ranks), captions without (cached constants). Rank r back-propagates
        objective_r = N * S_r / (2 B_tot),
    so rank q's image gradient is sum_r d objective_r / d x_q = N * dL/dx_q, its parameter gradient N
    times its share of dL/dtheta, and DDP's AVERAGE over the N ranks gives exactly dL/dtheta, the
    gradient of the single-process loss on the concatenated batch; the same holds for logit_scale
    (its per-rank gradients N * dS_r/ds / (2 B_tot) average to dL/ds). With equal B_r, objective_r is
    simply rank r's mean loss.

    Values. The returned "loss" has the VALUE of the global L (one all-reduce of the two sums, so it
    is identical on every rank and a NaN anywhere is a NaN everywhere) and the GRADIENT of
    objective_r: loss = objective_r + (L - objective_r).detach(). "loss_i2t"/"loss_t2i" are the global
    means, detached.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [s[0] for s in distributed.all_gather_ints([image_emb.shape[0]])]
    b_tot, start = sum(sizes), sum(sizes[:rank])
    img = image_emb.float()  # [B_r, D]
    txt = text_emb.float()  # [B_r, D]
    all_img = distributed.all_gather_with_grad(img, sizes)  # [B_tot, D], gradient flows to my rows
    with torch.no_grad():
        all_txt = distributed.all_gather_cat(txt)  # [B_tot, D]
    labels = torch.arange(start, start + img.shape[0], device=img.device)  # my rows' positives
    sum_i2t = F.cross_entropy(logit_scale * img @ all_txt.T, labels, reduction="sum")  # [B_r, B_tot]
    sum_t2i = F.cross_entropy(logit_scale * txt @ all_img.T, labels, reduction="sum")  # [B_r, B_tot]
    sums = torch.stack([sum_i2t.detach(), sum_t2i.detach()])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    loss_i2t, loss_t2i = sums[0] / b_tot, sums[1] / b_tot
    objective = world * 0.5 * (sum_i2t + sum_t2i) / b_tot
    loss = objective + (0.5 * (loss_i2t + loss_t2i) - objective).detach()
    return {"loss": loss, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


def chance_loss(batch_size: int) -> float:
    """Loss of a model that scores every pair equally: ln(B). Learning means going below it."""
    return math.log(max(1, batch_size))
