"""Where and how a run executes: device, precision, seeds and RNG state, atomic writes, hardware.

Kept apart from the training loop so evaluation, export and distributed launch (distributed.py) share it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TypeVar

import numpy as np
import torch

from .config import AMP_MODES, ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return dev


@dataclass(frozen=True)
class Precision:
    """How a forward pass runs: autocast dtype (None = fp32), NHWC memory layout, and why.

    Decided once per run by `select_precision`, logged, and recorded in summary.json and the report.
    Losses, the logit scale and recall metrics are fp32 whatever this says (the towers return fp32).
    """

    dtype: torch.dtype | None
    channels_last: bool
    reason: str

    @property
    def name(self) -> str:
        """'bf16', 'fp16' or 'fp32': the label in logs, summaries and cache fingerprints."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def autocast(self, device: torch.device):
        """The autocast context for a forward pass on `device` (a no-op for fp32)."""
        return torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def to_dict(self) -> dict:
        return {"dtype": self.name, "channels_last": self.channels_last, "reason": self.reason}


def cpu_has_native_bf16() -> bool:
    """PyTorch's own check (oneDNN's): can this CPU run bf16 convolutions and matmuls natively
    (AVX512-BF16, AMX; also AVX512BW/VL/DQ, where oneDNN converts fast)? False on builds without oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # no oneDNN in this build, or an op that moved
        return False


def select_precision(device: torch.device, amp: str | bool = "auto", channels_last: bool = True,
                     cpu_bf16: bool | None = None) -> Precision:
    """The precision a run uses on `device` for `train.amp` = auto | bf16 | fp16 | off.

    auto: CUDA -> bf16 where the GPU supports it, else fp16 (with a GradScaler in training);
    CPU -> bf16 autocast + channels_last where the CPU has native bf16 (`cpu_has_native_bf16`),
    else fp32. bf16 forces bf16 (CPU autocast emulates it where the CPU lacks it: slow but valid);
    fp16 is CUDA only. channels_last=False keeps NCHW. cpu_bf16 overrides the CPU check (tests, and
    the benchmark's fp32-vs-auto comparison); None asks PyTorch. Bools are read as auto/off.
    """
    if isinstance(amp, bool):
        amp = "auto" if amp else "off"
    if amp not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off":
        return Precision(None, channels_last and device.type == "cuda", "train.amp=off")
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            why = "train.amp=fp16" if amp == "fp16" else "auto: this GPU has no bf16"
            return Precision(torch.float16, channels_last, why)
        return Precision(torch.bfloat16, channels_last, f"{'auto' if amp == 'auto' else 'train.amp=bf16'}: "
                                                        "bf16 autocast on CUDA")
    if device.type != "cpu":
        return Precision(None, False, f"auto: no autocast on {device.type}")
    if amp == "fp16":
        raise ConfigError("train.amp=fp16 needs CUDA (fp16 on a CPU is slower than fp32); use auto, bf16 or off")
    if amp == "bf16":
        return Precision(torch.bfloat16, channels_last, "train.amp=bf16: bf16 autocast on the CPU")
    native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
    if native:
        return Precision(torch.bfloat16, channels_last, "auto: this CPU has native bf16")
    return Precision(None, False, "auto: this CPU has no native bf16, fp32")


def amp_dtype_for(device: torch.device, amp: str | bool = "auto") -> torch.dtype | None:
    """The autocast dtype `select_precision` picks (None = fp32)."""
    return select_precision(device, amp).dtype


def is_out_of_memory(error: BaseException) -> bool:
    """True for a device or host allocation failure: torch.OutOfMemoryError (CUDA) or the CPU
    allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory", "not enough memory")."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("DefaultCPUAllocator", "not enough memory", "can't allocate memory"))


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
