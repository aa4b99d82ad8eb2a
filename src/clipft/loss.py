"""Symmetric InfoNCE (the CLIP loss) with named terms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean of image->text and text->image cross-entropies over in-batch negatives.

    image_emb [B, D] and text_emb [B, D] are L2-normalised and row-aligned (row b of each is a
    positive pair); logit_scale is 1/tau (a scalar tensor, already exponentiated).
    Returns {"loss", "loss_i2t", "loss_t2i"}: named terms so logging never guesses.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image/text embeddings must match: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    logits = logit_scale * image_emb.float() @ text_emb.float().T  # [B, B]; fp32 for a stable softmax
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss_i2t = F.cross_entropy(logits, labels)
    loss_t2i = F.cross_entropy(logits.T, labels)
    return {"loss": 0.5 * (loss_i2t + loss_t2i), "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


def chance_loss(batch_size: int) -> float:
    """Loss of a model that scores every pair equally: ln(B). Learning means going below it."""
    return math.log(max(1, batch_size))
