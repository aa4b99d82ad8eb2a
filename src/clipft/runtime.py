"""Where and how a run executes: device, precision, seeds and RNG state, atomic writes, storage
errors (disk full, read-only), hardware.

Kept apart from the training loop so evaluation, export and distributed launch (distributed.py) share it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from .config import AMP_MODES, ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        # Every command's --device comes here, not only train's config: name the value, not a config key.
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine; run on the CPU instead "
                          "(--device cpu; for train: --set train.device=cpu)")
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


# Below this input size a ResNet's last stages run on 1x1 maps, where PyTorch 2.14's oneDNN bf16
# stride-2 convolution gives random weight gradients (reproduced on this project's CPUs): auto keeps
# such small CPU runs (tests, smoke runs) in fp32. train.amp=bf16 still forces bf16.
CPU_BF16_MIN_SIZE = 64


def select_precision(device: torch.device, amp: str | bool = "auto", channels_last: bool = True,
                     cpu_bf16: bool | None = None, image_size: int | None = None) -> Precision:
    """The precision a run uses on `device` for `train.amp` = auto | bf16 | fp16 | off.

    auto: CUDA -> bf16 where the GPU supports it, else fp16 (with a GradScaler in training);
    CPU -> bf16 autocast + channels_last where the CPU has native bf16 (`cpu_has_native_bf16`),
    else fp32. bf16 forces bf16 (CPU autocast emulates it where the CPU lacks it: slow but valid);
    fp16 is CUDA only. channels_last=False keeps NCHW. cpu_bf16 overrides the CPU check (tests, and
    the benchmark's fp32-vs-auto comparison); None asks PyTorch. Bools are read as auto/off.
    image_size (training/evaluation images): auto stays fp32 on a CPU below CPU_BF16_MIN_SIZE px.
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
    if native and image_size is not None and image_size < CPU_BF16_MIN_SIZE:
        return Precision(None, False, f"auto: fp32 below {CPU_BF16_MIN_SIZE} px on the CPU (oneDNN's bf16 "
                                      "stride-2 convolutions on 1x1 feature maps give wrong weight gradients)")
    if native:
        return Precision(torch.bfloat16, channels_last, "auto: this CPU has native bf16")
    return Precision(None, False, "auto: this CPU has no native bf16, fp32")


def amp_dtype_for(device: torch.device, amp: str | bool = "auto", image_size: int | None = None) -> torch.dtype | None:
    """The autocast dtype `select_precision` picks (None = fp32)."""
    return select_precision(device, amp, image_size=image_size).dtype


def is_out_of_memory(error: BaseException) -> bool:
    """True for a device or host allocation failure: torch.OutOfMemoryError (CUDA) or the CPU
    allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory", "not enough memory")."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("DefaultCPUAllocator", "not enough memory", "can't allocate memory"))


class StorageError(Exception):
    """A file could not be written: the disk is full, or the folder is read-only or not permitted.
    Its message is one line naming the file (the CLI prints it as `clipft: error: ...`)."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024, one decimal)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(path: str | Path) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing parent); None if unknown."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _errno_in_chain(e: BaseException) -> int | None:
    """The errno of `e` or of an exception it wraps; torch and safetensors wrap a failed write in
    their own error types, so ENOSPC is also recognised by its message."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        text = str(e)
        if "No space left on device" in text or "StorageFull" in text:
            return errno.ENOSPC
        if "Disk quota exceeded" in text:
            return errno.EDQUOT
        if "Read-only file system" in text:
            return errno.EROFS
        e = e.__cause__ or e.__context__
    return None


def make_parent_dir(path: str | Path) -> None:
    """mkdir -p of `path`'s folder; a full disk or a read-only folder is a StorageError (one line)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = storage_error(Path(path), e)
        if err is not None:
            raise err from None
        raise


def storage_error(path: str | Path, e: BaseException, needed: int | None = None) -> StorageError | None:
    """A one-line StorageError for a write to `path` that failed with `e` because the disk is full
    or the place is not writable (`needed`: bytes the write needed, when known); None otherwise."""
    code = _errno_in_chain(e)
    if code in _NO_SPACE:
        free = free_bytes(path)
        need = f"needs about {human_bytes(needed)}" if needed else "needs more space"
        have = f", {human_bytes(free)} free" if free is not None else ""
        return StorageError(f"{path}: no space left on device ({need}{have}); free some space "
                            "or write elsewhere, then rerun the same command")
    if code in _NOT_WRITABLE:
        why = "read-only file system" if code == errno.EROFS else "permission denied"
        return StorageError(f"{path}: cannot write here ({why})")
    return None


def check_free_space(path: str | Path, needed: int) -> None:
    """StorageError (one line) when the file system of `path` has less than `needed` bytes free:
    checked before long work whose result would not fit."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise StorageError(f"{path}: no space left on device (needs about {human_bytes(needed)}, "
                           f"{human_bytes(free)} free); free some space or write elsewhere")


def writable_dir(path: str | Path) -> bool:
    """Whether files can be created in `path`, or in its nearest existing parent (where it would be
    made). Checked before work whose output goes there."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def ensure_writable_dir(path: str | Path, hint: str = "") -> None:
    """StorageError (one line, `hint` appended) unless files can be created in `path`."""
    if not writable_dir(path):
        raise StorageError(f"{path}: cannot write here (read-only or permission denied)"
                           + (f"; {hint}" if hint else ""))


def process_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets as it reads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """chmod `path` to 0o666 minus the umask: what open() gives a new file. Writers that create
    files 0600 whatever the umask (safetensors) need it, or no one else could read a shared cache."""
    os.chmod(path, 0o666 & ~process_umask())


def _payload_bytes(obj: Any) -> int:
    """Bytes of the tensor storages in `obj` (nested dicts/lists): about the size torch.save writes."""
    seen: set[int] = set()
    total, stack = 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def atomic_torch_save(obj: Any, path: Path, verify: Callable[[Path], Any] | None = None,
                      previous: Path | None = None) -> None:
    """Write to a temp file beside `path`, fsync, then rename: a crash never leaves a half file,
    and a failed save leaves the previous file untouched (and no temp file behind). A full disk or
    a read-only folder is a StorageError naming `path` and the space it needed.

    verify(temp file) runs before the rename (it raises when the file does not read back);
    previous: the file `path` held is kept under this name, replaced only by a verified new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        if previous is not None and path.exists():
            os.replace(path, previous)  # a crash between the two renames leaves `previous` (resume finds it)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        err = storage_error(path, e, needed=_payload_bytes(obj)) if isinstance(e, Exception) else None
        if err is not None:
            raise err from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text through a temp file and a rename (never a half file); StorageError when the disk
    is full or the folder read-only."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        err = storage_error(path, e, needed=len(text.encode()))
        if err is not None:
            raise err from None
        raise


def rng_state() -> dict:
    """This process's RNG streams as plain data and tensors (a checkpoint loads with weights_only=True):
    numpy's MT19937 state as (name, key [624] int64 tensor, pos, has_gauss, cached_gaussian)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (str(name), torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]  # key: a tensor (plain checkpoints) or an ndarray (older ones)
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((name, key.astype(np.uint32), *rest))
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
    info = {"device": str(device), "cpu": cpu, "cpu_count": os.cpu_count(), "cpus_available": available_cpus(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform()}
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


from .threads import available_cpus, configure_cpu_threads, plan_cpu_threads  # noqa: E402,F401 (no torch there)


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
