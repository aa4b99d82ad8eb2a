"""Queries against a loaded index: exact top-k by one matrix product, near-duplicate groups, and an
optional approximate (faiss IVF) index for collections where the exact product stops being fast.

Every embedding is L2-normalised, so a dot product is a cosine similarity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .index import SearchError, connect, load_shard, read_info

ANN_FILE = "ann.faiss"
ANN_MIN_ROWS = 200_000  # below this the exact product answers in a few ms (see benchmarks/search.py)
DUPLICATE_CHUNK = 2048  # rows of the [chunk, N] similarity block held at once by `duplicate_groups`


@dataclass
class Hit:
    id: int
    path: str
    score: float

    def as_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "score": round(self.score, 6)}


@dataclass
class LoadedIndex:
    """An index in memory: ids [N] (ascending), paths, emb [N, D] L2-normalised in the stored dtype.

    float16 (the default storage) halves the bytes one query's product reads, and a CPU matrix-vector
    product is bound by memory: about 2x faster at 100k rows, with top-10 sets equal to float32's
    (scores within 1e-4; benchmarks/search.py)."""
    index_dir: Path
    root: Path
    info: dict[str, str]
    ids: np.ndarray
    paths: list[str]
    sha256: list[str]
    emb: torch.Tensor
    ann: object | None = None
    _row: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._row = {int(i): r for r, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def model(self) -> str:
        return self.info.get("model", "?")

    def row_of(self, image_id: int) -> int:
        """Row of an indexed id; KeyError for an id that is not in the index."""
        return self._row[image_id]

    def row_of_path(self, path: str) -> int | None:
        try:
            return self.paths.index(path)
        except ValueError:
            return None


def load_index(index_dir: str | Path, use_ann: bool | None = None) -> LoadedIndex:
    """Read an index written by `update_index`. `use_ann`: None = use ann.faiss when present and
    current, True = require it, False = exact only."""
    index_dir = Path(index_dir)
    conn = connect(index_dir, readonly=True)
    try:
        info = read_info(conn)
        rows = conn.execute("SELECT id, path, sha256, shard, row FROM files ORDER BY id").fetchall()
    finally:
        conn.close()
    dim = int(info.get("embed_dim", 0))
    if rows:
        shards = {s: load_shard(index_dir, s) for s in {r[3] for r in rows}}
        if len(shards) == 1 and [r[4] for r in rows] == list(range(len(rows))):
            emb = np.array(next(iter(shards.values())))  # compacted: one shard in id order (a copy)
        else:  # a killed run's chunks: still a complete, searchable index
            emb = np.stack([shards[s][r] for _, _, _, s, r in rows])
    else:
        emb = np.zeros((0, dim), dtype=info.get("dtype", "float32"))
    idx = LoadedIndex(index_dir=index_dir.resolve(), root=Path(info.get("root", ".")), info=info,
                      ids=np.array([r[0] for r in rows], dtype=np.int64), paths=[r[1] for r in rows],
                      sha256=[r[2] for r in rows], emb=torch.from_numpy(np.ascontiguousarray(emb)))
    if use_ann is not False:
        idx.ann = load_ann(idx, required=bool(use_ann))
    return idx


def top_k(idx: LoadedIndex, query: torch.Tensor, k: int, exclude: int | None = None) -> list[Hit]:
    """The k rows most similar to one query vector [D]: approximate when idx.ann is set, else exact
    (one [N, D] @ [D] product). `exclude` leaves one row out (the query image itself)."""
    n = len(idx)
    want = min(k + (exclude is not None), n)
    if want <= 0:
        return []
    if idx.ann is not None:
        scores, rows = _ann_search(idx.ann, query, want)
    else:
        scores, rows = torch.topk((idx.emb @ query.to(idx.emb.dtype)).float(), want)  # [N] -> [want]
        scores, rows = scores.tolist(), rows.tolist()
    hits = [Hit(int(idx.ids[r]), idx.paths[r], float(s)) for s, r in zip(scores, rows) if r >= 0 and r != exclude]
    return hits[:k]


def search_text(idx: LoadedIndex, model, text: str, k: int) -> list[Hit]:
    return top_k(idx, model.encode_texts([text])[0], k)


def search_similar(idx: LoadedIndex, image_id: int, k: int) -> list[Hit]:
    """Images like an indexed one (itself left out); KeyError for an unknown id."""
    row = idx.row_of(image_id)
    return top_k(idx, idx.emb[row], k, exclude=row)


def duplicate_groups(idx: LoadedIndex, threshold: float = 0.95, chunk: int = DUPLICATE_CHUNK) -> list[list[int]]:
    """Groups (rows, >= 2 each) of images whose cosine similarity chains at >= threshold: connected
    components of the thresholded similarity graph, computed block by block ([chunk, N] at a time),
    so memory stays bounded; exact, O(N^2 D) time. Groups are sorted by their first row."""
    n = len(idx)
    parent = list(range(n))
    emb = idx.emb.float()  # CPU float16 matrix-matrix products are slow; float32 for the blocks

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for start in range(0, n, chunk):
        block = emb[start:start + chunk] @ emb.T  # [chunk, N]
        ii, jj = torch.nonzero(block >= threshold, as_tuple=True)
        for i, j in zip((ii + start).tolist(), jj.tolist()):
            if i < j:
                ra, rb = find(i), find(j)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for r in range(n):
        groups.setdefault(find(r), []).append(r)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


# --------------------------------------------------------------------------- approximate (optional)

def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs each CPU variant it tries at INFO
    try:
        import faiss
    except ImportError:
        raise SearchError("the approximate index needs faiss: pip install 'clipft[ann]'") from None
    return faiss


def build_ann(emb: torch.Tensor, nlist: int | None = None, nprobe: int | None = None, seed: int = 0):
    """A faiss IVF-Flat inner-product index over emb [N, D]: k-means into `nlist` cells (default
    sqrt(N)), trained on 40 sampled points per cell (faiss wants >= 39), `nprobe` cells (default 32)
    scanned per query, so a query reads about nprobe / nlist of the rows."""
    faiss = _faiss()
    x = np.ascontiguousarray(emb.float().numpy())
    n, d = x.shape
    nlist = nlist or max(1, min(n // 40, int(math.sqrt(n))))
    quantizer = faiss.IndexFlatIP(d)
    ann = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    ann.cp.seed = seed
    ann.train(x[rng.choice(n, size=min(n, 40 * nlist), replace=False)])
    ann.add(x)
    ann.nprobe = min(nlist, nprobe or 32)
    return ann


def _ann_search(ann, query: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    scores, rows = ann.search(np.ascontiguousarray(query.float().numpy()[None]), k)  # [1, k] each
    return scores[0].tolist(), rows[0].tolist()


def ann_state(idx: LoadedIndex) -> str:
    """What the ANN file must match: the rows it was built from (ids and contents)."""
    h = hashlib.sha256(idx.info.get("fingerprint", "").encode() + idx.ids.tobytes())
    for s in idx.sha256:
        h.update(s.encode())
    return h.hexdigest()[:16]


def write_ann(idx: LoadedIndex) -> Path:
    """Build the approximate index for idx and save it beside the database (temp file + rename)."""
    faiss = _faiss()
    ann = build_ann(idx.emb)
    out = idx.index_dir / ANN_FILE
    tmp = out.with_name(f".{ANN_FILE}.tmp")
    faiss.write_index(ann, str(tmp))
    (idx.index_dir / f".{ANN_FILE}.state.tmp").write_text(ann_state(idx))
    os.replace(tmp, out)
    os.replace(idx.index_dir / f".{ANN_FILE}.state.tmp", idx.index_dir / f"{ANN_FILE}.state")
    return out


def refresh_ann(index_dir: str | Path, force: bool = False) -> Path | None:
    """After an update: (re)build the approximate index when asked, when one exists (it would be stale),
    or when the index reached ANN_MIN_ROWS and faiss is installed; None when exact search stays."""
    index_dir = Path(index_dir)
    if not (force or (index_dir / ANN_FILE).exists()) and importlib.util.find_spec("faiss") is None:
        return None
    idx = load_index(index_dir, use_ann=False)
    if not (force or (index_dir / ANN_FILE).exists() or len(idx) >= ANN_MIN_ROWS):
        return None
    return write_ann(idx) if load_ann(idx) is None else index_dir / ANN_FILE


def load_ann(idx: LoadedIndex, required: bool = False):
    """The saved approximate index when it matches idx's rows (else None, or SearchError if required)."""
    path, state = idx.index_dir / ANN_FILE, idx.index_dir / f"{ANN_FILE}.state"
    current = path.is_file() and state.is_file() and state.read_text() == ann_state(idx)
    if not current:
        if required:
            raise SearchError(f"{idx.index_dir}: no up-to-date approximate index (rerun `clipft index` with --ann)")
        return None
    return _faiss().read_index(str(path))


