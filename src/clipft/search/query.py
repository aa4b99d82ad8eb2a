"""Queries against a loaded index: exact top-k by one matrix product, near-duplicate groups, and an
optional approximate (faiss IVF) index for collections where the exact product stops being fast.

Every embedding is L2-normalised, so a dot product is a cosine similarity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .faiss_lib import _faiss
from .index import IndexColumn, SearchError, connect, index_rows, load_shard, read_info

ANN_FILE = "ann.faiss"
ANN_INFO = "ann.json"  # its settings and the recall@10 measured when it was built
ANN_MIN_ROWS = 200_000  # below this the exact product answers in a few ms (see benchmarks/search.py)
ANN_PROBE_FRACTION = 1 / 3  # cells an approximate query scans by default (see build_ann)
ANN_TARGET_RECALL = 0.95  # recall@10 of text queries against exact search the automatic index must keep
# Everyday photo-search queries, embedded by `clipft index` to measure (and calibrate) the approximate
# index's recall on text queries, which lie outside the image cloud unlike copies of indexed images.
CALIBRATION_TEXTS = (
    "a dog", "a cat on a sofa", "a child playing", "people at a party", "a birthday cake", "a beach at sunset",
    "snowy mountains", "a city street at night", "a car", "a bicycle", "a plate of food", "a cup of coffee",
    "flowers in a garden", "a forest path", "a lake", "a boat on the water", "a bird", "a horse", "a wedding",
    "a family photo", "a selfie", "a screenshot", "a document", "a receipt", "a building", "a bridge",
    "a train", "an airplane", "a football match", "a concert", "a christmas tree", "a baby", "a kitchen",
    "a living room", "a bedroom", "a book", "a laptop", "a phone", "a map", "a painting", "a statue",
    "a red car", "a blue sky with clouds", "rain", "fireworks", "a tent in the woods", "a swimming pool",
    "a museum", "a market", "an old photograph")
DUPLICATE_CHUNK = 2048  # rows of the [chunk, N] similarity block held at once by `duplicate_groups`
FP16_MARGIN = 4e-3  # float16-product scores this close to the k-th are rescored in float32 (see _exact_scores)
SCORE_BLOCK = 8192  # float16 rows widened at a time by `scores_of`: [8192, 512] float32 = 16 MB, reused


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

    Loaded from disk, `paths` and `sha256` are `IndexColumn`s: sequences that look each value up in
    the index's SQLite database by id when asked, so memory holds the embeddings and 8 bytes of id
    per row, never a string per row (an index of 100M photos would need tens of GB for those).
    Built in memory (tests, benchmarks) they may be plain lists.

    float16 (the default storage) halves the bytes one query's product reads (a CPU matrix-vector
    product is bound by memory). Scores are float32 products of the float16 rows (`_exact_scores`),
    so the only error left is the rows' own float16 rounding: within 1e-4 of exact float32 search
    (measured ~1e-5 on clustered 512-d rows; tests/search/test_query.py checks 1e-4), and the top-k
    ids equal float32's except where two exact scores are that close. Ties: by id, ascending."""
    index_dir: Path
    root: Path
    info: dict[str, str]
    ids: np.ndarray
    paths: Sequence[str]
    sha256: Sequence[str]
    emb: torch.Tensor
    ann: object | None = None
    _order: np.ndarray | None = field(default=None, repr=False)  # argsort of ids when they are not ascending

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if len(self.ids) > 1 and not bool(np.all(self.ids[1:] > self.ids[:-1])):
            self._order = np.argsort(self.ids, kind="stable")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def model(self) -> str:
        return self.info.get("model", "?")

    def row_of(self, image_id: int) -> int:
        """Row of an indexed id (a binary search of ids); KeyError for an id that is not in the index."""
        if not isinstance(image_id, (int, np.integer)) or not -2**63 <= int(image_id) < 2**63:
            raise KeyError(image_id)
        keys = self.ids if self._order is None else self.ids[self._order]
        r = int(np.searchsorted(keys, image_id))
        if r >= len(keys) or keys[r] != image_id:
            raise KeyError(image_id)
        return r if self._order is None else int(self._order[r])

    def row_of_path(self, path: str) -> int | None:
        if isinstance(self.paths, IndexColumn):
            return self.paths.row_of(path)  # one indexed SQLite lookup
        try:
            return self.paths.index(path)
        except ValueError:
            return None

    def paths_of(self, rows) -> list[str | None]:
        """The paths of `rows` in one lookup; None for a file removed from the index since the load."""
        if isinstance(self.paths, IndexColumn):
            return self.paths.take(rows)
        return [self.paths[int(r)] for r in rows]


