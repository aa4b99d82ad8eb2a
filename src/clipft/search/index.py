"""Incremental image index of one folder: SQLite metadata plus immutable embedding shards.

An index directory (default FOLDER/.clipft-index/) holds:

    meta.sqlite         files(id, path, size, mtime_ns, sha256, shard, row)   one row per embedded image
                        unreadable(path, size, mtime_ns)                      files that did not decode
                        info(key, value)                                      root, model, fingerprint, dim, dtype
    shards/<name>.npy   [n, D] float16 or float32 L2-normalised rows, never modified once in place
    thumbs/             the thumbnail cache of `clipft serve`

Why shards: a shard is written to a temp file and renamed into place *before* the SQLite transaction
that points rows at it commits, so the database only ever references complete shards and a crash
never leaves a half-written index. A killed run keeps every chunk it committed; rerunning embeds
only what is left, and a finished run compacts all shards into one (rows in id order).

Under torchrun (`torchrun --nproc_per_node N -m clipft index ...`, gloo on CPU) rank 0 plans and
broadcasts the files to embed; rank r embeds every N-th of them (r::N), writing each chunk's shard
and then one line of parts/rank<r>.jsonl (fsync'd) naming the shard and its files; after a barrier
rank 0 merges the lines into the database in path order (the ids a single process would give) and
compacts. A killed run's lines are merged first thing by the next run, whatever its process count,
so finished chunks are never embedded again.

Ids are SQLite AUTOINCREMENT keys: a changed file keeps its id, a deleted id is never reused, so an id
in a bookmark or a cached thumbnail never names another image.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from ..backbones import file_sha256  # the one file hash (weight files, export records, index contents)
from ..embed import embed_paths, list_images

INDEX_DIRNAME = ".clipft-index"
DB_NAME = "meta.sqlite"
SHARDS = "shards"
SCHEMA_VERSION = "1"
DTYPES = ("float16", "float32")
CHUNK = 512  # images per committed chunk: the most work a kill can lose

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, shard TEXT NOT NULL,
    row INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS unreadable (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SearchError(Exception):
    """Expected failure of indexing or search (the CLI prints it as one line)."""


@dataclass
class UpdateStats:
    """What one `update_index` did; `embedded` = added + changed that decoded."""
    total: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    touched: int = 0  # size or mtime differ, content hash equal: metadata updated, not re-embedded
    unreadable: int = 0
    embedded: int = 0
    seconds: float = 0.0  # the whole update: listing, hashing, embedding, compaction
    embed_seconds: float = 0.0  # the embedding loop alone (what the progress bar shows)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.total} images ({self.added} new, {self.changed} changed, {self.removed} removed, "
                f"{self.unchanged + self.touched} unchanged, {self.unreadable} unreadable); "
                f"embedded {self.embedded} in {self.embed_seconds:.1f}s ({self.seconds:.1f}s in all, with listing, "
                f"hashing and compaction)")


def default_index_dir(folder: str | Path) -> Path:
    return Path(folder) / INDEX_DIRNAME


def connect(index_dir: Path, readonly: bool = False) -> sqlite3.Connection:
    """The index database; read-only opens fail with a SearchError when there is no index."""
    db = Path(index_dir) / DB_NAME
    if readonly:
        if not db.is_file():
            raise SearchError(f"{index_dir}: no clipft index here (build one with `clipft index FOLDER --model MODEL`)")
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            conn.execute("SELECT 1 FROM info LIMIT 1")
        except sqlite3.DatabaseError as e:
            raise SearchError(f"{db}: not a clipft index database ({e})") from None
        return conn
    Path(index_dir).mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db)
    conn.executescript(_SCHEMA)
    return conn


def read_info(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM info"))


@contextmanager
def _write_lock(index_dir: Path) -> Iterator[None]:
    """One writer per index: a second `clipft index` on it stops with one line instead of interleaving."""
    Path(index_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(index_dir) / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SearchError(f"{index_dir}: another `clipft index` is writing this index") from None
        yield


def _write_shard(index_dir: Path, emb: np.ndarray) -> str:
    """Write [n, D] rows as a new immutable shard (temp file + rename); returns its name."""
    shard_dir = Path(index_dir) / SHARDS
    shard_dir.mkdir(parents=True, exist_ok=True)
    name = f"{uuid.uuid4().hex}.npy"
    tmp = shard_dir / f".{name}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, emb)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, shard_dir / name)
    return name


def load_shard(index_dir: Path, name: str) -> np.ndarray:
    return np.load(Path(index_dir) / SHARDS / name, mmap_mode="r")


COLUMN_BATCH = 900  # ids per SQLite statement when a column is read in bulk (the oldest SQLite takes 999)


class IndexColumn(Sequence):
    """One text column of the files table ("path" or "sha256") seen as a read-only sequence over the
    rows of a loaded index: item r is the value of the file with id ids[r]. Nothing is held per row:
    each access asks SQLite by primary key (O(log n)), so loading an index of 100M photos builds no
    100M Python strings; a query looks up its k hits only (`take`, one statement).

    Ids are never reused and a file keeps its id and path for life, so a lookup after a concurrent
    `clipft index` still names the same file; a file removed since the load has no value any more
    (`take` gives None, indexing raises SearchError)."""

    def __init__(self, index_dir: Path, column: str, ids: np.ndarray):
        if column not in ("path", "sha256"):
            raise ValueError(f"not a text column of the index: {column!r}")
        self._db, self._column, self._ids = Path(index_dir) / DB_NAME, column, ids
        self._local = threading.local()  # one read-only connection per thread (sqlite3's rule)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():  # never a connection across fork
            conn = sqlite3.connect(f"file:{self._db}?mode=ro", uri=True)
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def __len__(self) -> int:
        return len(self._ids)

    def take(self, rows) -> list[str | None]:
        """The values of `rows` (any order, repeats allowed), None for a file removed since the load."""
        rows = [int(r) for r in rows]
        ids = [int(self._ids[r]) for r in rows]
        found: dict[int, str] = {}
        for s in range(0, len(ids), COLUMN_BATCH):
            part = sorted(set(ids[s:s + COLUMN_BATCH]))
            found.update(self._conn().execute(
                f"SELECT id, {self._column} FROM files WHERE id IN ({','.join('?' * len(part))})", part))
        return [found.get(i) for i in ids]

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [v for v in self.take(range(*row.indices(len(self))))]
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows")
        value = self.take([row % len(self)])[0]
        if value is None:
            raise SearchError(f"{self._db.parent}: image id {int(self._ids[row])} was removed from the index "
                              "after it was loaded; load the index again")
        return value

    def __iter__(self) -> Iterator[str]:
        """Every value in row (= id) order, read COLUMN_BATCH rows at a time."""
        for s in range(0, len(self), COLUMN_BATCH):
            yield from self[s:s + COLUMN_BATCH]

    def row_of(self, value: str) -> int | None:
        """The row holding `value` (the first, for a repeated hash), None if none does."""
        hits = self._conn().execute(f"SELECT id FROM files WHERE {self._column} = ? ORDER BY id", (value,))
        for (fid,) in hits:
            r = int(np.searchsorted(self._ids, fid))
            if r < len(self._ids) and self._ids[r] == fid:
                return r
        return None

    def index(self, value, start: int = 0, stop: int | None = None) -> int:
        r = self.row_of(value)
        if r is None or r < start or (stop is not None and r >= stop):
            raise ValueError(f"{value!r} is not in the index")
        return r

    def __contains__(self, value) -> bool:
        return isinstance(value, str) and self.row_of(value) is not None


def index_rows(conn: sqlite3.Connection) -> tuple[np.ndarray, list[tuple[str, np.ndarray, np.ndarray]]]:
    """(ids [N] int64 ascending, [(shard, positions [n_s], rows [n_s]), ...]): where the embedding of
    the file at each position lies, read from SQLite into int64 arrays (16 bytes a row while reading,
    no Python object per row)."""
    n = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    pairs = np.fromiter(itertools.chain.from_iterable(conn.execute("SELECT id, row FROM files ORDER BY id")),
                        dtype=np.int64, count=2 * n).reshape(n, 2)  # [N, (id, row)]
    ids = np.ascontiguousarray(pairs[:, 0])
    shards = [s for (s,) in conn.execute("SELECT DISTINCT shard FROM files")]
    if len(shards) == 1:
        return ids, [(shards[0], np.arange(n), np.ascontiguousarray(pairs[:, 1]))]
    del pairs
    out = []
    for shard in shards:  # a killed run's chunks
        m = conn.execute("SELECT COUNT(*) FROM files WHERE shard = ?", (shard,)).fetchone()[0]
        part = np.fromiter(itertools.chain.from_iterable(conn.execute(
            "SELECT id, row FROM files WHERE shard = ? ORDER BY id", (shard,))), dtype=np.int64,
            count=2 * m).reshape(m, 2)
        out.append((shard, np.searchsorted(ids, part[:, 0]), part[:, 1]))
    return ids, out


def _check_model(conn: sqlite3.Connection, index_dir: Path, folder: Path, model, rebuild: bool) -> None:
    """Refuse another model's (or another folder's) index unless rebuilding, which empties it."""
    info = read_info(conn)
    if not info or rebuild:
        return
    if info.get("fingerprint") != model.fingerprint:
        raise SearchError(f"{index_dir}: built with model {info.get('model')} (fingerprint {info.get('fingerprint')}), "
                          f"not {model.name} (fingerprint {model.fingerprint}); pass --rebuild to re-embed "
                          f"everything with the new model, or --index OTHER_DIR to keep one index per model")
    if info.get("root") != str(folder.resolve()):
        raise SearchError(f"{index_dir}: this index is of {info.get('root')}, not {folder.resolve()}; "
                          f"pass --rebuild to re-index, or --index OTHER_DIR")


def _reset(conn: sqlite3.Connection, index_dir: Path | None = None) -> None:
    """Empty the index, and drop the part files of a killed multi-process run (another model's rows)."""
    if index_dir is not None:
        for f in (Path(index_dir) / PARTS).glob("rank*.jsonl"):
            f.unlink()
    with conn:
        conn.execute("DELETE FROM files")
        conn.execute("DELETE FROM unreadable")
        conn.execute("DELETE FROM info")


def _plan(conn: sqlite3.Connection, folder: Path, listing: list[Path], stats: UpdateStats
          ) -> list[tuple[str, int, int]]:
    """Compare the folder with the database: drop removed files, record touched ones, and return the
    (path, size, mtime_ns) of files to embed (new, or content changed)."""
    known = {p: (s, m, h) for p, s, m, h in conn.execute("SELECT path, size, mtime_ns, sha256 FROM files")}
    bad = {p: (s, m) for p, s, m in conn.execute("SELECT path, size, mtime_ns FROM unreadable")}
    todo, touched, seen = [], [], set()
    for rel in listing:
        key = rel.as_posix()
        seen.add(key)
        try:
            st = (folder / rel).stat()
        except OSError:  # vanished since the listing
            continue
        size, mtime = st.st_size, st.st_mtime_ns
        if key in known:
            old_size, old_mtime, old_hash = known[key]
            if (size, mtime) == (old_size, old_mtime):
                stats.unchanged += 1
            elif size == old_size and file_sha256(folder / rel) == old_hash:
                touched.append((mtime, key))
            else:
                todo.append((key, size, mtime))
                stats.changed += 1
        elif bad.get(key) == (size, mtime):
            stats.unreadable += 1  # still the same undecodable bytes: not retried
        else:
            todo.append((key, size, mtime))
            stats.added += 1
    removed = [p for p in known if p not in seen] + [p for p in bad if p not in seen]
    with conn:
        conn.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in removed])
        conn.executemany("DELETE FROM unreadable WHERE path = ?", [(p,) for p in removed])
        conn.executemany("UPDATE files SET mtime_ns = ? WHERE path = ?", touched)
    stats.removed = sum(p in known for p in removed)
    stats.touched = len(touched)
    return todo


