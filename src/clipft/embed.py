"""Embeddings of a folder of images: `clipft embed --model DIR --images FOLDER --out FILE.safetensors`.

`list_images` walks the folder (recursively, sorted, hidden folders and links that leave it
skipped); `embed_paths` decodes in parallel DataLoader workers (decoding and resizing dominate
on CPU) while the main process runs the model batch by batch; unreadable files are skipped,
counted and reported in one line. `embed_folder` writes the embeddings with each file's relative
path, size and mtime, so a later run can tell which files changed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .inference import ImageTextModel
from .preprocess import preprocess_file

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
EMBEDDINGS_FORMAT = "clipft-folder-embeddings-v1"


def list_images(folder: str | Path, skip_dirs: Iterable[str] = (".clipft-index",)) -> list[Path]:
    """Image files under `folder` (IMAGE_EXTENSIONS, any case), recursive, sorted, as paths relative
    to it. Hidden directories, `skip_dirs`, and links resolving outside the folder are skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    real_root = root.resolve()
    skip = set(skip_dirs)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        # Prune in place: os.walk then never descends there. A linked folder outside the root (or
        # a link loop back up into it) is left out.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip
                             and _inside(here / d, real_root) and not _is_loop(here / d))
        for name in filenames:
            p = here / name
            if name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS or not _inside(p, real_root):
                continue
            found.append(p.relative_to(root))
    return sorted(found)


def _inside(p: Path, real_root: Path) -> bool:
    if not p.is_symlink():
        return True
    try:
        p.resolve().relative_to(real_root)
        return True
    except (ValueError, OSError):
        return False


def _is_loop(d: Path) -> bool:
    """A linked directory that points at one of its own ancestors (os.walk would never end)."""
    if not d.is_symlink():
        return False
    target = d.resolve()
    return target == d.parent.resolve() or target in d.parent.resolve().parents


class _Files(Dataset):
    """(pixels [3, S, S] or None, index, reason or None) per path: decoded in the workers."""

    def __init__(self, root: Path, paths: Sequence[Path], preprocess: Any, draft_size: int | None):
        self.root, self.paths, self.preprocess, self.draft_size = root, list(paths), preprocess, draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        # The one rule (clipft.preprocess); a pathological image (e.g. 0 px wide) is skipped, not fatal.
        pixels, reason = preprocess_file(self.root / self.paths[i], self.preprocess, self.draft_size)
        return pixels, i, reason


def _collate(batch: list) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    ok = [(x, i) for x, i, _ in batch if x is not None]
    bad = [(i, r) for x, i, r in batch if x is None]
    pixels = torch.stack([x for x, _ in ok]) if ok else torch.zeros(0)
    return pixels, [i for _, i in ok], bad


def default_workers() -> int:
    """Decoding processes: the CPUs this process may use, minus one for the model, at most 8."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, n - 1))


def embed_paths(model: ImageTextModel, root: str | Path, paths: Sequence[Path], batch_size: int = 64,
                workers: int | None = None, progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Embed root/p for every p in `paths`: (emb [N_ok, D] float32 CPU L2-normalised, rows: the
    indices into `paths` of the files that decoded, in order). Unreadable files are skipped,
    counted and logged in one line. workers=None: `default_workers()`; 0 decodes in this process."""
    root = Path(root)
    workers = default_workers() if workers is None else workers
    loader = DataLoader(_Files(root, paths, model.preprocess, model.draft_size), batch_size=batch_size,
                        shuffle=False, num_workers=workers, collate_fn=_collate,
                        prefetch_factor=4 if workers > 0 else None, persistent_workers=False)
    embs, rows, bad = [], [], []
    with tqdm(total=len(paths), desc="embed images", unit="img", disable=None if progress else True) as bar:
        for pixels, idx, skipped in loader:
            embs.append(model.encode_pixels(pixels))
            rows += idx
            bad += skipped
            bar.update(len(idx) + len(skipped))
    if bad:
        i, reason = bad[0]
        log.warning("%d unreadable image file(s) skipped (first: %s: %s)", len(bad), root / paths[i], reason)
    emb = torch.cat(embs) if embs else torch.zeros(0, model.embed_dim)
    return emb, rows


def embed_folder(model: ImageTextModel, folder: str | Path, out: str | Path, batch_size: int = 64,
                 workers: int | None = None, progress: bool = True) -> dict:
    """Embed every image under `folder` (see `list_images`) and write `out` (safetensors):
    embeddings [N, D] float32, sizes [N] int64 bytes, mtimes [N] float64 seconds; metadata: the
    relative paths (JSON list, row order), model name and fingerprint, skipped count. Returns a
    summary: images, skipped, seconds, images_per_s, out."""
    from safetensors.torch import save_file
    folder, out = Path(folder), Path(out)
    paths = list_images(folder)
    t0 = time.perf_counter()
    emb, rows = embed_paths(model, folder, paths, batch_size=batch_size, workers=workers, progress=progress)
    seconds = time.perf_counter() - t0
    kept = [paths[r] for r in rows]
    stats = [(folder / p).stat() for p in kept]
    tensors = {"embeddings": emb.contiguous(),
               "sizes": torch.tensor([s.st_size for s in stats], dtype=torch.int64),
               "mtimes": torch.tensor([s.st_mtime for s in stats], dtype=torch.float64)}
    meta = {"format": EMBEDDINGS_FORMAT, "paths": json.dumps([p.as_posix() for p in kept]), "model": model.name,
            "fingerprint": model.fingerprint, "embed_dim": str(model.embed_dim), "root": str(folder),
            "skipped": str(len(paths) - len(kept))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)  # atomic: a crash never leaves a half-written file under the real name
    return {"images": len(kept), "skipped": len(paths) - len(kept), "seconds": seconds,
            "images_per_s": len(kept) / seconds if seconds > 0 else float("inf"), "out": str(out)}


def read_folder_embeddings(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """(tensors, relative paths, metadata) of a file written by `embed_folder`."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != EMBEDDINGS_FORMAT:
        raise ValueError(f"{path}: not a clipft folder-embeddings file (format {meta.get('format')!r})")
    return tensors, json.loads(meta["paths"]), meta