def load_index(index_dir: str | Path, use_ann: bool | None = None, mmap: bool = False) -> LoadedIndex:
    """Read an index written by `update_index`. `use_ann`: None = use ann.faiss when present and
    current, True = require it, False = exact only. mmap: map the compacted rows instead of copying
    them (always so under an IVF-PQ index)."""
    index_dir = Path(index_dir)
    conn = connect(index_dir, readonly=True)
    try:
        info = read_info(conn)
        ids, where = index_rows(conn)  # ids [N]; per shard (name, positions, rows): int64 arrays only
    finally:
        conn.close()
    dim = int(info.get("embed_dim", 0))
    if len(ids) and len(where) == 1 and np.array_equal(where[0][2], np.arange(len(ids))):
        only = load_shard(index_dir, where[0][0])
        # compacted: one shard in id order; a copy, or under the PQ index (built for collections
        # beyond RAM) a copy-on-write memory map that re-ranking reads a few rows of per query
        emb = (np.load(only.filename, mmap_mode="c") if mmap or (ann_info(index_dir).get("kind") == "pq"
               and use_ann is not False) else np.array(only))
    elif len(ids):  # a killed run's chunks: still a complete, searchable index
        first = load_shard(index_dir, where[0][0])
        emb = np.empty((len(ids), first.shape[1]), dtype=first.dtype)  # [N, D]
        for shard, positions, rows in where:
            emb[positions] = load_shard(index_dir, shard)[rows]
    else:
        emb = np.zeros((0, dim), dtype=info.get("dtype", "float32"))
    del where
    idx = LoadedIndex(index_dir=index_dir.resolve(), root=Path(info.get("root", ".")), info=info, ids=ids,
                      paths=IndexColumn(index_dir, "path", ids), sha256=IndexColumn(index_dir, "sha256", ids),
                      emb=torch.from_numpy(emb if isinstance(emb, np.memmap) else np.ascontiguousarray(emb)))
    if use_ann is not False:
        idx.ann = load_ann(idx, required=bool(use_ann))
    return idx


