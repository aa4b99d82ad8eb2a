"""Members of webdataset shards read by name ('SHARD.tar/KEY.jpg'), through wids' indexed view of the
tar: what `preprocess` opens for a sample that lives in a shard. A leaf module (stdlib and wids only),
so that the image path never imports the dataset formats (`clipft.data.shards` builds on it)."""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

SHARD_WINDOW = 8  # shards whose samples are shuffled together (and held open by each reader)



_OPEN: "OrderedDict[str, Any]" = OrderedDict()  # tar path -> wids IndexedTarSamples, this process only
_LOCK = threading.Lock()  # `clipft validate` decodes from threads
_PID = os.getpid()


def _open_tar(tar: str):
    """wids' indexed view of a local tar (member offsets over an mmap), least recently used dropped
    beyond 2 x SHARD_WINDOW. Reopened after a fork: a DataLoader worker must not share the parent's."""
    global _PID
    from wids.wids import IndexedTarSamples
    with _LOCK:
        if os.getpid() != _PID:
            _OPEN.clear()  # the parent's handles: not ours to close
            _PID = os.getpid()
        itf = _OPEN.pop(tar, None)
        if itf is None:
            itf = IndexedTarSamples(path=tar)
        _OPEN[tar] = itf
        while len(_OPEN) > 2 * SHARD_WINDOW:  # dropped, not closed: a thread may still read it (GC closes)
            _OPEN.popitem(last=False)
        return itf


def split_member(path: str | Path) -> tuple[str, str] | None:
    """('SHARD.tar', 'member name') for a shard member path 'SHARD.tar/KEY.EXT', else None."""
    s = str(path)
    i = s.rfind(".tar/")
    if i < 0 or not os.path.isfile(s[:i + 4]):
        return None
    return s[:i + 4], s[i + 5:]


def open_member(path: str | Path) -> io.BytesIO:
    """The bytes of a shard member as a file object (FileNotFoundError when the shard lacks it)."""
    found = split_member(path)
    if found is None:
        raise FileNotFoundError(str(path))
    tar, name = found
    reader = _open_tar(tar).reader
    if name not in reader.by_name:
        raise FileNotFoundError(str(path))
    return io.BytesIO(bytes(reader.get_by_name(name)[1]))


def member_size(path: str | Path) -> int | None:
    """The byte size of a shard member (FileNotFoundError when the shard lacks it); None: not a member path."""
    found = split_member(path)
    if found is None:
        return None
    reader = _open_tar(found[0]).reader
    if found[1] not in reader.by_name:
        raise FileNotFoundError(str(path))
    return len(reader.get_by_name(found[1])[1])


def member_exists(path: str | Path) -> bool:
    found = split_member(path)
    return found is not None and found[1] in _open_tar(found[0]).reader.by_name