def _embed_chunk(conn: sqlite3.Connection, index_dir: Path, folder: Path, model, chunk: list[tuple[str, int, int]],
                 dtype: str, batch_size: int, workers: int | None) -> tuple[int, int]:
    """Embed one chunk, write its shard, then commit its rows in one transaction; returns (ok, bad)."""
    hashes = [file_sha256(folder / p) for p, _, _ in chunk]
    emb, ok = embed_paths(model, folder, [Path(p) for p, _, _ in chunk], batch_size=batch_size,
                          workers=workers, progress=False)  # emb: [len(ok), D]
    shard = _write_shard(index_dir, emb.numpy().astype(dtype)) if ok else None
    ok_set = set(ok)
    with conn:
        for row, i in enumerate(ok):
            path, size, mtime = chunk[i]
            conn.execute("INSERT INTO files (path, size, mtime_ns, sha256, shard, row) VALUES (?, ?, ?, ?, ?, ?) "
                         "ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                         "sha256 = excluded.sha256, shard = excluded.shard, row = excluded.row",
                         (path, size, mtime, hashes[i], shard, row))
            conn.execute("DELETE FROM unreadable WHERE path = ?", (path,))
        for i, (path, size, mtime) in enumerate(chunk):
            if i not in ok_set:
                conn.execute("DELETE FROM files WHERE path = ?", (path,))
                conn.execute("INSERT OR REPLACE INTO unreadable VALUES (?, ?, ?)", (path, size, mtime))
    return len(ok), len(chunk) - len(ok)


