"""Checkpoints of a run (timm's CheckpointSaver, for one last and one best): RUN/last.pt after every
epoch (and mid-epoch every train.checkpoint_every, or on a preemption signal), RUN/best.pt when the
epoch is the best so far, both written atomically (temp file + rename), so an interrupt never leaves a
half-written checkpoint. A new last.pt is read back before it replaces the old one, which stays as
RUN/last.prev.pt: a resume whose last.pt does not load (truncated later by a full disk, a copy cut
short, a flipped byte that the stored checksum catches) falls back to it. Checkpoints are read by
`model.read_checkpoint` (weights_only=True: no code in a file runs) and hold only tensors and plain
data, with a checksum of their content (`checkpoint_file`).

A checkpoint holds the tower, optimizer, scheduler and scaler states, the RNG state of every rank,
the counters of the loop and the config; resuming from it is exact (see `TrainState` in train.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .rundir import RunFiles, read_records
from ..checkpoint_file import add_checksum
from ..model import ModelError, read_checkpoint
from ..runtime import atomic_torch_save, rng_state, set_rng_state
from .errors import TrainingError

log = logging.getLogger(__name__)

# Temp files of the trainer's own atomic writes (runtime.atomic_torch_save / atomic_write_text); other
# commands writing beside best.pt at the same time (evaluate, report) keep theirs.
_TEMP = re.compile(r"\.(last\.pt|best\.pt|last\.prev\.pt|summary\.json|config\.json)\.tmp\d+")


class CheckpointError(TrainingError):
    """No checkpoint of the run directory can be resumed from (one line saying what to do)."""


TRAINING_KEYS = ("epoch", "step")  # what `model.read_checkpoint` requires of a checkpoint to resume from


def _read(path: Path, mmap: bool = False) -> dict[str, Any]:
    return read_checkpoint(path, "cpu", require=TRAINING_KEYS, what="clipft training checkpoint", mmap=mmap)


def _readable(path: Path) -> None:
    """A freshly written checkpoint reads back, memory-mapped, and matches its checksum."""
    try:
        _read(path, mmap=True)
    except ModelError as e:
        raise CheckpointError(f"the checkpoint just written does not read back ({e}); the previous one is kept") from None


class Checkpointer:
    """last.pt / best.pt of one run directory, for this process (`ctx`); rank 0 alone writes."""

    def __init__(self, run: RunFiles, ctx: distributed.DistContext):
        self.run, self.ctx = run, ctx
        self._resume: dict[str, Any] | None = None
        self.resumed_from: Path | None = None
        self.saved_at = time.time()  # the clock of train.checkpoint_every in minutes

    def find_last(self, resume: bool) -> bool:
        """Whether to resume (RUN/last.pt or RUN/last.prev.pt exists); every process must see the same."""
        has_last = resume and (self.run.last.is_file() or self.run.last_prev.is_file())
        if self.ctx.world_size > 1 and len(set(distributed.all_gather_objects(has_last))) > 1:
            raise distributed.DistributedError(f"{self.run.last} is visible to some processes and not to others: "
                                               "the run directory must be on a filesystem shared by all nodes")
        return has_last

    def open_resume(self, resume: bool) -> dict[str, Any] | None:
        """The checkpoint a rerun continues from (on the CPU), or None for a fresh start: RUN/last.pt,
        or RUN/last.prev.pt with a warning when last.pt is missing or does not load. CheckpointError
        (one line) when neither loads. Kept for `load_last`."""
        self._resume = None
        if not self.find_last(resume):
            return None
        problems = []
        for path in (self.run.last, self.run.last_prev):
            if not path.is_file():
                continue
            try:
                self._resume = _read(path)  # safe load, checksum verified
            except ModelError as e:
                problems.append(str(e))
                continue
            if problems and self.ctx.is_main:
                log.warning("%s; resuming from %s instead (saved after epoch %d, global step %d)", problems[0], path,
                            self._resume["epoch"], self._resume["step"])
            self.resumed_from = path
            return self._resume
        raise CheckpointError(f"{'; '.join(problems)}; nothing to resume from: rerun with --no-resume to start "
                              "over, or use another --out")

    def load_last(self, device: torch.device, seed: int) -> dict[str, Any]:
        """The checkpoint `open_resume` found (RUN/last.pt unless it was damaged), with this process's
        RNG stream restored from it (the same number of processes: `resume.check_world_size`)."""
        ckpt = self._resume or self.open_resume(True)
        self._resume = None  # not held for the whole run
        if ckpt is None:
            raise CheckpointError(f"{self.run.last}: no checkpoint to resume from")
        rngs = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        if len(rngs) != self.ctx.world_size:  # `resume.check_world_size` refused it already, with the hint
            raise CheckpointError(f"{self.resumed_from or self.run.last} was written by {len(rngs)} process(es), "
                                  f"this run has {self.ctx.world_size}: resume with as many processes")
        set_rng_state(rngs[self.ctx.rank])  # each rank continues its own RNG stream
        return ckpt

    def reconcile_best(self, ckpt: dict[str, Any]) -> None:
        """After a resume: make RUN/best.pt hold the epoch the run records as best (`ckpt["best_epoch"]`,
        what summary.json will name). A kill between writing last.pt and best.pt at the end of an epoch
        leaves last.pt naming that epoch as best and best.pt an older one: best.pt is then rewritten
        from the resumed checkpoint, which is that epoch's state (rank 0)."""
        best_epoch = ckpt.get("best_epoch", -1)
        if not self.ctx.is_main or not isinstance(best_epoch, int) or best_epoch < 0:
            return
        held = None
        if self.run.best.is_file():
            try:
                held = _read(self.run.best, mmap=True).get("epoch")  # checksum verified
            except ModelError as e:
                log.warning("%s", e)
        if held == best_epoch:
            return
        what = f"holds epoch {held}" if held is not None else "is missing or damaged"
        if best_epoch == ckpt["epoch"] and not ckpt.get("epoch_steps"):
            log.warning("%s %s, but the run's best epoch is %d (a write was interrupted): rewriting it from %s",
                        self.run.best, what, best_epoch, self.resumed_from)
            atomic_torch_save(ckpt, self.run.best)
        else:
            log.warning("%s %s, but the run's best epoch is %d, which no checkpoint holds any more",
                        self.run.best, what, best_epoch)

    def start_over(self) -> None:
        """--no-resume into a directory holding an earlier run: its checkpoints go (rank 0), so none
        of them can be mistaken for this run's, by a later resume or by evaluate."""
        old = [p for p in (self.run.last, self.run.last_prev, self.run.best) if p.is_file()]
        if self.ctx.is_main and old:
            log.info("starting over in %s: removing the earlier run's %s", self.run.root,
                     ", ".join(p.name for p in old))
            for p in old:
                p.unlink(missing_ok=True)

    def remove_stale_temp(self) -> None:
        """Temp files a SIGKILL left mid-write (rank 0, holding the run lock: no other writer exists)."""
        if not self.ctx.is_main or not self.run.root.is_dir():
            return
        for p in self.run.root.iterdir():
            if _TEMP.fullmatch(p.name) and p.is_file():
                log.info("removing %s (left by an interrupted write)", p)
                p.unlink(missing_ok=True)

    def due(self, step: int, every: tuple[str, float]) -> bool:
        """Whether train.checkpoint_every (`config.checkpoint_interval`) asks for a mid-epoch
        checkpoint after global step `step`: every N steps, or N minutes after the last save. A host
        clock read, no device sync; under torchrun the ranks agree on it (`preempt.at_step_boundary`)."""
        kind, n = every
        if kind == "steps":
            return step % int(n) == 0
        return kind == "minutes" and time.time() - self.saved_at >= 60 * n

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
        self.saved_at = time.time()
        if not self.ctx.is_main:
            return
        # Plain data and tensors only (read with weights_only=True), plus the checksum of it all.
        ckpt = add_checksum({**state, "rng": rngs[0], "rng_per_rank": rngs, "world_size": self.ctx.world_size})
        # Read back before it replaces last.pt; the old one stays as last.prev.pt (the resume fallback).
        atomic_torch_save(ckpt, self.run.last, verify=_readable, previous=self.run.last_prev)
        if is_best:
            atomic_torch_save(ckpt, self.run.best)

    def last_good(self, epoch: int, start_epoch: int, none: str) -> str:
        """The intact checkpoint when `epoch` went wrong, for the message (`none` if there is none)."""
        if not self.run.last.exists():
            return none
        return f"{self.run.last} (epoch {start_epoch if epoch == start_epoch + 1 else epoch - 1})"
