"""Preemption: SIGTERM (what SLURM and Kubernetes send before killing a job) and SIGUSR1 (SLURM's
`--signal=B:USR1@SECONDS` warning) stop `clipft train` at the next step boundary with a mid-epoch
checkpoint, so a requeued rerun of the same command loses no finished step. train.checkpoint_every
writes the same mid-epoch checkpoint on a clock (or a step count), which bounds what a SIGKILL, an
out-of-memory kill or a node failure can lose.

The handler only sets a flag: the epoch loop reads it between steps (a Python bool, no device sync),
saves last.pt through the Checkpointer and raises `Preempted`; the CLI prints one line and exits with
128 + the signal number (143 for SIGTERM, 138 for SIGUSR1), the shell convention schedulers requeue on.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Iterator

from .. import distributed
from ..runtime import set_rng_state

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after saving a mid-epoch checkpoint."""

    def __init__(self, signum: int, epoch: int, step: int):
        super().__init__(f"saved at epoch {epoch} step {step}; rerun the same command to resume")
        self.signum, self.epoch, self.step = signum, epoch, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def line(self) -> str:  # what the CLI prints (not an error: the run is intact)
        return str(self)


class StopFlag:
    """Set by SIGTERM / SIGUSR1 while installed (`with StopFlag() as flag`); `flag.signum` is the
    first signal received (None until one arrives)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopFlag":
        # Handlers can be installed from the main thread only (a trainer called from a thread runs without).
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def resume_loader(state: Any, make_loader: Callable[..., Any], dataset: Any, cfg: Any, epoch: int,
                  device: Any, accum: int) -> Any:
    """The epoch's loader (`make_loader`, train.make_train_loader); after a mid-epoch checkpoint
    (state.epoch_steps > 0) past the batches it trained on, with the RNG where the checkpoint left it:
    put back after the loader's iterator drew its seed, so the next step draws what it drew then."""
    if not state.epoch_steps:
        return make_loader(dataset, cfg, epoch, device)
    loader = iter(make_loader(dataset, cfg, epoch, device, skip_batches=state.epoch_steps * accum))
    if state.resume_rng is not None:
        set_rng_state(state.resume_rng)
        state.resume_rng = None
    return loader


def between_steps(groups: Iterator, done: int, check: Callable[[int], None]) -> Iterator:
    """`groups` (one per optimizer step), calling check(steps done in the epoch) after each step: when
    the loop asks for the next group, so after the step's logging and before the loader reads on."""
    for group in groups:
        yield group
        done += 1
        check(done)


def at_step_boundary(state: Any, epoch: int, done: int, loop: Any, groups: Iterator) -> None:
    """After a step (`done` steps of `epoch` finished): a mid-epoch last.pt when train.checkpoint_every
    is due (`Checkpointer.due`), or after SIGTERM / SIGUSR1, and then `Preempted`. Both are host
    values (a Python bool, the clock: no device sync); under torchrun the ranks agree on them in one
    small all-gather first, since every rank must save and stop at the same step."""
    signum, due = loop.stop.signum or 0, loop.checkpointer.due(state.global_step, loop.checkpoint_every)
    if loop.rt.world > 1:
        votes = distributed.all_gather_ints([signum, int(due)])
        signum, due = max(v[0] for v in votes), any(v[1] for v in votes)
    if not signum and not due:
        return
    if signum:
        groups.close()  # the loader's workers first: they must not outlive the run
    state.epoch_steps = done  # through the Checkpointer: atomic, read back, last.prev.pt kept
    loop.checkpointer.save(state.state_dict(loop.cfg, loop.plan.data) if loop.rt.main else {}, False)
    state.epoch_steps = 0  # the epoch goes on (the epoch-end checkpoint is a whole-epoch one)
    if signum:
        distributed.barrier()  # every process exits after rank 0's checkpoint is on disk
        raise Preempted(signum, epoch, done)
