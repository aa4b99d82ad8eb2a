"""The optimizer and the learning-rate schedule of a training run: AdamW with parameter groups
(no weight decay on norms and biases, the backbone's own learning rate), cosine decay after a linear
warm-up, and the warm-up again when frozen backbone stages are unfrozen (train.unfreeze_epoch)."""

from __future__ import annotations

import math

import torch

from ..config import Config
from ..model import parameter_parts


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup from 0 to 1 over warmup_steps, then cosine to min_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    backbone_lr_ratio: float = 1.0, split_backbone: bool = False) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad now; no weight decay on biases, norm weights and
    the logit scale (all 1-d or 0-d).

    backbone_lr_ratio == 1: two groups (decay, no_decay). Otherwise groups per part, named
    head/decay, head/no_decay, logit_scale, backbone/decay, backbone/no_decay (empty ones dropped),
    the backbone's at lr * backbone_lr_ratio. Parameters frozen only for a while (see
    train.freeze_backbone_epochs) must require grad when this is called: AdamW then skips them
    while their .grad is None (no update, no weight decay). split_backbone: the groups per part even
    at ratio 1 (a backbone unfrozen later gets its own warm-up: `build_scheduler`).
    """
    if (backbone_lr_ratio == 1.0 and not split_backbone) or not hasattr(model, "backbone"):
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


def unfreeze_warmup(step: int, unfreeze_step: int, warmup_steps: int) -> float:
    """LR multiplier of a backbone frozen until global step `unfreeze_step` (0-based): linear from
    1/warmup_steps to 1 over the warmup_steps steps from there (1 before: frozen, it gets no update).
    Its Adam state is empty when it joins, so without this its first update would move every
    pretrained weight by about lr x sign(gradient). warmup_steps=0: no warm-up (as for the run)."""
    if warmup_steps <= 0 or step < unfreeze_step:
        return 1.0
    return min(1.0, (step - unfreeze_step + 1) / warmup_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up + cosine (`cosine_with_warmup`) for every group; with train.freeze_backbone_epochs
    the backbone's groups (named backbone/...) warm up again from the step they are unfrozen at
    (`unfreeze_warmup`, over train.warmup_steps steps). Every epoch but a short last one has
    steps_per_epoch steps, so that step is freeze_backbone_epochs x steps_per_epoch."""
    t = cfg.train
    total_steps = steps_per_epoch * t.epochs
    unfreeze_step = t.freeze_backbone_epochs * steps_per_epoch

    def base(s: int) -> float:
        return cosine_with_warmup(s, total_steps, t.warmup_steps, t.min_lr_ratio)

    def backbone(s: int) -> float:
        return base(s) * unfreeze_warmup(s, unfreeze_step, t.warmup_steps)
    lambdas = [backbone if t.freeze_backbone_epochs > 0 and str(g.get("name", "")).startswith("backbone/") else base
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


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
