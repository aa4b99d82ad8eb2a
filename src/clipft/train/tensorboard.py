"""Optional TensorBoard mirror of RUN/metrics.jsonl (`train.tensorboard=true`, rank 0 only).

metrics.jsonl stays the source of truth: every record the training loop writes there is also
written, unchanged in value, as TensorBoard scalars under RUN/tensorboard/, so `tensorboard --logdir
RUN` shows the run live. Tags are the record's type and its flattened keys, at the record's global
step: a step record's loss is `step/loss`, an epoch record's validation R@5 image->text is
`epoch/val/image_to_text/R@5`; a health warning is a text entry `warning/<kind>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from ..config import ConfigError

TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = ("type", "step", "epoch")  # the record's position, not a measurement


def _scalars(rec: dict[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite-or-not number of a record, nested dicts flattened with '/'."""
    for key, value in rec.items():
        if key in _NOT_SCALARS and prefix.count("/") == 0:
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}/{key}", float(value)


class TensorBoardMirror:
    """Writes metrics.jsonl records as TensorBoard events (one SummaryWriter on RUN/tensorboard/)."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard=true needs the tensorboard package: "
                              "pip install 'clipft[tensorboard]'") from None
        # purge_step: a resumed run drops events at or after the checkpoint's step, as it drops
        # those metrics.jsonl records, so the curves show each step once.
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step, flush_secs=10)

    def write(self, rec: dict[str, Any]) -> None:
        """Mirror one metrics.jsonl record (a step, epoch or warning record)."""
        kind, step = rec.get("type", "record"), int(rec.get("step") or 0)
        if kind == "warning":
            self.writer.add_text(f"warning/{rec.get('kind')}", str(rec.get("message")), step)
        else:
            for tag, value in _scalars(rec, kind):
                self.writer.add_scalar(tag, value, step)
        if kind != "step":
            self.writer.flush()  # epoch ends and warnings are visible at once

    def close(self) -> None:
        self.writer.close()


def open_mirror(enabled: bool, run_dir: str | Path, purge_step: int | None = None) -> TensorBoardMirror | None:
    """A mirror when `enabled` (train.tensorboard on rank 0), else None."""
    return TensorBoardMirror(run_dir, purge_step) if enabled else None


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar event under RUN/tensorboard/ (tests, notebooks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(run_dir) / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