# --------------------------------------------------------------------------- for the CLI and the server

def model_source(source: str) -> str:
    """What an index records to reload its model: an existing local path made absolute (so queries work
    from any folder), a hub name as given."""
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() else source


def load_query_model(idx: LoadedIndex, device: str = "cpu", query_encoder: str | None = None):
    """The model that built idx (from its recorded source), refused if its fingerprint changed since.
    query_encoder: text queries go through this encoder instead (clipft.query_encoder)."""
    from ..inference import load  # the model loader; deferred so index/query stay importable without it
    source = idx.info.get("model_source", "")
    model = load(source, device=device, text_encoder=query_encoder)
    if model.fingerprint != idx.info.get("fingerprint"):
        raise SearchError(f"{idx.index_dir}: the model at {source} changed since this index was built "
                          f"(fingerprint {model.fingerprint}, index {idx.info.get('fingerprint')}); "
                          f"rerun `clipft index` with --rebuild")
    return model


def embed_query_image(model, path: str | Path) -> torch.Tensor:
    """One image file as a query vector [D]; a SearchError naming the file when it does not decode.
    The same preprocessing as the index (`embed.embed_paths`): clipft.preprocess's one rule (JPEG
    draft decoding, transparency on white), so a file embeds as its own indexed copy."""
    from ..preprocess import preprocess_file
    pixels, reason = preprocess_file(path, model.preprocess, getattr(model, "draft_size", None))
    if pixels is None:
        raise SearchError(f"{path}: not a readable image ({reason})")
    return model.encode_pixels(pixels[None])[0]


