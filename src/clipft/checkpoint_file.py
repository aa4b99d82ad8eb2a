"""Reading and writing clipft checkpoint files safely: no code runs on load, damage is detected.

- Safe loading: every checkpoint is read with `torch.load(weights_only=True)`, PyTorch's restricted
  unpickler (tensors, dicts, lists, tuples, str, numbers, None): a crafted `.pt` whose pickle calls
  a function (`__reduce__`) is refused before that call. Checkpoints written by clipft hold only such
  values (`runtime.rng_state` stores numpy's RNG state as a tensor). Checkpoints written by earlier
  versions also hold a numpy RNG state (ndarray, dtype): those few numpy types are allowed for the
  load, and nothing else (`LEGACY_NUMPY_GLOBALS`).
- Checksums: `add_checksum` stores a digest of the whole content (every tensor's bytes, dtype and
  shape, every plain value, under its key path) in the dict under "checksum"; `checksum_problem`
  recomputes it after the load. A flipped byte inside tensor data (which torch.load does not notice)
  is then a one-line error instead of a silently wrong weight. Files without the entry (older
  versions) load unchecked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKSUM_KEY = "checksum"
ALGORITHM = "blake2b-128"


def _numpy_globals() -> list:
    """The numpy callables and classes an earlier clipft checkpoint's numpy RNG state (an ndarray of
    uint32, numpy scalars) pickles to, under numpy 2 and numpy 1 module names."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in ("uint32", "int32", "int64", "float32", "float64", "bool")]
    return [np.ndarray, np.dtype, *dtypes, _reconstruct, scalar,
            (_reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar"),
            (_reconstruct, "numpy._core.multiarray._reconstruct"), (scalar, "numpy._core.multiarray.scalar")]


LEGACY_NUMPY_GLOBALS = _numpy_globals()


def load_safely(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load(weights_only=True), with the numpy types of older checkpoints allowed for this
    call only. Raises what torch raises (pickle.UnpicklingError for a refused global, RuntimeError,
    EOFError, ...): the caller turns it into one line naming the file."""
    with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def _feed(h: "hashlib._Hash", key: str, value: Any) -> None:
    """Hash `value` under its key path (so moved values change the digest too)."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        h.update(f"{key}:tensor:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            # The raw bytes of the elements [numel * itemsize] (uint8 view: bf16 has no numpy type).
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f"{key}:dict:{len(value)};".encode())
        for k, v in value.items():
            _feed(h, f"{key}/{k!r}", v)
    elif isinstance(value, (list, tuple)):
        h.update(f"{key}:{type(value).__name__}:{len(value)};".encode())
        for i, v in enumerate(value):
            _feed(h, f"{key}/{i}", v)
    elif isinstance(value, np.ndarray):  # older checkpoints' numpy RNG state
        h.update(f"{key}:ndarray:{value.dtype.str}:{value.shape};".encode())
        h.update(np.ascontiguousarray(value).data)
    else:  # str, int, float, bool, None: repr round-trips them exactly
        h.update(f"{key}:{type(value).__name__}:{value!r};".encode())


def content_checksum(ckpt: dict[str, Any]) -> str:
    """The digest of a checkpoint dict's content, its "checksum" entry left out (hex)."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in ckpt.items():
        if k != CHECKSUM_KEY:
            _feed(h, repr(k), v)
    return h.hexdigest()


def add_checksum(ckpt: dict[str, Any]) -> dict[str, Any]:
    """`ckpt` (a new dict) with its "checksum" entry: {"algorithm", "digest"}."""
    out = {k: v for k, v in ckpt.items() if k != CHECKSUM_KEY}
    out[CHECKSUM_KEY] = {"algorithm": ALGORITHM, "digest": content_checksum(out)}
    return out


def checksum_problem(ckpt: dict[str, Any]) -> str | None:
    """Why the loaded `ckpt` does not match its stored checksum (None: it matches, or the file
    predates checksums)."""
    stored = ckpt.get(CHECKSUM_KEY)
    if stored is None:
        return None
    if not isinstance(stored, dict) or stored.get("algorithm") != ALGORITHM or not isinstance(stored.get("digest"), str):
        return f"its checksum entry is not one clipft writes ({str(stored)[:60]})"
    if content_checksum(ckpt) != stored["digest"]:
        return "its content does not match its checksum: the file was damaged after it was written"
    return None
