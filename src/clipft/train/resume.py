"""Rerunning into a run directory: a resume must continue the same run, or say why it cannot.

A rerun of `clipft train --out RUN` continues from RUN/last.pt (or RUN/last.prev.pt, see
checkpoint.py). Before anything in RUN is written, the run it would continue is compared with the
stored one:

- the config: the checkpoint's own config (what was trained, so a hand-edited config.json is seen
  too) against the config this invocation resolved. Only the keys in RESUMABLE_KEYS may differ;
- the data: the dataset's identity (`data_setup.data_identity`: format, split sizes, a fingerprint of
  the captions, of the image file names, of every image's byte size and of the content of a sample
  of images; not file times, which a copy changes), compared once the splits are loaded and before any caption is embedded. A
  dataset that only moved (same identity, another path: a copy on a node's local disk) is fine.

- the number of processes (torchrun's world size): it sets the global batch (the negatives of every
  loss), the steps of an epoch and which batches a mid-epoch checkpoint already trained on, so
  another number would continue a different run.

Any other difference is a ResumeError: one line listing the differing keys, old -> new, and what to
do ("use another --out, or --no-resume to start over"). `config.json` is written only after the
run is accepted (train.py), so a refused or failed rerun leaves the stored run as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from ..config import Config, from_dict, to_dict
from .errors import TrainingError

log = logging.getLogger(__name__)

# What a rerun may change: how long it runs, how often it logs and saves, where and how fast it runs.
# train.epochs: a run can be extended (or shortened); the cosine schedule then spans the new total.
# Everything else (data, model, optimisation, precision, seeds) would make the resumed run a
# different experiment under the old run's name.
RESUMABLE_KEYS = frozenset({
    "train.epochs", "train.log_every", "train.checkpoint_every", "train.device", "train.tensorboard",
    "train.compile", "data.num_workers", "text.batch_size", "text.cache_dir", "eval.batch_size",
    "model.grad_checkpointing",  # recomputes activations: the same gradients, less memory
})

HINT = "use another --out, or --no-resume to start over"


class ResumeError(TrainingError):
    """A rerun into a run directory that holds another run (config or data)."""


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, kv in d.items() for k, v in kv.items()}


def config_differences(saved: dict[str, Any], wanted: Config, allowed: Iterable[str] = ()) -> list[str]:
    """`key: saved -> wanted` for every key outside `allowed` where a saved run config (a to_dict
    mapping) differs from `wanted`. The saved one is read through today's schema first, so a key
    added since it was written takes its default instead of counting as a difference."""
    allowed = set(allowed)
    a, b = _flat(to_dict(from_dict(saved))), _flat(to_dict(wanted))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in allowed and a.get(k) != b.get(k)]


def _listing(diffs: list[str], most: int = 6) -> str:
    return "; ".join(diffs[:most]) + (f"; and {len(diffs) - most} more" if len(diffs) > most else "")


def check_config(run_root: Path, ckpt: dict[str, Any], checkpoint: Path, cfg: Config) -> None:
    """ResumeError unless `cfg` continues the run `ckpt` (read from `checkpoint`) was trained with."""
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        return  # a checkpoint from before configs were saved in it: nothing to compare
    changed = config_differences(saved, cfg)  # "key: old -> new"
    diffs = [c for c in changed if c.split(":", 1)[0] not in RESUMABLE_KEYS]
    if _same_weights_file(saved, cfg):  # a weights file that only moved (same sha256) is the same init
        diffs = [c for c in diffs if not c.startswith("model.image_weights:")]
    if diffs:
        raise ResumeError(f"{run_root}: holds a run with another config ({_listing(diffs)}; compared with "
                          f"{checkpoint.name}); only {', '.join(sorted(RESUMABLE_KEYS))} may change on resume: {HINT}")
    if changed:
        log.info("resuming with %s", "; ".join(changed))
    if any(c.startswith("train.epochs:") for c in changed):
        log.warning("train.epochs changed on resume: the learning-rate schedule now spans %d epochs, so the "
                    "rate steps to where that schedule is at the resumed step", cfg.train.epochs)


def _same_weights_file(saved: dict[str, Any], cfg: Config) -> bool:
    sha = (saved.get("model") or {}).get("image_weights_sha256") or ""
    return bool(sha) and sha == cfg.model.image_weights_sha256


def check_data(run_root: Path, ckpt: dict[str, Any], checkpoint: Path, now: dict[str, Any]) -> None:
    """ResumeError unless `now` (`traindata.data_identity`) is the data the checkpoint's run was trained on."""
    saved = ckpt.get("data")
    if not isinstance(saved, dict):
        return  # a checkpoint from before the data identity was stored
    # Keys a checkpoint predates (the image byte sizes and sample) are not compared: nothing to compare with.
    diffs = [f"{split}.{key}: {saved.get(split, {}).get(key)!r} -> {now[split].get(key)!r}"
             for split in ("train", "val") for key in now[split]
             if key in saved.get(split, {}) and saved[split][key] != now[split][key]]
    if diffs:
        where = f" at {saved.get('path')}" if saved.get("path") != now["path"] else ""
        raise ResumeError(f"{run_root}: holds a run trained on other data{where} ({_listing(diffs)}; compared with "
                          f"{checkpoint.name}): {HINT}")
    if saved.get("path") != now["path"]:
        log.info("the data moved from %s to %s (same splits, captions, image names, image byte sizes and a "
                 "sample of image contents): resuming", saved.get("path"), now["path"])


def check_world_size(run_root: Path, ckpt: dict[str, Any], checkpoint: Path, world_size: int) -> None:
    """ResumeError unless this run has as many processes as the one that wrote `ckpt` (its global
    batch, steps per epoch and skipped batches depend on it)."""
    saved = ckpt.get("world_size") or len(ckpt.get("rng_per_rank") or [None])
    if saved != world_size:
        raise ResumeError(f"{run_root}: {checkpoint.name} was written by {saved} process(es), this run has "
                          f"{world_size}: the global batch and the steps of an epoch would change; resume with "
                          f"{saved} process(es) (torchrun --nproc-per-node), or {HINT}")