def scores_of(emb: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine of every row of emb [N, D] (float16 or float32) with query [D]: [N] float32. float16 rows
    are widened block by block (SCORE_BLOCK rows), so the product and its sums run in float32 while
    the rows are still read once, at float16's 2 bytes a value."""
    q = query.float()
    if emb.dtype == torch.float32:
        return emb @ q
    out = torch.empty(len(emb), dtype=torch.float32)
    buf = torch.empty(min(len(emb), SCORE_BLOCK), emb.shape[1], dtype=torch.float32)  # reused: no page faults
    for s in range(0, len(emb), SCORE_BLOCK):
        block = buf[:len(emb[s:s + SCORE_BLOCK])]
        block.copy_(emb[s:s + SCORE_BLOCK])  # [block, D] float16 -> float32
        torch.mv(block, q, out=out[s:s + SCORE_BLOCK])
    return out


def _ranked(scores: np.ndarray, rows: np.ndarray) -> list[tuple[float, int]]:
    """(score, row) pairs by score descending, then row ascending: equal scores (copies of one photo)
    always come back in the same order, by id (rows are in id order)."""
    order = np.lexsort((rows, -scores))
    return [(float(scores[i]), int(rows[i])) for i in order]


def _exact_scores(emb: torch.Tensor, query: torch.Tensor, want: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [M], float32 scores [M]) holding every row whose score can reach the top `want`.
    float16 rows: one float16 product ranks them (memory-bound, as fast as the storage allows; error
    measured ~3e-4, from rounding its float16 output), then the rows within FP16_MARGIN of the
    want-th are rescored in float32 (`scores_of`). FP16_MARGIN is over 10x that error, and if a
    candidate's float16 score is off by more than a quarter of it (a platform whose float16 product
    accumulates in float16), every row is scored in float32 instead."""
    if emb.dtype == torch.float16:
        rough = (emb @ query.to(torch.float16)).float()  # [N]
        kth = float(torch.topk(rough, want).values[-1])
        rows = torch.nonzero(rough >= kth - FP16_MARGIN).flatten()  # [M >= want]
        scores = scores_of(emb[rows], query)
        if float((scores - rough[rows]).abs().max()) <= FP16_MARGIN / 4:
            return rows, scores
    return torch.arange(len(emb)), scores_of(emb, query)


def top_k(idx: LoadedIndex, query: torch.Tensor, k: int, exclude: int | None = None) -> list[Hit]:
    """The k rows most similar to one query vector [D]: approximate when idx.ann is set, else exact
    (`_exact_scores`: float32 scores of the stored rows). `exclude` leaves one row out (the query
    image itself). Order: score descending, then id ascending."""
    n = len(idx)
    want = min(k + (exclude is not None), n)
    if want <= 0:
        return []
    if idx.ann is not None:
        scores, rows = _ann_search(idx.ann, query, want)
        ranked = _ranked(np.array(scores, dtype=np.float32), np.array(rows, dtype=np.int64))
    else:
        rows, scores = _exact_scores(idx.emb, query, want)  # [M], [M]
        kth = float(torch.topk(scores, want).values[-1])
        # every row tied with the k-th score, so that which of them make the cut does not depend on
        # topk's internal order
        keep = scores >= kth
        ranked = _ranked(scores[keep].numpy(), rows[keep].numpy())[:want]
    ranked = [(s, r) for s, r in ranked if r >= 0 and r != exclude][:k]
    paths = idx.paths_of([r for _, r in ranked])  # the k hits' paths only, in one lookup
    return [Hit(int(idx.ids[r]), p, s) for (s, r), p in zip(ranked, paths) if p is not None]


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

def build_ann(emb: torch.Tensor, nlist: int | None = None, nprobe: int | None = None, seed: int = 0):
    """A faiss IVF-Flat inner-product index over emb [N, D]: k-means into `nlist` cells (default
    sqrt(N)), trained on 40 sampled points per cell (faiss wants >= 39), `nprobe` cells scanned per
    query (default: a third of them, ANN_PROBE_FRACTION), so a query reads about nprobe / nlist of
    the rows. Why a third: text queries lie outside the image cloud (CLIP's modality gap), so their
    neighbours spread over many cells; on synthetic clustered data with such a gap, 32 of 447 cells
    found 0.87 of the exact top 10 while copies of indexed rows found 1.0 (benchmarks/search.py;
    tests/search/test_query.py checks >= 0.95 at the defaults)."""
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
    ann.nprobe = min(nlist, nprobe or max(1, math.ceil(nlist * ANN_PROBE_FRACTION)))
    return ann


def ann_recall(ann, emb: torch.Tensor, queries: torch.Tensor, k: int = 10) -> float:
    """Mean recall@k of `ann` against exact search over emb [N, D] for queries [Q, D]."""
    exact = torch.topk(queries.float() @ emb.float().T, min(k, len(emb)), dim=1).indices.numpy()  # [Q, k]
    _, found = ann.search(np.ascontiguousarray(queries.float().numpy()), exact.shape[1])  # [Q, k]
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(found.tolist(), exact.tolist())]))


def calibrate_ann(ann, emb: torch.Tensor, queries: torch.Tensor, target: float = ANN_TARGET_RECALL,
                  k: int = 10) -> float:
    """Raise ann.nprobe (doubling, up to every cell: exact) until the queries' recall@k reaches
    `target`; returns the recall measured at the nprobe kept."""
    recall = ann_recall(ann, emb, queries, k)
    while recall < target and ann.nprobe < ann.nlist:
        ann.nprobe = min(ann.nlist, 2 * ann.nprobe)
        recall = ann_recall(ann, emb, queries, k)
    return recall


def _ann_search(ann, query: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    scores, rows = ann.search(np.ascontiguousarray(query.float().numpy()[None]), k)  # [1, k] each
    return scores[0].tolist(), rows[0].tolist()


def ann_state(idx: LoadedIndex) -> str:
    """What the ANN file must match: the rows it was built from (ids and contents)."""
    h = hashlib.sha256(idx.info.get("fingerprint", "").encode() + idx.ids.tobytes())
    for s in idx.sha256:  # streamed from the database in id order (IndexColumn): no list of all hashes
        h.update(s.encode())
    return h.hexdigest()[:16]


def proxy_queries(emb: torch.Tensor, n: int = 200, seed: int = 0) -> torch.Tensor:
    """Held-out-style queries [n, D] when no text encoder is at hand: rows with the collection's mean
    direction taken out (text embeddings do not share the image cloud's mean), plus noise of equal
    norm, renormalised. Easier than real text queries (they stay nearer their rows), so a recall
    measured on them is labelled as such."""
    g = torch.Generator().manual_seed(seed)
    x = emb.float()
    rows = x[torch.randint(len(x), (n,), generator=g)] - x.mean(0)
    noise = torch.randn(n, x.shape[1], generator=g)
    return torch.nn.functional.normalize(torch.nn.functional.normalize(rows, dim=1)
                                         + torch.nn.functional.normalize(noise, dim=1), dim=1)


def write_ann(idx: LoadedIndex, text_queries: torch.Tensor | None = None) -> Path:
    """Build the approximate index for idx and save it beside the database (temp file + rename), with
    ANN_INFO: its cells, nprobe, and recall@10 against exact search measured now, on `text_queries`
    [Q, D] (nprobe raised until they reach ANN_TARGET_RECALL) or else on `proxy_queries`."""
    import json
    faiss = _faiss()
    ann = build_ann(idx.emb)
    if text_queries is not None and len(text_queries):
        queries, label = text_queries, f"{len(text_queries)} text queries"
    else:
        queries, label = proxy_queries(idx.emb), "200 synthetic held-out queries (no text encoder)"
    recall = calibrate_ann(ann, idx.emb, queries)
    out = idx.index_dir / ANN_FILE
    tmp = out.with_name(f".{ANN_FILE}.tmp")
    faiss.write_index(ann, str(tmp))
    info = {"nlist": int(ann.nlist), "nprobe": int(ann.nprobe), "recall_at_10": round(recall, 4), "queries": label,
            "rows": len(idx)}
    (idx.index_dir / f".{ANN_INFO}.tmp").write_text(json.dumps(info))
    (idx.index_dir / f".{ANN_FILE}.state.tmp").write_text(ann_state(idx))
    os.replace(tmp, out)
    os.replace(idx.index_dir / f".{ANN_INFO}.tmp", idx.index_dir / ANN_INFO)
    os.replace(idx.index_dir / f".{ANN_FILE}.state.tmp", idx.index_dir / f"{ANN_FILE}.state")
    return out


def ann_info(index_dir: str | Path) -> dict:
    """What write_ann recorded ({} for an index built before it recorded anything)."""
    import json
    try:
        return json.loads((Path(index_dir) / ANN_INFO).read_text())
    except (OSError, ValueError):
        return {}


def ann_report(index_dir: str | Path) -> str:
    """One line on the approximate index: its settings and measured recall."""
    info = ann_info(index_dir)
    if not info:
        return f"approximate index (faiss IVF) up to date: {Path(index_dir) / ANN_FILE} (recall not recorded)"
    if info.get("kind") == "pq":
        return (f"approximate index (faiss IVF-PQ, {info['m']} x {info['nbits']}-bit codes, {info['nprobe']} of "
                f"{info['nlist']} cells scanned, top {info['rerank']} x k re-ranked exactly) up to date: "
                f"{Path(index_dir) / _ann_file('pq')}; recall@10 against exact search {info['recall_at_10']:.3f} "
                f"({info['recall_at_10_before_rerank']:.3f} before re-ranking) on {info['queries']} "
                f"(`clipft search --exact` for exact)")
    return (f"approximate index (faiss IVF, {info['nprobe']} of {info['nlist']} cells scanned per query) up to "
            f"date: {Path(index_dir) / ANN_FILE}; recall@10 against exact search {info['recall_at_10']:.3f} "
            f"on {info['queries']} (`clipft search --exact` for exact)")


ANN_KINDS = ("flat", "pq")


def _ann_file(kind: str) -> str:
    from .pq import PQ_FILE
    return PQ_FILE if kind == "pq" else ANN_FILE


def _existing_kind(index_dir: Path) -> str | None:
    from .pq import PQ_FILE
    if (index_dir / PQ_FILE).exists():
        return "pq"
    return "flat" if (index_dir / ANN_FILE).exists() else None


def refresh_ann(index_dir: str | Path, force: bool | str = False, text_queries=None) -> Path | None:
    """After an update: (re)build the approximate index when asked, when one exists (it would be stale),
    or when the index reached ANN_MIN_ROWS and faiss is installed; None when exact search stays.
    force: True or "flat" asks for IVF-Flat, "pq" for IVF-PQ (`pq.py`); unasked, an existing index
    keeps its kind and the collection gets IVF-PQ from PQ_MIN_ROWS rows, IVF-Flat from ANN_MIN_ROWS.
    An IVF-PQ index is updated in place (rows added and removed); IVF-Flat is rebuilt.
    text_queries: a callable giving [Q, D] text embeddings to measure recall on, called only to build."""
    from .pq import PQ_MIN_ROWS
    index_dir = Path(index_dir)
    kind = "flat" if force is True else (force or None)
    if kind is not None and kind not in ANN_KINDS:
        raise SearchError(f"--ann must be one of {', '.join(ANN_KINDS)}, got {kind!r}")
    existing = _existing_kind(index_dir)
    if not (kind or existing) and importlib.util.find_spec("faiss") is None:
        return None
    idx = load_index(index_dir, use_ann=False, mmap=True)  # IVF-PQ reads the rows block by block
    if kind is None:
        if existing == "pq" or len(idx) >= PQ_MIN_ROWS:
            kind = "pq"
        elif existing == "flat" or len(idx) >= ANN_MIN_ROWS:
            kind = "flat"
        else:
            return None
    other = index_dir / _ann_file("flat" if kind == "pq" else "pq")
    for stale in (other, other.with_name(other.name + ".state")):
        stale.unlink(missing_ok=True)  # one approximate index at a time: the kind asked for now
    if kind == "pq":
        if ann_info(index_dir).get("kind") == "pq" and load_ann(idx) is not None:
            return index_dir / _ann_file("pq")
        return write_pq(idx, text_queries)
    if ann_info(index_dir).get("kind", "flat") == "flat" and load_ann(idx) is not None:
        return index_dir / ANN_FILE
    return write_ann(idx, text_queries() if text_queries is not None else None)


def write_pq(idx: LoadedIndex, text_queries=None, **params) -> Path:
    """Create or update the IVF-PQ index of idx (`pq.py`): in place when one exists and the
    collection has not outgrown its training sample (PQ_RETRAIN_GROWTH), else trained anew; then
    nprobe is calibrated (doubled from its current value) until text queries' recall@10 after
    re-ranking reaches ANN_TARGET_RECALL, and ann.json records it with the recall before re-ranking.
    params: nlist, m, nbits, rerank for a fresh build (defaults: `pq.pq_params`, PQ_RERANK)."""
    import json
    from . import pq
    faiss = _faiss()
    d = idx.index_dir
    path, members_path = d / pq.PQ_FILE, d / pq.PQ_MEMBERS
    info, new = ann_info(d), pq.members_of(idx.ids, idx.sha256)
    rerank = int(params.pop("rerank", info.get("rerank", pq.PQ_RERANK)))
    index = None
    if (not params and info.get("kind") == "pq" and path.is_file() and members_path.is_file()
            and len(idx) <= pq.PQ_RETRAIN_GROWTH * max(1, int(info.get("trained_rows", 0)))):
        index = faiss.read_index(str(path))  # whole, writable: a memory map cannot be changed
        added, removed = pq.sync_pq(index, np.load(members_path), new, idx.emb.numpy())
    if index is None:
        index = pq.build_pq(idx.emb.numpy(), idx.ids, **params)
        info = {"trained_rows": len(idx), "nprobe": max(1, math.ceil(faiss.extract_index_ivf(index).nlist / 64))}
    searcher = pq.PQSearcher(index, idx.emb.numpy(), idx.ids, rerank=rerank)
    searcher.nprobe = min(searcher.nlist, int(info.get("nprobe", 1)))
    qs = text_queries() if text_queries is not None else None
    if qs is not None and len(qs):
        label = f"{len(qs)} text queries"
    else:
        qs, label = proxy_queries(idx.emb), "200 synthetic held-out queries (no text encoder)"
    exact = pq.exact_topk(idx.emb.numpy(), qs, min(10, max(1, len(idx))))
    before, after = pq.calibrate_pq(searcher, qs, exact, ANN_TARGET_RECALL)
    ivf = searcher.ivf
    out = {"kind": "pq", "nlist": int(ivf.nlist), "m": int(ivf.pq.M), "nbits": int(ivf.pq.nbits),
           "nprobe": searcher.nprobe, "rerank": searcher.rerank, "recall_at_10": round(after, 4),
           "recall_at_10_before_rerank": round(before, 4), "queries": label, "rows": len(idx),
           "trained_rows": int(info["trained_rows"]), "bytes_per_vector": int(ivf.code_size) + 8}
    pq.atomic_write_index(index, path)
    pq.atomic_save(members_path, new)
    (d / f".{ANN_INFO}.tmp").write_text(json.dumps(out))
    (d / f".{pq.PQ_FILE}.state.tmp").write_text(ann_state(idx))
    os.replace(d / f".{ANN_INFO}.tmp", d / ANN_INFO)
    os.replace(d / f".{pq.PQ_FILE}.state.tmp", d / f"{pq.PQ_FILE}.state")
    return path


def load_ann(idx: LoadedIndex, required: bool = False):
    """The saved approximate index when it matches idx's rows (else None, or SearchError if required)."""
    info = ann_info(idx.index_dir)
    name = _ann_file(info.get("kind", "flat"))
    path, state = idx.index_dir / name, idx.index_dir / f"{name}.state"
    current = path.is_file() and state.is_file() and state.read_text() == ann_state(idx)
    if not current:
        if required:
            raise SearchError(f"{idx.index_dir}: no up-to-date approximate index (rerun `clipft index` with --ann)")
        return None
    if info.get("kind") == "pq":
        from .pq import PQSearcher
        faiss = _faiss()
        # memory-mapped: the codes stay on disk until read, shared by every process serving it
        searcher = PQSearcher(faiss.read_index(str(path), faiss.IO_FLAG_MMAP), idx.emb.numpy(), idx.ids,
                              rerank=int(info.get("rerank", 10)))
        searcher.nprobe = int(info["nprobe"])
        return searcher
    ann = _faiss().read_index(str(path))
    if "nprobe" in (info := ann_info(idx.index_dir)):
        ann.nprobe = int(info["nprobe"])  # the calibrated value, whatever the file format keeps
    return ann


# --------------------------------------------------------------------------- for the CLI and the server

def model_source(source: str) -> str:
    """What an index records to reload its model: an existing local path made absolute (so queries work
    from any folder), a hub name as given."""
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() else source


def _plain_numpy_globals() -> list:
    """The numpy globals a checkpoint's plain arrays (RNG states) pickle with: array reconstruction and
    numeric dtypes only, none of which runs code."""
    kinds = ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float16",
             "Float32", "Float64")
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype,
            *(getattr(np.dtypes, f"{k}DType") for k in kinds if hasattr(np.dtypes, f"{k}DType"))]