def answer(idx: LoadedIndex, model, k: int, text: str | None = None, image: str | Path | None = None) -> dict:
    """One text or example-image query, in the HTTP API's shape: {"results", "model", "took_ms"}."""
    t0 = time.perf_counter()
    q = embed_query_image(model, image) if image is not None else model.encode_texts([text])[0]
    return results_answer(idx, top_k(idx, q, k), t0)


def results_answer(idx: LoadedIndex, hits: list[Hit], t0: float) -> dict:
    return {"results": [h.as_dict() for h in hits], "model": idx.model,
            "took_ms": round((time.perf_counter() - t0) * 1000, 2)}


def duplicates_answer(idx: LoadedIndex, threshold: float, groups: list[list[int]] | None = None) -> dict:
    """{"groups": [[{"id", "path"}, ...], ...], "model", "threshold"} (groups: rows, computed if None)."""
    groups = duplicate_groups(idx, threshold) if groups is None else groups
    return {"groups": [[{"id": int(idx.ids[r]), "path": idx.paths[r]} for r in g] for g in groups],
            "model": idx.model, "threshold": threshold}


def format_answer(out: dict) -> str:
    """The terminal form of `answer` / `duplicates_answer`: score and path per line, or groups."""
    if "groups" in out:
        return "\n\n".join("\n".join(f["path"] for f in g) for g in out["groups"]) or "no near-duplicates"
    return "\n".join(f"{h['score']:7.4f}  {h['path']}" for h in out["results"]) or "(the index is empty)"