PARTS = "parts"


def _upsert(conn: sqlite3.Connection, path: str, size: int, mtime: int, sha: str, shard: str, row: int) -> None:
    conn.execute("INSERT INTO files (path, size, mtime_ns, sha256, shard, row) VALUES (?, ?, ?, ?, ?, ?) "
                 "ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                 "sha256 = excluded.sha256, shard = excluded.shard, row = excluded.row",
                 (path, size, mtime, sha, shard, row))
    conn.execute("DELETE FROM unreadable WHERE path = ?", (path,))


def _mark_unreadable(conn: sqlite3.Connection, path: str, size: int, mtime: int) -> None:
    conn.execute("DELETE FROM files WHERE path = ?", (path,))
    conn.execute("INSERT OR REPLACE INTO unreadable VALUES (?, ?, ?)", (path, size, mtime))


def _embed_part_chunk(index_dir: Path, folder: Path, model, chunk: list[tuple[str, int, int]], dtype: str,
                      batch_size: int, workers: int | None, part) -> tuple[int, int]:
    """One chunk of one rank: its shard, then its line in the rank's part file (the shard is in place
    before the line that names it, so a merged line never points at a missing shard)."""
    import json
    hashes = [file_sha256(folder / p) for p, _, _ in chunk]
    emb, ok = embed_paths(model, folder, [Path(p) for p, _, _ in chunk], batch_size=batch_size,
                          workers=workers, progress=False)  # emb: [len(ok), D]
    shard = _write_shard(index_dir, emb.numpy().astype(dtype)) if ok else None
    row_of = {i: r for r, i in enumerate(ok)}
    files = [[p, size, mtime, hashes[i], row_of.get(i, -1)] for i, (p, size, mtime) in enumerate(chunk)]
    part.write(json.dumps({"shard": shard, "files": files}) + "\n")
    part.flush()
    os.fsync(part.fileno())
    return len(ok), len(chunk) - len(ok)