def check_model_source(source: str) -> None:
    """Refuse (SearchError, one line) a model source whose loading could run code: an index folder
    records its model's path, and whoever wrote the folder chose it. A file must load with
    `torch.load(weights_only=True)` (tensors, containers, numbers, plain numpy arrays); a folder is
    loaded by `clipft.load` from its config.json and safetensors weights; a hub name is left to it."""
    p = Path(source).expanduser()
    if not p.is_file() or p.suffix == ".onnx":  # an export's .onnx file is read by onnxruntime, never unpickled
        return
    try:
        with torch.serialization.safe_globals(_plain_numpy_globals()):
            torch.load(p, map_location="cpu", weights_only=True, mmap=True)  # mmap: nothing read twice
    except Exception as e:  # noqa: BLE001 - whatever the unpickler refused, the file is not plain weights
        first = (str(e).split("WeightsUnpickler error:")[-1].strip().splitlines() or [type(e).__name__])[0]
        raise SearchError(f"{p}: refused as this index's model: not plain weights (torch.load with "
                          f"weights_only=True failed: {first[:160]}); index with a folder written by "
                          f"`clipft export` instead") from None


def load_query_model(idx: LoadedIndex, device: str = "cpu", query_encoder: str | None = None):
    """The model that built idx (from its recorded source), refused if its fingerprint changed since.
    query_encoder: text queries go through this encoder instead (clipft.query_encoder)."""
    from ..inference import load  # the model loader; deferred so index/query stay importable without it
    source = idx.info.get("model_source", "")
    check_model_source(source)  # before anything unpickles it
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
    return {"groups": [[{"id": int(idx.ids[r]), "path": p} for r, p in zip(g, idx.paths_of(g))] for g in groups],
            "model": idx.model, "threshold": threshold}


def format_answer(out: dict) -> str:
    """The terminal form of `answer` / `duplicates_answer`: score and path per line, or groups."""
    if "groups" in out:
        return "\n\n".join("\n".join(f["path"] for f in g) for g in out["groups"]) or "no near-duplicates"
    return "\n".join(f"{h['score']:7.4f}  {h['path']}" for h in out["results"]) or "(the index is empty)"
