"""Loading a large index keeps no Python object per row: paths and hashes stay in SQLite and are looked
up by id for the rows a caller asks about (the hits of a query), so memory at load is the embeddings
plus a few int64 arrays."""

from __future__ import annotations

import contextlib
import sqlite3
import tracemalloc

import numpy as np
import pytest

from clipft.search.index import DB_NAME, SHARDS, IndexColumn, SearchError, connect
from clipft.search.query import load_index

N, D = 200_000, 8


def _synthetic_index(index_dir, n: int = N, shards: int = 1):
    """n rows with 40-character paths and full 64-hex hashes, written the way update_index leaves them:
    ids 1..n (every 7th id skipped, as deletions leave gaps), `shards` shards holding alternate rows."""
    index_dir.mkdir()
    (index_dir / SHARDS).mkdir()
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, D)).astype(np.float16)
    ids = np.arange(1, n + n // 6 + 2)
    ids = ids[ids % 7 != 0][:n]
    names = [f"s{k}.npy" for k in range(shards)]
    for k, name in enumerate(names):
        np.save(index_dir / SHARDS / name, emb[k::shards])
    with contextlib.closing(connect(index_dir)) as conn, conn:
        conn.executemany("INSERT INTO info VALUES (?, ?)", [("embed_dim", str(D)), ("dtype", "float16"),
                                                            ("root", str(index_dir)), ("fingerprint", "f")])
        conn.executemany("INSERT INTO files (id, path, size, mtime_ns, sha256, shard, row) "
                         "VALUES (?, ?, 1, 1, ?, ?, ?)",
                         ((int(i), f"album-{r % 97:02d}/photo-{r:09d}-abcdefghijk.jpg", f"{r:064x}",
                           names[r % shards], r // shards) for r, i in enumerate(ids)))
    return ids, emb


def test_loading_200k_rows_builds_no_per_row_python_objects(tmp_path):
    ids, emb = _synthetic_index(tmp_path / "idx")
    tracemalloc.start()
    try:
        idx = load_index(tmp_path / "idx", use_ann=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The embeddings (copied: 3.2 MB), the (id, row) pairs read from SQLite (16 bytes a row) and the ids
    # (8) are the load's memory (8 MB); a list of paths and hashes alone would be 200k x ~200 bytes = 40 MB.
    assert peak < emb.nbytes + 32 * N, f"load_index peaked at {peak / 2**20:.1f} MiB"
    assert isinstance(idx.paths, IndexColumn) and isinstance(idx.sha256, IndexColumn)
    assert np.array_equal(idx.ids, ids) and np.array_equal(idx.emb.numpy(), emb)
    # Lookups by row, by id and by path, without ever reading the whole column.
    r = 123_457
    assert idx.paths[r] == f"album-{r % 97:02d}/photo-{r:09d}-abcdefghijk.jpg" and idx.sha256[r] == f"{r:064x}"
    assert idx.paths[-1] == idx.paths[N - 1] and idx.paths_of([5, 3, 5]) == [idx.paths[5], idx.paths[3], idx.paths[5]]
    assert idx.row_of(int(ids[r])) == r and idx.row_of_path(idx.paths[r]) == r and idx.row_of_path("nope.jpg") is None
    assert idx.paths[r] in idx.paths and "nope.jpg" not in idx.paths and idx.paths.index(idx.paths[7]) == 7
    with pytest.raises(KeyError):
        idx.row_of(7)  # a deleted id
    with pytest.raises(IndexError):
        idx.paths[N]


def test_a_killed_runs_shards_load_in_id_order_and_a_removed_file_reads_as_gone(tmp_path):
    ids, emb = _synthetic_index(tmp_path / "idx", n=1000, shards=3)
    idx = load_index(tmp_path / "idx", use_ann=False)
    assert np.array_equal(idx.ids, ids) and np.array_equal(idx.emb.numpy(), emb)
    assert list(idx.paths)[:2] == [idx.paths[0], idx.paths[1]] and len(list(idx.sha256)) == 1000
    with contextlib.closing(sqlite3.connect(tmp_path / "idx" / DB_NAME)) as db, db:
        db.execute("DELETE FROM files WHERE id = ?", (int(ids[4]),))  # `clipft index` ran meanwhile
    assert idx.paths_of([3, 4]) == [idx.paths[3], None]
    with pytest.raises(SearchError, match="removed from the index after it was loaded"):
        idx.paths[4]