def _merge_parts(conn: sqlite3.Connection, index_dir: Path) -> int:
    """Take the finished chunks recorded in parts/*.jsonl into the database (in path order, one
    transaction), then delete the part files. A torn last line (a kill mid-write) is skipped: its
    files are simply embedded again. Idempotent if killed between the commit and the deletion."""
    import json
    parts = sorted((Path(index_dir) / PARTS).glob("rank*.jsonl"))
    entries = []
    for f in parts:
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec["shard"] is not None and not (Path(index_dir) / SHARDS / rec["shard"]).is_file():
                continue
            entries += [(p, size, mtime, sha, rec["shard"], row) for p, size, mtime, sha, row in rec["files"]]
    entries.sort(key=lambda e: e[0])  # the order a single process inserts them: ids alike
    with conn:
        for p, size, mtime, sha, shard, row in entries:
            if row >= 0:
                _upsert(conn, p, size, mtime, sha, shard, row)
            else:
                _mark_unreadable(conn, p, size, mtime)
    for f in parts:
        f.unlink(missing_ok=True)
    return len(entries)


def _compact(conn: sqlite3.Connection, index_dir: Path, dtype: str) -> None:
    """Merge every shard into one with rows in id order, then delete the shards nothing references.
    Crash-safe in either order of events: the new shard is complete before the rows point at it."""
    rows = conn.execute("SELECT id, shard, row FROM files ORDER BY id").fetchall()
    shards = {s for _, s, _ in rows}
    contiguous = len(shards) == 1 and [r for _, _, r in rows] == list(range(len(rows)))
    if rows and not contiguous:
        loaded = {s: load_shard(index_dir, s) for s in shards}
        merged = np.stack([loaded[s][r] for _, s, r in rows]).astype(dtype)  # [N, D]
        name = _write_shard(index_dir, merged)
        with conn:
            conn.executemany("UPDATE files SET shard = ?, row = ? WHERE id = ?",
                             [(name, i, fid) for i, (fid, _, _) in enumerate(rows)])
        shards = {name}
    for f in (Path(index_dir) / SHARDS).glob("*"):
        if f.name not in shards:  # superseded shards, and the temp file of a killed run
            f.unlink(missing_ok=True)


