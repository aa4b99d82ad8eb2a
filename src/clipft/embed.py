"""Embeddings of a folder of images: `clipft embed --model DIR --images FOLDER --out FILE.safetensors`.

`list_images` walks the folder (recursively, sorted, hidden folders and links that leave it
skipped, each file once whatever the links); `embed_paths` decodes in parallel DataLoader workers (decoding and resizing dominate
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
from .preprocess import IMAGE_EXTENSIONS, preprocess_file

log = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "clipft-folder-embeddings-v1"


def list_images(folder: str | Path, skip_dirs: Iterable[str] = (".clipft-index",)) -> list[Path]:
    """Image files under `folder` (IMAGE_EXTENSIONS, any case), recursive, sorted, as paths relative
    to it. Hidden directories, `skip_dirs`, and links resolving outside the folder are skipped.

    Each file is listed once, by its resolved path, whatever the links: every real directory is walked
    once (so link loops of any shape end), and a file reachable by several paths is named by its
    link-free path when it has one, else by the first in sorted order."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    real_root = root.resolve()
    skip = set(skip_dirs)
    seen_dirs: set[Path] = set()
    via_link: set[Path] = set()  # relative folders whose path goes through a link
    best: dict[Path, tuple[bool, str, Path]] = {}  # real file -> (via a link?, posix path, relative path)
    pending, linked = [Path(".")], []  # folders to walk: reached without links, and through one
    while pending or linked:
        # every folder reachable without a link is walked (and named) before any link is followed
        rel_dir = pending.pop() if pending else linked.pop()
        try:
            real_dir = (root / rel_dir).resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if real_dir in seen_dirs or not real_dir.is_relative_to(real_root):
            continue
        seen_dirs.add(real_dir)
        try:
            entries = sorted(os.scandir(root / rel_dir), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = rel_dir / e.name
            try:
                is_dir = e.is_dir()  # follows links
            except OSError:
                continue
            if is_dir:
                if e.name not in skip:
                    (linked if e.is_symlink() or rel_dir in via_link else pending).append(rel)
                    if e.is_symlink() or rel_dir in via_link:
                        via_link.add(rel)
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                try:
                    real = (root / rel).resolve(strict=True)
                except (OSError, RuntimeError):
                    continue
                if not real.is_relative_to(real_root):
                    continue  # a link leaving the folder
                key = (real != real_root / rel, rel.as_posix(), rel)
                if real not in best or key < best[real]:
                    best[real] = key
        pending.sort(reverse=True)  # depth-first, in name order: deterministic
        linked.sort(reverse=True)
    return sorted(rel for _, _, rel in best.values())


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


PART_CHUNK = 512  # images per part file of a multi-process `clipft embed`: the most a kill can lose


def _embed_ranks(model, folder: Path, out: Path, paths: list[Path], batch_size: int, workers: int | None,
                 progress: bool, chunk_size: int) -> tuple[torch.Tensor, list[int]]:
    """Under torchrun: rank r embeds paths[r::world] in chunks, each saved as OUT.parts/<key>/
    rank<r>-<chunk>.safetensors (temp file + rename; an existing one is a finished chunk of a killed
    run and is not embedded again). <key> hashes the file list, model and process layout, so parts of
    another listing are never mixed in. After a barrier rank 0 reads every part and puts the rows
    back in listing order: (emb [N_ok, D], rows into `paths`), as `embed_paths` gives; others get None."""
    import hashlib
    import shutil
    from safetensors.torch import load_file, save_file
    from . import distributed
    rank, world = distributed.get_rank(), distributed.get_world_size()
    key = hashlib.sha256(json.dumps([model.fingerprint, world, chunk_size, [p.as_posix() for p in paths]])
                         .encode()).hexdigest()[:16]
    parts = out.with_name(out.name + ".parts")
    here = parts / key
    here.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(paths), world))
    chunks = [mine[s:s + chunk_size] for s in range(0, len(mine), chunk_size)]
    for c, chunk in enumerate(tqdm(chunks, desc=f"embed images (rank 0 of {world})", unit="chunk",
                                   disable=None if progress and rank == 0 else True)):
        f = here / f"rank{rank}-{c:06d}.safetensors"
        if f.is_file():
            continue  # finished by a killed run
        emb, ok = embed_paths(model, folder, [paths[i] for i in chunk], batch_size=batch_size, workers=workers,
                              progress=False)
        tmp = f.with_name(f".{f.name}.tmp")
        save_file({"embeddings": emb.contiguous(), "rows": torch.tensor([chunk[i] for i in ok], dtype=torch.int64)},
                  str(tmp))
        tmp.replace(f)
    distributed.barrier()
    if rank != 0:
        return None, None
    got = [load_file(str(f)) for f in sorted(here.glob("rank*.safetensors"))]
    rows = torch.cat([g["rows"] for g in got]) if got else torch.zeros(0, dtype=torch.int64)
    emb = torch.cat([g["embeddings"] for g in got]) if got else torch.zeros(0, model.embed_dim)
    order = torch.argsort(rows)
    result = emb[order], rows[order].tolist()
    shutil.rmtree(parts, ignore_errors=True)  # leftovers of other listings too: the file is written next
    return result


def embed_folder(model: ImageTextModel, folder: str | Path, out: str | Path, batch_size: int = 64,
                 workers: int | None = None, progress: bool = True, chunk_size: int = PART_CHUNK) -> dict:
    """Embed every image under `folder` (see `list_images`) and write `out` (safetensors):
    embeddings [N, D] float32, sizes [N] int64 bytes, mtimes [N] float64 seconds; metadata: the
    relative paths (JSON list, row order), model name and fingerprint, skipped count. Returns a
    summary: images, skipped, seconds, images_per_s, out. Under torchrun every process embeds its
    share (`_embed_ranks`, resumable) and rank 0 writes the same file a single process would."""
    from safetensors.torch import save_file
    from . import distributed
    folder, out = Path(folder), Path(out)
    paths = list_images(folder)
    if not paths:  # a file of 0 embeddings is of no use to anyone: say so instead of writing one
        from .config import ConfigError
        raise ConfigError(f"{folder}: no images in this folder or below it "
                          f"({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}); nothing to embed")
    t0 = time.perf_counter()
    if distributed.is_distributed():
        paths = distributed.all_gather_objects(paths)[0]  # rank 0's listing, should the folder change meanwhile
        emb, rows = _embed_ranks(model, folder, out, paths, batch_size, workers, progress, chunk_size)
        if emb is None:
            n = len(range(distributed.get_rank(), len(paths), distributed.get_world_size()))
            return {"images": n, "skipped": 0, "seconds": time.perf_counter() - t0, "images_per_s": 0.0,
                    "out": str(out)}
    else:
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
