"""Where and how a run executes: device, precision, seeds and RNG state, atomic writes, hardware.

Kept apart from the training loop so evaluation, export and distributed launch (distributed.py) share it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
from pathlib import Path
from typing import Any, Iterator, TypeVar

import numpy as np
import torch

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return dev


def amp_dtype_for(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 on CUDA where supported (no scaler needed), else fp16; None (fp32) on CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temp file beside `path`, fsync, then rename: a crash never leaves a half file,
    and a failed save leaves the previous file untouched (and no temp file behind)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def hardware_info(device: torch.device) -> dict:
    """CPU model, core count and GPU name: recorded in summary.json and the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": str(device), "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


_T = TypeVar("_T")


@contextlib.contextmanager
def overriding(obj: _T, **fields: Any) -> Iterator[_T]:
    """Set existing attributes of `obj` inside the block and restore them after: how a module's seams
    (`train.TrainHooks`, `data.download.DownloadHooks`) are replaced, also under `cli.main`."""
    unknown = [k for k in fields if not hasattr(obj, k)]
    if unknown:
        raise AttributeError(f"{type(obj).__name__} has no {', '.join(unknown)}")
    saved = {k: getattr(obj, k) for k in fields}
    for k, v in fields.items():
        setattr(obj, k, v)
    try:
        yield obj
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


_CAPPED: set[tuple[int, int]] = set()  # (asked, available) pairs already logged


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or `taskset`'s limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_count(asked: int) -> int:
    """data.num_workers capped at the CPUs available: more decoding processes than cores only
    compete for them (and PyTorch warns at every loader). Logged once per value."""
    cpus = available_cpus()
    if asked <= cpus:
        return asked
    if (asked, cpus) not in _CAPPED:
        _CAPPED.add((asked, cpus))
        import logging
        logging.getLogger(__name__).info("data.num_workers=%d capped at the %d CPU(s) available", asked, cpus)
    return cpus