def update_index(folder: str | Path, model, index_dir: str | Path | None = None, *, model_source: str | None = None,
                 rebuild: bool = False, dtype: str = "float16", batch_size: int = 64, workers: int | None = None,
                 chunk_size: int = CHUNK, progress: bool = True) -> UpdateStats:
    """Bring the index of `folder` up to date with `model` (an `ImageTextModel`): embed new and changed
    images, drop removed ones. Resumes a killed run. `model_source` is what `clipft.load` reloads for
    text queries (default: model.name)."""
    from .. import distributed
    if distributed.is_distributed():
        return _update_index_ranks(folder, model, index_dir, model_source=model_source, rebuild=rebuild,
                                   dtype=dtype, batch_size=batch_size, workers=workers, chunk_size=chunk_size,
                                   progress=progress)
    t0 = time.perf_counter()
    folder = Path(folder)
    if not folder.is_dir():
        raise SearchError(f"{folder}: not a folder")
    if dtype not in DTYPES:
        raise SearchError(f"index dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    index_dir = Path(index_dir) if index_dir is not None else default_index_dir(folder)
    with _write_lock(index_dir), connect(index_dir) as conn:
        stats = UpdateStats()
        todo = _prepare(conn, folder, index_dir, model, model_source, rebuild, dtype, stats)
        bar = tqdm(total=len(todo), desc="index", unit="img", disable=not progress or not todo)
        t_embed = time.perf_counter()
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            ok, bad = _embed_chunk(conn, index_dir, folder, model, chunk, dtype, batch_size, workers)
            stats.embedded += ok
            stats.unreadable += bad
            bar.update(len(chunk))
        bar.close()
        stats.embed_seconds = time.perf_counter() - t_embed
        _compact(conn, index_dir, dtype)
        stats.total = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    conn.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def _prepare(conn: sqlite3.Connection, folder: Path, index_dir: Path, model, model_source: str | None,
             rebuild: bool, dtype: str, stats: UpdateStats) -> list[tuple[str, int, int]]:
    """Check, record the model, take in a killed run's parts, and plan: the files left to embed."""
    _check_model(conn, index_dir, folder, model, rebuild)
    if rebuild:
        _reset(conn, index_dir)
    with conn:
        conn.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)", [
            ("schema", SCHEMA_VERSION), ("root", str(folder.resolve())), ("model", model.name),
            ("model_source", model_source or model.name), ("fingerprint", model.fingerprint),
            ("embed_dim", str(model.embed_dim)), ("dtype", dtype)])
    _merge_parts(conn, index_dir)
    skip = {INDEX_DIRNAME}
    if index_dir.resolve().is_relative_to(folder.resolve()) and index_dir.resolve() != folder.resolve():
        skip.add(index_dir.resolve().relative_to(folder.resolve()).parts[0])  # never index the index's thumbnails
    return _plan(conn, folder, list_images(folder, skip_dirs=tuple(skip)), stats)


