"""The run directory: what a training run writes, and how its records are read back.

Layout of a run directory (RUN):
  config.json       resolved config (also what a rerun into RUN resumes with)
  metrics.jsonl     one JSON record per logged step and per epoch: the source of truth
  epochs.csv        the epoch records, flat, for spreadsheets
  last.pt / best.pt atomic checkpoints (best by mean validation Recall@5 over both directions)
  last.prev.pt      the last.pt before the newest one (resumed from when last.pt does not load)
  loss_curves.png   loss and Recall@K per epoch
  summary.json      wall time, hardware, dataset sizes, best epoch, skipped images/steps

Readers (report, ablate, visualize) use this module only: none of them imports the trainer. The
trainer writes the logs through `RunLog`, the checkpoints through `checkpoint.Checkpointer`.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..config import Config, ConfigError, from_dict, load_config

log = logging.getLogger(__name__)


@dataclass
class RunFiles:
    """Paths inside a run directory."""
    root: Path
    config: Path = field(init=False)
    metrics: Path = field(init=False)
    epochs_csv: Path = field(init=False)
    last: Path = field(init=False)
    last_prev: Path = field(init=False)
    best: Path = field(init=False)
    summary: Path = field(init=False)
    curves: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.epochs_csv = self.root / "epochs.csv"
        self.last = self.root / "last.pt"
        self.last_prev = self.root / "last.prev.pt"
        self.best = self.root / "best.pt"
        self.summary = self.root / "summary.json"
        self.curves = self.root / "loss_curves.png"


def resolve_run_config(out_dir: str | Path, config_file: str | Path | None = None,
                       overrides: list[str] | None = None, base: Config | None = None,
                       resume: bool = True, explicit: bool = False) -> Config:
    """The config a run uses: a resumed run starts from its saved config.json (big_vision-style
    auto-resume), a new one from `base` (defaults when None); then the file, then the overrides.
    explicit=True (the user named --config): `base` and the file are used on resume too, and the
    trainer compares the result with the stored run (`resume.check_config`) instead of ignoring it."""
    saved = Path(out_dir) / "config.json"
    if resume and saved.is_file() and not explicit:
        try:
            data = json.loads(saved.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{saved}: not valid JSON ({e.__class__.__name__}); name the run's config with "
                              "--config FILE_OR_PRESET (it is compared with the checkpoint's), or --no-resume") from None
        base = from_dict(data)
    return load_config(config_file, overrides, base=base)


_TORN_SEEN: set[tuple[str, int]] = set()  # (path, size) whose torn last line was already reported


def read_records(path: Path, kind: str | None = None) -> list[dict]:
    """Records of a metrics.jsonl (optionally only those of one `type`).

    A last line cut short (a crash or a full disk mid-write) is dropped with a warning: the records
    before it are intact, and a resume rewrites the file without it. Any other line that is not a
    JSON record is a ConfigError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    out = []
    for i, (n, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ConfigError(f"{path}: line {n} is not a JSON record (the file is damaged); remove that "
                                  "line, then rerun") from None
            key = (str(path), path.stat().st_size)
            if key not in _TORN_SEEN:
                _TORN_SEEN.add(key)
                log.warning("%s: line %d is incomplete (a write cut short); ignoring it", path, n)
            break
        if not isinstance(rec, dict):
            raise ConfigError(f"{path}: line {n} is not a JSON record (the file is damaged); remove that line, "
                              "then rerun")
        for key in ("epoch", "step"):  # compared as numbers by the resume (truncate_logs) and the report
            if key in rec and (not isinstance(rec[key], int) or isinstance(rec[key], bool)):
                raise ConfigError(f"{path}: line {n}: \"{key}\" must be a whole number, got {rec[key]!r} (the "
                                  "file was edited or damaged); fix or remove that line, then rerun")
        if kind is None or rec.get("type") == kind:
            out.append(rec)
    return out


def write_epochs_csv(path: Path, records: list[dict]) -> None:
    """epochs.csv, rewritten whole from the epoch records (a handful of rows), so it always
    matches metrics.jsonl, also after a resume."""
    rows = []
    for rec in records:
        flat = {k: v for k, v in rec.items() if not isinstance(v, dict) and k != "type"}
        for d in ("image_to_text", "text_to_image"):
            for k, v in rec.get("val", {}).get(d, {}).items():
                flat[f"{d}_{k}"] = v
        rows.append(flat)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def plot_run_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """loss_curves.png of a run directory (or `out`) from its epoch records; ConfigError when the
    directory has no metrics.jsonl or no completed epoch yet."""
    from ..eval.plots import plot_training_curves  # matplotlib import only when plotting
    run = RunFiles(Path(run_dir))
    if not run.metrics.is_file():
        raise ConfigError(f"{run.metrics}: not found (is {run_dir} a run directory?)")
    path = plot_training_curves(read_records(run.metrics, "epoch"), out or run.curves)
    if path is None:
        raise ConfigError(f"{run.metrics}: no completed epoch logged yet")
    return path


class RunLog:
    """The logs of a run being trained: metrics.jsonl (one record per line, flushed), epochs.csv,
    health warnings and the loss curves. A context manager: metrics.jsonl is open only inside the
    `with` block and closed on any exit (an interrupt included). With enabled=False (ranks other
    than 0 under torchrun) every method does nothing."""

    def __init__(self, run: RunFiles, enabled: bool = True, logger: logging.Logger | None = None):
        self.run, self.enabled = run, enabled
        self.log = logger or log  # warnings are printed under the trainer's logger name
        self._f: IO[str] | None = None
        self.mirror = None  # a clipft.train.tensorboard.TensorBoardMirror of every record (train.tensorboard)

    def __enter__(self) -> "RunLog":
        if self.enabled:
            self._f = open(self.run.metrics, "a")
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None

    def record(self, rec: dict) -> None:
        """Append one record to metrics.jsonl (the source of truth)."""
        if self._f is not None:
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()
            if self.mirror is not None:
                self.mirror.write(rec)

    def warnings(self, records: list[dict]) -> None:
        """Health warnings: printed once (rank 0) and logged as records."""
        for w in records:
            if self.enabled:
                self.log.warning("health: %s", w["message"])
            self.record(w)

    def epochs(self) -> list[dict]:
        """The epoch records logged so far."""
        return read_records(self.run.metrics, "epoch")

    def epoch_done(self) -> list[dict]:
        """After an epoch record: epochs.csv rewritten to match metrics.jsonl; returns the epoch records."""
        if not self.enabled:
            return []
        epochs = self.epochs()
        write_epochs_csv(self.run.epochs_csv, epochs)
        return epochs

    def plot_curves(self) -> None:
        if self.enabled:
            from ..eval.plots import plot_training_curves  # matplotlib import only when plotting
            plot_training_curves(self.epochs(), self.run.curves)
