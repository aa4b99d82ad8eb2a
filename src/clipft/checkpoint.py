"""Checkpoints of a run (timm's CheckpointSaver, for one last and one best): RUN/last.pt after every
epoch, RUN/best.pt when the epoch is the best so far, both written atomically (temp file + rename), so
an interrupt never leaves a half-written checkpoint.

A checkpoint holds the tower, optimizer, scheduler and scaler states, the RNG state of every rank,
the counters of the loop and the config; resuming from it is exact (see `TrainState` in train.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from . import distributed
from .runfiles import RunFiles, read_records
from .runtime import atomic_torch_save, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)


class Checkpointer:
    """last.pt / best.pt of one run directory, for this process (`ctx`); rank 0 alone writes."""

    def __init__(self, run: RunFiles, ctx: distributed.DistContext):
        self.run, self.ctx = run, ctx

    def find_last(self, resume: bool) -> bool:
        """Whether to resume from RUN/last.pt; every process must see the same answer."""
        has_last = resume and self.run.last.is_file()
        if self.ctx.world_size > 1 and len(set(distributed.all_gather_objects(has_last))) > 1:
            raise distributed.DistributedError(f"{self.run.last} is visible to some processes and not to others: "
                                               "the run directory must be on a filesystem shared by all nodes")
        return has_last

    def load_last(self, device: torch.device, seed: int) -> dict[str, Any]:
        """RUN/last.pt, with this process's RNG stream restored from it.

        Each rank continues its own RNG stream; with another number of processes the data order and
        global batch change anyway, so rank 0's state (reseeded per rank) is the best there is."""
        ckpt = torch.load(self.run.last, map_location=device, weights_only=False)
        rngs = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank])
        else:
            log.warning("%s was written by %d process(es), this run has %d: the global batch and data order "
                        "change from here on", self.run.last, len(rngs), self.ctx.world_size)
            set_rng_state(rngs[0])
            seed_everything(seed + 1000 * ckpt["epoch"] + self.ctx.rank)
        return ckpt

    def truncate_logs(self, epoch: int, step: int | None = None) -> None:
        """Drop log records written after the checkpoint of `epoch` (a crash mid-epoch), so logs ==
        checkpoint; a fresh run (epoch 0) into an old directory starts fresh logs. `step`: a mid-epoch
        checkpoint at that global step also keeps the step records up to it."""
        if not self.ctx.is_main:
            return
        if epoch == 0 and step is None:
            self.run.metrics.unlink(missing_ok=True)
            return
        kept = [r for r in read_records(self.run.metrics) if r.get("epoch", 0) <= epoch
                or (step is not None and r.get("type") == "step" and r.get("step", 0) <= step)]
        self.run.metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def save(self, state: dict[str, Any], is_best: bool) -> None:
        """Write `state` (plus every rank's RNG stream, gathered here) to last.pt, and to best.pt."""
        rngs = distributed.all_gather_objects(rng_state())  # every rank's stream, for an exact resume
        if not self.ctx.is_main:
            return
        ckpt = {**state, "rng": rngs[0], "rng_per_rank": rngs, "world_size": self.ctx.world_size}
        atomic_torch_save(ckpt, self.run.last)
        if is_best:
            atomic_torch_save(ckpt, self.run.best)

    def last_good(self, epoch: int, start_epoch: int, none: str) -> str:
        """The intact checkpoint when `epoch` went wrong, for the message (`none` if there is none)."""
        if not self.run.last.exists():
            return none
        return f"{self.run.last} (epoch {start_epoch if epoch == start_epoch + 1 else epoch - 1})"
