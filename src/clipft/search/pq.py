"""The compressed approximate index for very large collections: faiss IVF-PQ, memory-mapped, with the
stored float16 rows re-ranking its candidates exactly.

Why: exact search reads N x D x 2 bytes per query (100M x 512 float16 = 100 GB) and IVF-Flat keeps a
float32 copy of every row in RAM (200 GB). IVF-PQ stores M one-byte codes per row (M = D / 8: 64
bytes for 512-d, 1/16 of float16), so 100M rows fit in ~6.4 GB that the query side memory-maps
(faiss IO_FLAG_MMAP: pages load on demand and are shared between processes). PQ scores are
approximations; the top `rerank x k` PQ candidates are therefore rescored in float32 from the
float16 shard rows (a few hundred random row reads per query), which is where the recall comes back.

Files beside the index database:
    ann-pq.faiss          faiss "IVF{nlist},PQ{M}x{nbits}", inner product; faiss ids = the SQLite ids
    ann-pq.members.npy    [n, 2] int64: (id, first 60 bits of the file's sha256) of every row in it,
                          so a rerun of `clipft index` adds new rows, removes deleted or changed ones
                          (faiss remove_ids), and retrains only when the collection outgrew its sample
    ann.json              kind "pq", nlist, M, nbits, nprobe, rerank and the measured recall@10
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

PQ_FILE = "ann-pq.faiss"
PQ_MEMBERS = "ann-pq.members.npy"
PQ_MIN_ROWS = 5_000_000  # automatic above this (see docs/search-at-scale.md for the measurements)
PQ_RERANK = 10  # PQ candidates re-ranked exactly per result wanted (top 10 x k)
PQ_RERANK_MAX = 80  # calibration deepens the re-ranking up to this when all cells are not enough
PQ_TRAIN_MAX = 65_536  # training sample cap: 64 x 256-centroid k-means on it take ~1 min on 2 cores
PQ_KMEANS_ITERS = 10  # k-means iterations (faiss: 25); the recall calibration absorbs the difference
PQ_RETRAIN_GROWTH = 4  # retrain from scratch once the collection is 4x the size it was trained at
EXACT_BLOCK = 65_536  # rows widened to float32 at a time by `exact_topk`


def pq_params(n: int, d: int) -> dict:
    """Default shape for n rows of d dims: nlist = sqrt(n) rounded to a power of two (at most n / 39
    so that each cell gets its 39 training points), M = the largest divisor of d <= d / 8 (8 dims per
    one-byte code), nbits = 8 (256 centroids per sub-quantizer), fewer when n is tiny."""
    nlist = max(1, min(max(1, n // 39), 2 ** round(math.log2(max(1.0, math.sqrt(n))))))
    m = max(x for x in range(1, max(1, d // 8) + 1) if d % x == 0)
    nbits = max(1, min(8, int(math.log2(max(2, n // 4)))))
    return {"nlist": nlist, "m": m, "nbits": nbits}


def _f32(block) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(block, dtype=np.float32))


def build_pq(emb: torch.Tensor | np.ndarray, ids: np.ndarray, nlist: int | None = None, m: int | None = None,
             nbits: int | None = None, seed: int = 0, train_max: int = PQ_TRAIN_MAX):
    """A trained faiss IVF-PQ index (`index_factory`, inner product) holding emb [N, D] under `ids` [N].
    Trained on a seeded sample of at most `train_max` rows; rows are added in float32 blocks so a
    float16 memory map is never widened whole."""
    from .faiss_lib import _faiss
    faiss = _faiss()
    x = emb.numpy() if isinstance(emb, torch.Tensor) else emb
    n, d = x.shape
    p = pq_params(n, d)
    nlist, m, nbits = nlist or p["nlist"], m or p["m"], nbits or p["nbits"]
    index = faiss.index_factory(d, f"IVF{nlist},PQ{m}x{nbits}", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    # the coarse k-means wants >= 39 points per cell: 40 x nlist rows even above train_max
    sample = np.sort(rng.choice(n, size=min(n, max(train_max, 40 * nlist)), replace=False))
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    for cp in (ivf.cp, ivf.pq.cp):
        cp.seed = seed
        cp.min_points_per_centroid = 1  # a small collection: no stderr warning per sub-quantizer
        cp.niter = PQ_KMEANS_ITERS
    ivf.pq.cp.max_points_per_centroid = 64  # each 8-d sub-quantizer: 16k points are plenty, and 4x faster
    index.train(_f32(x[sample]))
    add_rows(index, x, np.asarray(ids, dtype=np.int64), np.arange(n))
    return index


def add_rows(index, emb, ids: np.ndarray, rows: np.ndarray, block: int = EXACT_BLOCK) -> None:
    for s in range(0, len(rows), block):
        r = rows[s:s + block]
        index.add_with_ids(_f32(emb[r]), np.ascontiguousarray(ids[r], dtype=np.int64))


def exact_topk(emb, queries: torch.Tensor, k: int, block: int = EXACT_BLOCK) -> np.ndarray:
    """Rows [Q, k] of the exact top k of queries [Q, D] over emb [N, D] (float16 or float32, a memory
    map is fine), scored in float32 block by block: what recall is measured against."""
    q = queries.float()
    best_s = torch.full((len(q), 0), -float("inf"))
    best_r = torch.zeros((len(q), 0), dtype=torch.long)
    for s in range(0, len(emb), block):
        x = torch.from_numpy(_f32(emb[s:s + block]))
        sc = q @ x.T  # [Q, block]
        cat_s = torch.cat([best_s, sc], 1)
        cat_r = torch.cat([best_r, torch.arange(s, s + len(x)).expand(len(q), -1)], 1)
        top = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1)
        best_s, best_r = top.values, torch.gather(cat_r, 1, top.indices)
    return best_r.numpy()


class PQSearcher:
    """What `query.top_k` calls as `idx.ann`: search(x [Q, D], k) -> (scores [Q, k], rows [Q, k]),
    rows = positions in the loaded index (-1 when fewer than k exist). Each query takes the top
    rerank x k PQ candidates (faiss ids), maps them to rows, and scores them in float32 from the
    stored rows, so a returned score is the exact cosine (tests/search/test_pq.py)."""

    def __init__(self, index, emb, ids: np.ndarray, rerank: int = PQ_RERANK):
        from .faiss_lib import _faiss
        self.index, self.emb, self.ids, self.rerank = index, emb, np.asarray(ids), rerank
        self.ivf = _faiss().downcast_index(_faiss().extract_index_ivf(index))

    @property
    def nprobe(self) -> int:
        return int(self.ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.ivf.nprobe = int(value)

    @property
    def nlist(self) -> int:
        return int(self.ivf.nlist)

    def candidates(self, x: np.ndarray, k: int) -> np.ndarray:
        """PQ-only search: rows [Q, k] (-1 where missing), no re-ranking."""
        _, fid = self.index.search(_f32(x), k)  # [Q, k] faiss ids = SQLite ids
        if not len(self.ids):
            return np.full(fid.shape, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, fid), 0, len(self.ids) - 1)  # ids are ascending
        return np.where((fid >= 0) & (self.ids[pos] == fid), pos, -1)

    def search(self, x, k: int) -> tuple[np.ndarray, np.ndarray]:
        x = _f32(x)
        cand = self.candidates(x, max(k, self.rerank * k))  # [Q, C]
        scores = np.full((len(x), k), -np.inf, dtype=np.float32)
        rows = np.full((len(x), k), -1, dtype=np.int64)
        for i, c in enumerate(cand):
            c = np.unique(c[c >= 0])  # ascending rows = ascending ids: ties come out by id
            if not len(c):
                continue
            s = _f32(self.emb[c]) @ x[i]  # [C] exact float32 cosines of the stored rows
            order = np.lexsort((c, -s))[:k]
            scores[i, :len(order)], rows[i, :len(order)] = s[order], c[order]
        return scores, rows


def pq_recall(searcher: PQSearcher, queries: torch.Tensor, exact: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(recall@k of the PQ candidates alone, recall@k after re-ranking) against exact rows [Q, k]."""
    x = _f32(queries.float().numpy())
    before = searcher.candidates(x, k)
    _, after = searcher.search(x, k)
    rec = lambda found: float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), exact.tolist())]))  # noqa: E731
    return rec(before), rec(after)


