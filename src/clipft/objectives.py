"""Contrastive objectives beyond in-batch InfoNCE, made cheap by the frozen, cached text tower.

Every training caption embedding is a fixed matrix (the caption cache), so the image->text softmax
can run over more captions than the batch holds at no text-tower cost, and image embeddings of
earlier steps stay valid negatives for the captions for a while (cross-batch memory). The maths is
one pure function, `recipe_loss`; `Recipe` holds the state around it (the caption bank, the image
queue, the seeded bank sample) and is what `train_step` calls as its loss, with the micro-batch's
image ids as extras.

Positives are defined by IMAGE identity, never by text equality: caption m is a positive for image
b iff the caption cache says caption m belongs to image b (`cap2img[m] == b`). Two images with the
identical caption text are still negatives of each other (as in the default in-batch loss).

Multi-positive InfoNCE (image->text). An image can have several positive columns: its in-batch
caption and any bank caption of the same image. The loss used is minus the log of the SUMMED
probability of its positives,
    l_b = logsumexp_j(s_bj) - logsumexp_{j in P(b)}(s_bj),
which with one positive is the usual cross-entropy, and which does not penalise the model for
spreading mass among several correct captions (the "mean over positives" variant, -mean_p log
softmax(s)_p, would push the positives against each other). Tested against a naive reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import distributed
from .config import parse_text_negatives  # noqa: F401 (re-exported)

SIGLIP_INIT_SCALE = 10.0  # SigLIP: t' = log 10, so 1/tau = exp(t') = 10 at the start
SIGLIP_INIT_BIAS = -10.0  # b = -10: every pair starts strongly "negative", as most pairs are


def recipe_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, *,
                image_ids: torch.Tensor | None = None, bank: torch.Tensor | None = None,
                bank_ids: torch.Tensor | None = None, queue: torch.Tensor | None = None,
                queue_ids: torch.Tensor | None = None, kind: str = "infonce",
                logit_bias: torch.Tensor | None = None, gather: bool = False) -> dict[str, torch.Tensor]:
    """The loss of one (micro-)batch with extra negatives.

    image_emb [B, D], text_emb [B, D]: L2-normalised, row-aligned (row b's caption is image b's);
    image_ids [B] (long): each row's image id in the training split (default arange(B): all distinct);
    bank [N, D] + bank_ids [N]: extra captions and the image each belongs to (image->text columns);
    queue [Q, D] + queue_ids [Q]: earlier image embeddings (detached) and their ids, extra columns of
    the text->image side; id -1 marks an empty slot (ignored). A queue entry of the caption's own
    image is neither a negative nor a positive (a stale embedding of the same image).
    kind: "infonce" (symmetric, multi-positive as in the module docstring) or "siglip" (a sigmoid
    loss over every (image, caption) pair, label +1 for positives, -1 otherwise, summed over the
    captions and averaged over the images, as in the SigLIP paper; logit_bias is its b).
    gather=True under DDP: the batch is every rank's rows (global negatives), computed like
    `loss._global_clip_loss`: this rank owns its rows, and back-propagating `loss` on every rank then
    averaging the gradients (DDP) gives exactly the gradient of the single-process loss on the
    concatenated batch. The bank and the queue are identical on every rank (not gathered).

    Returns {"loss", "loss_i2t", "loss_t2i"} for infonce, {"loss"} for siglip; "loss" has the value
    of the global loss (identical on every rank) and the gradient of this rank's share.
    Cost: logits [B_r, B_tot + N] (image->text) and [B_r, B_tot + Q] (text->image), i.e. B x (N + B) x D
    multiply-adds more per step than in-batch InfoNCE's B x B x D.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image/text embeddings must match: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    b_r, dev = image_emb.shape[0], image_emb.device
    ids = image_ids.to(dev) if image_ids is not None else torch.arange(b_r, device=dev)
    ft = torch.promote_types(image_emb.dtype, torch.float32)  # fp32 (fp64 stays fp64: the tests' references)
    img, txt = image_emb.to(ft), text_emb.to(ft)  # [B_r, D]
    if gather and distributed.is_distributed():
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [s[0] for s in distributed.all_gather_ints([b_r])]
        if image_ids is None:  # distinct ids across ranks too
            ids = ids + sum(sizes[:rank])
        all_img = distributed.all_gather_with_grad(img, sizes)  # [B_tot, D], gradient to my rows
        with torch.no_grad():
            all_txt = distributed.all_gather_cat(txt)  # [B_tot, D]
            all_ids = distributed.all_gather_cat(ids)  # [B_tot]
    else:
        world, all_img, all_txt, all_ids = 1, img, txt, ids
    b_tot = all_ids.shape[0]

    # image -> text columns: the global batch's captions, then the bank.
    cols, col_ids = all_txt, all_ids
    if bank is not None and bank.shape[0] > 0:
        cols = torch.cat([cols, bank.to(ft)])  # [B_tot + N, D]
        col_ids = torch.cat([col_ids, bank_ids.to(dev)])
    pos = ids[:, None] == col_ids[None, :]  # [B_r, B_tot + N] positives of my images

    if kind == "siglip":
        bias = logit_bias.to(ft) if logit_bias is not None else torch.zeros((), device=dev)
        logits = logit_scale * img @ cols.T + bias  # [B_r, B_tot + N]
        labels = pos.float() * 2 - 1  # +1 / -1
        total = -F.logsigmoid(labels * logits).sum()  # this rank's images, all their pairs
        sums = torch.stack([total.detach()])
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        value = sums[0] / b_tot
        objective = world * total / b_tot
        return {"loss": objective + (value - objective).detach()}

    logits = logit_scale * img @ cols.T  # [B_r, B_tot + N]
    sum_i2t = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos, -math.inf), 1)).sum()

    # text -> image columns: the global batch's images (with gradient), then the queue (constants).
    icols, icol_ids, excluded = all_img, all_ids, None
    if queue is not None and queue.shape[0] > 0:
        q_ids = queue_ids.to(dev)
        icols = torch.cat([all_img, queue.to(ft)])  # [B_tot + Q, D]
        icol_ids = torch.cat([all_ids, torch.full_like(q_ids, -2)])  # queue columns are never positives
        # Excluded: empty slots, and the caption's own image seen at an earlier step.
        excluded = torch.cat([torch.zeros(b_r, b_tot, dtype=torch.bool, device=dev),
                              (q_ids[None, :] < 0) | (q_ids[None, :] == ids[:, None])], 1)
    tlogits = logit_scale * txt @ icols.T  # [B_r, B_tot + Q]
    if excluded is not None:
        tlogits = tlogits.masked_fill(excluded, -math.inf)
    tpos = ids[:, None] == icol_ids[None, :]
    sum_t2i = (torch.logsumexp(tlogits, 1) - torch.logsumexp(tlogits.masked_fill(~tpos, -math.inf), 1)).sum()

    sums = torch.stack([sum_i2t.detach(), sum_t2i.detach()])
    if world > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    loss_i2t, loss_t2i = sums[0] / b_tot, sums[1] / b_tot
    objective = world * 0.5 * (sum_i2t + sum_t2i) / b_tot
    loss = objective + (0.5 * (loss_i2t + loss_t2i) - objective).detach()
    return {"loss": loss, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


def bank_generator(seed: int, epoch: int, step: int, micro: int) -> torch.Generator:
    """The CPU generator of one micro-batch's bank sample: a function of (seed, epoch, step, micro)
    alone, so every rank draws the same sample and a resumed run draws what it drew before."""
    key = (((seed * 1_000_003 + epoch) * 1_000_003 + step) * 64 + micro) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(key)


class ImageQueue:
    """The last `size` image embeddings (detached, fp32) and their image ids, a ring buffer on the
    training device, identical on every rank (it takes the gathered global batch). Empty slots have
    id -1. Pushes are host-side bookkeeping (the write position) plus one device copy."""

    def __init__(self, size: int, dim: int, device: torch.device):
        self.emb = torch.zeros(size, dim, device=device)  # [Q, D]
        self.ids = torch.full((size,), -1, dtype=torch.long, device=device)  # [Q]
        self.ptr = 0

    @torch.no_grad()
    def push(self, emb: torch.Tensor, ids: torch.Tensor) -> None:
        """Append emb [G, D] / ids [G] (oldest overwritten). A non-finite batch (a step the NaN guard
        skips) leaves the slots as they were (decided on the device, no host sync): it never poisons
        later losses. The write position advances either way (host bookkeeping, saved and restored)."""
        q = self.emb.shape[0]
        emb, ids = emb.detach().float()[-q:], ids.to(self.ids.device)[-q:]
        ok = torch.isfinite(emb).all()
        pos = (self.ptr + torch.arange(emb.shape[0], device=self.emb.device)) % q
        self.emb[pos] = torch.where(ok, emb, self.emb[pos])
        self.ids[pos] = torch.where(ok, ids, self.ids[pos])
        self.ptr = (self.ptr + emb.shape[0]) % q

    def state_dict(self) -> dict[str, Any]:
        return {"emb": self.emb.cpu(), "ids": self.ids.cpu(), "ptr": self.ptr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.emb.copy_(state["emb"])
        self.ids.copy_(state["ids"])
        self.ptr = int(state["ptr"])


class Recipe:
    """The loss `train_step` calls when a recipe lever is on: `recipe_loss` with the caption bank
    (train.text_negatives), the image queue (train.image_queue) and the loss kind (train.loss).

    bank [M, D]: every training caption embedding, on the device in `dtype` (the run's precision),
    read-only; cap2img [M]: the image each caption belongs to. The bank costs M x D x bytes(dtype)
    of device memory (COCO train2014: ~414,000 x 512 x 2 B = ~424 MB in bf16) on every rank.
    Called as loss_fn(image_emb, text_emb, logit_scale, gather=..., image_ids=, epoch=, step=, micro=)
    once per micro-batch (chunked or not); after computing the loss it pushes the (gathered)
    image embeddings into the queue.
    """

    def __init__(self, *, negatives: int = 0, queue_size: int = 0, kind: str = "infonce", seed: int = 0,
                 bank: torch.Tensor | None = None, cap2img: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 tower: torch.nn.Module | None = None, dim: int | None = None):
        self.negatives, self.kind, self.seed, self.tower = negatives, kind, seed, tower
        device = torch.device(device)
        self.bank = self.bank_ids = None
        if negatives != 0:
            if bank is None or cap2img is None:
                raise ValueError("train.text_negatives needs the caption bank and its caption->image index")
            self.bank = bank.to(device, dtype)  # [M, D]
            self.bank_ids = cap2img.to(device, torch.long)  # [M]
        dim = dim or (bank.shape[1] if bank is not None else None)
        self.queue = ImageQueue(queue_size, dim, device) if queue_size > 0 else None

    def bank_sample(self, epoch: int, step: int, micro: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This micro-batch's bank captions [N, D] and their image ids [N] (all of them for `all`, or
        N >= M). Drawn with replacement (a duplicate is one more copy of a negative or positive)."""
        if self.bank is None:
            return None, None
        m = self.bank.shape[0]
        if self.negatives < 0 or self.negatives >= m:
            return self.bank, self.bank_ids
        rows = torch.randint(m, (self.negatives,), generator=bank_generator(self.seed, epoch, step, micro))
        rows = rows.to(self.bank.device)
        return self.bank[rows], self.bank_ids[rows]

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                 gather: bool = False, *, image_ids: torch.Tensor | None = None, epoch: int = 0, step: int = 0,
                 micro: int = 0) -> dict[str, torch.Tensor]:
        if image_ids is None and (self.bank is not None or self.queue is not None):
            raise ValueError("the caption bank and the image queue need each row's image id (image_ids)")
        bank, bank_ids = self.bank_sample(epoch, step, micro)
        bias = getattr(self.tower, "logit_bias", None) if self.tower is not None else None
        terms = recipe_loss(image_emb, text_emb, logit_scale, image_ids=image_ids, bank=bank, bank_ids=bank_ids,
                            queue=None if self.queue is None else self.queue.emb,
                            queue_ids=None if self.queue is None else self.queue.ids,
                            kind=self.kind, logit_bias=bias, gather=gather)
        if self.queue is not None:  # after the loss: this batch is not its own negative
            self.queue.push(distributed.all_gather_cat(image_emb.detach()) if gather else image_emb.detach(),
                            distributed.all_gather_cat(image_ids.to(image_emb.device)) if gather else image_ids)
        return terms

    def chance(self, batch: int) -> float:
        """The loss of a model that scores every pair equally, for the health check's "at chance" test:
        the mean of ln(columns) over the two directions (a little above the true value when an image has
        several positives among them). 0 for SigLIP (no such reference: the test is off)."""
        if self.kind == "siglip":
            return 0.0
        n = 0 if self.bank is None else (self.bank.shape[0] if self.negatives < 0 else
                                         min(self.negatives, self.bank.shape[0]))
        q = 0 if self.queue is None else self.queue.emb.shape[0]
        return 0.5 * (math.log(max(1, batch + n)) + math.log(max(1, batch + q)))

    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue.state_dict()} if self.queue is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.queue is not None and state.get("queue") is not None:
            self.queue.load_state_dict(state["queue"])
