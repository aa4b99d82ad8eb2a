"""An exponential moving average of the tower's weights (train.ema), updated after every optimizer step.

    ema_t = d_t * ema_{t-1} + (1 - d_t) * w_t,   d_t = min(train.ema, (1 + t) / (10 + t))

(t = updates so far: timm's / TensorFlow's warm-up of the decay, so a short run's average is not
dominated by the random initial weights). Floating-point parameters AND buffers (BatchNorm running
statistics) are averaged; integer buffers (num_batches_tracked) are copied. The average lives on
the training device in fp32 like the weights, one more copy of the tower (ResNet50 + head: ~100 MB).

Where it is used: validation and best-checkpoint selection evaluate the EMA weights; every checkpoint's
"model" entry holds them (so `clipft export`, `clipft evaluate` and `clipft.load` take the EMA weights)
and "train_model" the raw training weights; resume restores both, and the update count, exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model)  # same class and config: evaluate/export it like the tower
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One average step towards `model`'s weights (on the device, no host sync)."""
        d = self.current_decay()
        self.updates += 1
        mine, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        torch._foreach_lerp_([mine[k] for k in floats], [theirs[k].detach() for k in floats], 1.0 - d)
        for k, v in mine.items():
            if not v.is_floating_point():
                v.copy_(theirs[k])

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.module.load_state_dict(weights)
        self.updates = int(state["updates"])
