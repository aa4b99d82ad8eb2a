"""The contrastive loss of a batch larger than memory: the image tower runs in chunks, twice.

Gradient caching. The captions are cached constants, so only the image side holds activations, and
the symmetric InfoNCE of B images needs just their embeddings [B, D] (a few MB), not their graphs.
With chunks of N images:

  1. embed every chunk without a graph                      -> image_emb [B, D] (no activations kept)
  2. the full-batch loss L on image_emb (a leaf), and its gradients G = dL/d image_emb [B, D] and
     dL/d logit_scale (one autograd call; under DDP its all-gather back-propagates across ranks)
  3. for each chunk c: embed it again WITH a graph, back-propagate sum(emb_c * G_c) -> its share of
     the parameter gradient (the logit scale, returned by the last replay's forward, joins its backward)

By the chain rule the sum of step 3 over chunks is dL/dtheta, the gradient of the unchunked step,
provided each replay computes the same function as its first pass AND every image's embedding
depends on that image alone:

* Randomness (dropout, any stochastic layer): the CPU generator (and the device's CUDA generator) is
  recorded before each chunk's first pass and restored for its replay, then set to where the first
  pass left it, so the stream advances as if each chunk had run once.
* BatchNorm. In train mode BatchNorm normalises with the statistics of the images in the forward
  pass: chunks of N would give another loss than the batch of B (measured with ResNet18: gradient
  cosine 0.41 / 0.17 / 0.02 against the unchunked step for chunks of 16 / 8 / 4 of 32 images). So a
  chunked step runs EVERY BatchNorm of the tower (backbone and head, SyncBatchNorm too) in eval mode:
  normalised with its running statistics, which then stay as they are. The result is exactly the
  gradient of the unchunked step with BatchNorm in eval mode, for any chunk size. The training loop
  says so in one line at the start; `config.validate` refuses model.head_norm=batchnorm with chunking
  (a new head's running statistics would never be learned).
* Buffers: any other layer that updates a buffer in its forward sees each chunk once, not twice:
  every buffer of the model is copied after the first pass and copied back after the replays.

DDP. Both passes go through the wrapper: its one buffer broadcast per step happens at the step's
first (graph-free) forward, as in the unchunked step; replays but the last run under `no_sync`, so
the gradients are all-reduced once, in the last chunk's backward (which also carries the logit
scale's gradient, from the forward's output, so DDP with find_unused_parameters sees it used).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .. import distributed
from ..loss import clip_loss


def out_of_memory_advice(batch_size: int, embed_chunk: int, head_norm: str = "none") -> str:
    """What to try after running out of memory at this batch size: the train.embed_chunk setting
    (half the current chunk; 64, or half the batch when it is smaller, when off). Chunking runs every
    BatchNorm on its running statistics (module docstring), so no chunk size is too small for batch
    statistics; a head with BatchNorm cannot be chunked (config.validate), so it is not suggested."""
    if head_norm == "batchnorm":
        return (f"out of memory at train.batch_size={batch_size}: lower train.batch_size or data.image_size "
                "(train.embed_chunk would need model.head_norm=layernorm or none)")
    if 0 < embed_chunk <= 2 or batch_size <= 2:
        return (f"out of memory at train.batch_size={batch_size} even with train.embed_chunk={embed_chunk}: "
                "lower data.image_size or train.batch_size")
    chunk = embed_chunk // 2 if 0 < embed_chunk < batch_size else min(64, batch_size // 2)
    return (f"out of memory at train.batch_size={batch_size}: try --set train.embed_chunk={chunk} (the same loss "
            f"over all {batch_size} images with BatchNorm on its running statistics, activations for {chunk} at "
            "a time, one more forward pass), or lower train.batch_size")


def train_mode_batchnorms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The BatchNorm layers of `model` (any depth, SyncBatchNorm included) now in train mode."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generators a forward pass on `device` draws from (host-side copies, no device sync)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def chunked_clip_backward(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, chunk: int,
                          objective: Callable[[torch.Tensor], torch.Tensor],
                          amp_dtype: torch.dtype | None = None,
                          gather: bool = False,
                          loss_fn: Callable[..., dict[str, torch.Tensor]] = clip_loss,
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Back-propagate the full-batch `clip_loss` of images [B, 3, H, W] against texts [B, D] with the
    image tower run in chunks of `chunk` images (the module docstring gives the algorithm and when
    it is exact). Gradients accumulate into the parameters' .grad, as one `objective(loss).backward()`
    of the unchunked step, with every BatchNorm in eval mode, would. BatchNorm layers in train mode
    are put in eval mode for the call and back in train mode after it.

    model: the ImageTower or its DDP/compile wrapper (called as model(x, with_logit_scale=True));
    objective: maps the 0-d loss to what is back-propagated (the NaN guard's poison, 1/K for
    accumulation, the fp16 GradScaler's scale); amp_dtype: autocast for the forward passes (the loss
    stays fp32); gather: DDP's global negatives (`clip_loss`); loss_fn: `clip_loss` or a stand-in
    with its signature (tests).
    Returns the loss terms (detached), the image embeddings [B, D] (fp32, detached) and 1/tau (0-d, detached).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    tower = distributed.unwrap(model)
    with batchnorm_on_running_statistics(tower):  # each image's embedding no longer depends on its chunk
        return _chunked(model, tower, images, texts, chunk, objective, amp_dtype, gather, loss_fn)


@contextlib.contextmanager
def batchnorm_on_running_statistics(model: torch.nn.Module):
    """Inside the block every BatchNorm of `model` that was in train mode is in eval mode (running
    statistics, not updated); back in train mode after it. A chunked run's batches that fit in one
    chunk use it too (train_step), so every step of the run optimises the same loss."""
    batchnorms = train_mode_batchnorms(model)
    for m in batchnorms:
        m.eval()
    try:
        yield
    finally:
        for m in batchnorms:
            m.train()


def _chunked(model, tower, images, texts, chunk, objective, amp_dtype, gather, loss_fn):
    device = images.device
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    starts = range(0, images.shape[0], chunk)

    # 1. Embeddings without a graph, and the randomness each chunk drew.
    states, parts = [], []
    with torch.no_grad():
        for s in starts:
            states.append(_rng_state(device))
            with autocast:
                emb, scale = model(images[s:s + chunk], with_logit_scale=True)  # [n_c, D] fp32; 1/tau 0-d
            parts.append(emb)
    after_first = _rng_state(device)
    with torch.no_grad():
        buffers = [b.clone() for b in tower.buffers()]  # any buffer a forward updates: restored below

    # 2. The full-batch loss and its gradients w.r.t. the embeddings (and the logit scale).
    image_emb = torch.cat(parts).requires_grad_()  # [B, D], a leaf
    logit_scale = scale.detach().requires_grad_(tower.logit_scale.requires_grad)  # 0-d leaf
    terms = loss_fn(image_emb, texts, logit_scale, gather=gather)
    wrt = [image_emb, logit_scale] if logit_scale.requires_grad else [image_emb]
    # Parameters the loss reads directly (SigLIP's logit bias): their gradient joins the last replay.
    loss_params = [p for p in (getattr(tower, "logit_bias", None),) if p is not None and p.requires_grad]
    grads = torch.autograd.grad(objective(terms["loss"]), wrt + loss_params, allow_unused=bool(loss_params))
    grads, param_grads = grads[:len(wrt)], grads[len(wrt):]
    emb_grad = grads[0]  # [B, D]

    # 3. Replays with a graph, one chunk's activations at a time; DDP all-reduces in the last one.
    for j, s in enumerate(starts):
        last = j == len(starts) - 1
        _set_rng_state(device, states[j])
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast:
                emb, scale = model(images[s:s + chunk], with_logit_scale=True)  # the same values as in pass 1
            surrogate = (emb * emb_grad[s:s + chunk]).sum()  # d surrogate / d theta = G_c . d emb_c / d theta
            if last and len(grads) > 1:
                surrogate = surrogate + scale * grads[1]  # d/d log-scale via the forward's exp
            if last:
                for p, g in zip(loss_params, param_grads):
                    if g is not None:
                        surrogate = surrogate + (p * g).sum()
            surrogate.backward()
    with torch.no_grad():
        for b, saved in zip(tower.buffers(), buffers):
            b.copy_(saved)
    _set_rng_state(device, after_first)
    return {k: v.detach() for k, v in terms.items()}, image_emb.detach(), logit_scale.detach()