def calibrate_pq(searcher: PQSearcher, queries: torch.Tensor, exact: np.ndarray, target: float,
                 k: int = 10) -> tuple[float, float]:
    """Until the re-ranked recall@k reaches `target`: double nprobe while that helps (a doubling that
    gains < 0.005 is undone: the misses are then the codes' error, not unvisited cells), then double
    the re-rank depth (up to PQ_RERANK_MAX), then nprobe again (up to every cell). Returns (recall
    before re-ranking, after) at the values kept. Measured on 1M synthetic rows
    (docs/search-at-scale.md): recall stopped at 0.853 from 512 of 1,024 cells on, so more cells only cost time."""
    before, after = pq_recall(searcher, queries, exact, k)
    while after < target and searcher.nprobe < searcher.nlist:
        searcher.nprobe = min(searcher.nlist, 2 * searcher.nprobe)
        b2, a2 = pq_recall(searcher, queries, exact, k)
        if a2 < after + 0.005:
            searcher.nprobe = max(1, searcher.nprobe // 2)
            break
        before, after = b2, a2
    while after < target and searcher.rerank < PQ_RERANK_MAX:
        searcher.rerank = min(PQ_RERANK_MAX, 2 * searcher.rerank)
        before, after = pq_recall(searcher, queries, exact, k)
    while after < target and searcher.nprobe < searcher.nlist:
        searcher.nprobe = min(searcher.nlist, 2 * searcher.nprobe)
        before, after = pq_recall(searcher, queries, exact, k)
    return before, after


def members_of(ids: np.ndarray, sha256) -> np.ndarray:
    """[n, 2] int64 (id, 60 bits of the content hash): what the PQ file holds."""
    h = np.fromiter((int(s[:15], 16) if s else 0 for s in sha256), dtype=np.int64, count=len(sha256))  # streamed
    return np.stack([np.asarray(ids, dtype=np.int64), h], axis=1) if len(h) else np.zeros((0, 2), np.int64)


def sync_pq(index, old: np.ndarray, new: np.ndarray, emb) -> tuple[int, int]:
    """Bring a loaded (not memory-mapped) PQ index from members `old` to `new` ([n, 2] each; new in
    row order): remove ids gone or whose content changed, add new and changed rows. Returns
    (added, removed)."""
    old_map = {int(i): int(h) for i, h in old}
    new_map = {int(i): int(h) for i, h in new}
    gone = np.array([i for i, h in old_map.items() if new_map.get(i) != h], dtype=np.int64)
    add = np.array([r for r, (i, h) in enumerate(new.tolist()) if old_map.get(i) != h], dtype=np.int64)
    if len(gone):
        index.remove_ids(gone)
    if len(add):
        add_rows(index, emb, new[:, 0], add)
    return len(add), len(gone)


def atomic_write_index(index, path: Path) -> None:
    from .faiss_lib import _faiss
    tmp = path.with_name(f".{path.name}.tmp")
    _faiss().write_index(index, str(tmp))
    os.replace(tmp, path)


def atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)
