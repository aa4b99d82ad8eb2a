"""Where caches go when a dataset folder cannot be written: the user cache dir. A leaf module, so that
every data module (caches, shards) can ask without importing the format registry; the rest of the cache
layout is `caches.py`'s."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from ..runtime import writable_dir

log = logging.getLogger(__name__)
_told: set[str] = set()  # default cache dirs whose relocation was logged (once per process)


def user_cache_root() -> Path:
    """$XDG_CACHE_HOME/clipft, or ~/.cache/clipft."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clipft"


def user_cache_dir(data_dir: str | Path) -> Path:
    """The user cache dir standing in for a dataset folder that cannot be written:
    user_cache_root()/<folder name>-<sha256 of its absolute path, 10 hex>."""
    absolute = os.path.abspath(data_dir)
    digest = hashlib.sha256(absolute.encode()).hexdigest()[:10]
    return user_cache_root() / f"{_slug(Path(absolute).name or 'data', 40)}-{digest}"


def _holds_files(folder: Path) -> bool:
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError:  # not even readable: nothing to share
        return False


def _usable_dir(default_dir: Path) -> Path:
    """`default_dir` when it can be written or already holds caches (a shared cache built by whoever
    owns the dataset: read where it is); else the user cache dir, logged once."""
    if writable_dir(default_dir) or _holds_files(default_dir):
        return default_dir
    user = user_cache_dir(default_dir.parent)
    if str(default_dir) not in _told:
        _told.add(str(default_dir))
        log.warning("%s cannot be written (read-only dataset folder): caches go to %s instead "
                    "(set text.cache_dir to choose)", default_dir, user)
    return user


def _slug(name: str, limit: int = 80) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "encoder"
    if len(slug) > limit:  # long local paths: keep the informative tail, disambiguate with a hash
        slug = slug[-(limit - 9):].lstrip("._-") + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return slug
