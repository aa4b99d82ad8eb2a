"""Is the run healthy? Pure checks on logged numbers, and the monitor the training loop calls.

Four warnings, each in plain words with what to do:
  chance       the loss is still within 2% of chance, ln(batch size), after warmup: nothing learned
  collapse     a batch of image embeddings all point the same way (mean pairwise cosine > 0.95)
  logit_scale  a learnable 1/tau sits at its clamp (model.max_logit_scale)
  overfitting  validation recall fell for several evaluations in a row while train loss fell

The training loop writes each warning to metrics.jsonl as {"type": "warning", "kind", "epoch",
"step", "message"} and logs it; `clipft report` lists them.
"""

from __future__ import annotations

from typing import Any

import torch

CHANCE_TOLERANCE = 0.02  # |loss - ln(B)| <= this * ln(B) after warmup = "at chance"; above that, "above chance"
COLLAPSE_COSINE = 0.95  # mean pairwise cosine of a batch of image embeddings above this = collapse
PINNED_RTOL = 1e-3  # logit scale within this relative distance of its clamp = pinned
OVERFIT_EPOCHS = 3  # consecutive falls of validation recall (with train loss falling) = overfitting


def pairwise_cosine(emb: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs i != j of the rows of emb [B, D] (rows are
    normalised here), as a 0-d tensor on emb's device (no host sync). 1.0 = every embedding
    identical; ~0 = spread out. NaN for B < 2.

    Computed from the sum vector in O(B*D): sum_{i!=j} <e_i, e_j> = |sum_i e_i|^2 - sum_i |e_i|^2.
    """
    b = emb.shape[0]
    if b < 2:
        return torch.full((), float("nan"), device=emb.device)
    e = torch.nn.functional.normalize(emb.detach().float(), dim=-1)  # [B, D]
    total = e.sum(0)  # [D]
    off_diag = total.dot(total) - (e * e).sum()
    return off_diag / (b * (b - 1))


def chance_warning(loss: float, chance: float, step: int, warmup_steps: int,
                   tol: float = CHANCE_TOLERANCE) -> str | None:
    """Warn if `loss` (a recent mean) is still at chance after warmup (within tol of ln B), or
    clearly above it: a model that guesses scores ln B, so a loss above it is worse than guessing
    (the run is diverging), which is a different message from "not learning yet"."""
    if step < max(1, warmup_steps) or not chance > 0:
        return None
    if loss > (1.0 + tol) * chance:
        return (f"loss {loss:.3f} is above chance (ln B = {chance:.3f}) after {step} steps (warmup {warmup_steps}): "
                "worse than guessing, so the image tower is not learning, and the run is diverging if the loss "
                "keeps rising. Lower train.lr or raise train.warmup_steps")
    if loss >= (1.0 - tol) * chance:
        return (f"loss {loss:.3f} is at chance: still within {tol:.0%} of chance (ln B = {chance:.3f}) after {step} steps "
                f"(warmup {warmup_steps}): the image tower is not learning. Check that captions belong to their "
                "images (`clipft validate`), and try a different train.lr or more train.warmup_steps")
    return None


def collapse_warning(mean_cosine: float, threshold: float = COLLAPSE_COSINE) -> str | None:
    """Warn if the image embeddings of a batch have (nearly) collapsed onto one direction."""
    if mean_cosine == mean_cosine and mean_cosine > threshold:  # NaN-safe
        return (f"embedding collapse: mean pairwise cosine of a batch of image embeddings is {mean_cosine:.3f} "
                f"(> {threshold}): the tower maps different images to nearly the same point. Lower train.lr, "
                "check the images load (not all blank), or raise train.warmup_steps")
    return None


def logit_scale_warning(logit_scale: float, max_logit_scale: float, learnable: bool,
                        rtol: float = PINNED_RTOL) -> str | None:
    """Warn if a learnable logit scale (1/tau) is pinned at its clamp."""
    if learnable and logit_scale >= max_logit_scale * (1.0 - rtol):
        return (f"logit scale 1/tau = {logit_scale:.2f} is pinned at its clamp (model.max_logit_scale = "
                f"{max_logit_scale:g}): the temperature wants to go lower than allowed, often a sign of "
                "an easy or leaking objective; consider a fixed model.temperature")
    return None


def overfitting_warning(epochs: list[dict[str, Any]], patience: int = OVERFIT_EPOCHS,
                        metric: str = "mean_R@5") -> str | None:
    """Warn if validation `metric` fell at each of the last `patience` evaluations while the train
    loss fell too. `epochs` are the epoch records of metrics.jsonl (those without the metric, i.e.
    not evaluated, are skipped)."""
    evaluated = [r for r in epochs if r.get(metric) is not None and r.get("train_loss") is not None]
    if patience < 1 or len(evaluated) < patience + 1:
        return None
    last = evaluated[-(patience + 1):]
    pairs = list(zip(last, last[1:]))
    if all(b[metric] < a[metric] for a, b in pairs) and all(b["train_loss"] < a["train_loss"] for a, b in pairs):
        rec = " -> ".join(f"{r[metric]:.1f}" for r in last)
        loss = " -> ".join(f"{r['train_loss']:.3f}" for r in last)
        best = max(evaluated, key=lambda r: r[metric])
        return (f"overfitting: validation {metric} fell for {patience} evaluations in a row ({rec}) while train "
                f"loss fell ({loss}); best.pt keeps epoch {best['epoch']}. Use fewer train.epochs, "
                "data.augment=true, or more data")
    return None


class HealthMonitor:
    """Runs the checks during training; each kind is raised at most once per epoch.

    `step(...)` and `epoch(...)` return new warning records (dicts ready for metrics.jsonl).
    """

    def __init__(self, warmup_steps: int, max_logit_scale: float, learnable_temperature: bool,
                 patience: int = OVERFIT_EPOCHS):
        self.warmup_steps = warmup_steps
        self.max_logit_scale = max_logit_scale
        self.learnable = learnable_temperature
        self.patience = patience
        self._raised: set[tuple[str, int]] = set()

    def _record(self, kind: str, message: str | None, epoch: int, step: int) -> list[dict]:
        if message is None or (kind, epoch) in self._raised:
            return []
        self._raised.add((kind, epoch))
        return [{"type": "warning", "kind": kind, "epoch": epoch, "step": step, "message": message}]

    def step(self, epoch: int, step: int, loss: float, chance: float, mean_cosine: float,
             logit_scale: float) -> list[dict]:
        """Checks at a logged step: loss (a mean over the logging window) against chance, collapse
        of the step's image embeddings (after warmup: a freshly initialised tower maps everything
        close together), and a pinned logit scale."""
        out = self._record("chance", chance_warning(loss, chance, step, self.warmup_steps), epoch, step)
        if step >= self.warmup_steps:
            out += self._record("collapse", collapse_warning(mean_cosine), epoch, step)
        out += self._record("logit_scale", logit_scale_warning(logit_scale, self.max_logit_scale, self.learnable),
                            epoch, step)
        return out

    def epoch(self, epoch: int, step: int, epoch_records: list[dict]) -> list[dict]:
        """Checks after an epoch's record (with validation metrics) was written."""
        return self._record("overfitting", overfitting_warning(epoch_records, self.patience), epoch, step)