def _update_index_ranks(folder, model, index_dir, *, model_source, rebuild, dtype, batch_size, workers,
                        chunk_size, progress) -> UpdateStats:
    """`update_index` inside a process group: rank 0 plans (holding the write lock throughout), each
    rank embeds todo[rank::world] into its part file, rank 0 merges after a barrier. Rank 0's stats
    are the run's; the others return their share (embedded, unreadable)."""
    import torch.distributed as dist
    from .. import distributed
    t0 = time.perf_counter()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    folder = Path(folder)
    index_dir = Path(index_dir) if index_dir is not None else default_index_dir(folder)
    stats = UpdateStats()
    with contextlib.ExitStack() as stack:
        msg: list = [None]
        if rank == 0:
            try:
                if not folder.is_dir():
                    raise SearchError(f"{folder}: not a folder")
                if dtype not in DTYPES:
                    raise SearchError(f"index dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
                stack.enter_context(_write_lock(index_dir))
                conn = stack.enter_context(contextlib.closing(connect(index_dir)))
                msg = [("ok", _prepare(conn, folder, index_dir, model, model_source, rebuild, dtype, stats))]
            except Exception as e:
                msg = [("error", f"{type(e).__name__}: {e}")]
                dist.broadcast_object_list(msg, src=0)
                raise
        dist.broadcast_object_list(msg, src=0)
        status, todo = msg[0]
        if status == "error":
            raise SearchError(f"rank 0 failed before indexing ({todo}); stopping rank {rank} too")
        mine = todo[rank::world]
        (index_dir / PARTS).mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(mine), desc=f"index (rank 0 of {world})", unit="img",
                   disable=not progress or rank != 0 or not mine)
        with open(index_dir / PARTS / f"rank{rank}.jsonl", "a") as part:
            for start in range(0, len(mine), chunk_size):
                chunk = mine[start:start + chunk_size]
                ok, bad = _embed_part_chunk(index_dir, folder, model, chunk, dtype, batch_size, workers, part)
                stats.embedded += ok
                stats.unreadable += bad
                bar.update(len(chunk))
        bar.close()
        counts = distributed.all_gather_ints([stats.embedded, stats.unreadable])  # also the barrier
        if rank == 0:
            stats.embedded = sum(c[0] for c in counts)
            stats.unreadable += sum(c[1] for c in counts) - counts[0][1]
            _merge_parts(conn, index_dir)
            _compact(conn, index_dir, dtype)
            stats.total = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    distributed.barrier()  # nobody leaves (or reads the index) before rank 0 has merged
    stats.seconds = time.perf_counter() - t0
    return stats
