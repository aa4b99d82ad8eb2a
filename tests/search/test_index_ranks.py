"""`clipft index` and `clipft embed` under torchrun: 2 gloo processes on the CPU (started here with the
environment variables torchrun sets) give the single-process index and embeddings file, and a killed
2-process index resumes without embedding its finished chunks again."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from clipft.search.index import PARTS, default_index_dir, update_index
from clipft.search.query import load_index

from .fake import FakeModel, draw

SRC = str(Path(__file__).resolve().parents[2] / "src")
TESTS = str(Path(__file__).resolve().parents[1])

_RANK_SCRIPT = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from search.fake import FakeModel
from clipft import distributed
what, folder, out, delay = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
class Model(FakeModel):
    def encode_pixels(self, pixels):
        time.sleep(delay * len(pixels))
        return super().encode_pixels(pixels)
ctx = distributed.setup("cpu")
model = Model()
if what == "index":
    from clipft.search.index import update_index
    s = update_index(folder, model, out, chunk_size=2, batch_size=2, workers=0, progress=False)
    result = s.as_dict()
else:
    from clipft.embed import embed_folder
    result = embed_folder(model, folder, out, batch_size=2, workers=0, progress=False, chunk_size=2)
distributed.teardown(ctx)
print("RESULT", ctx.rank, model.images_seen, json.dumps(result), flush=True)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(what: str, folder, out, delay: float = 0.0, world: int = 2) -> list[subprocess.Popen]:
    port = _port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, TESTS, what, str(folder), str(out),
                                       str(delay)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs) -> list[tuple[int, dict]]:
    """(images embedded, result) per rank."""
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        line = [x for x in stdout.splitlines() if x.startswith("RESULT")][0].split(" ", 3)
        out.append((int(line[2]), json.loads(line[3])))
    return out


def _rows(index_dir: Path) -> list[tuple]:
    with sqlite3.connect(index_dir / "meta.sqlite") as conn:
        return conn.execute("SELECT id, path, size, mtime_ns, sha256 FROM files ORDER BY id").fetchall()


def test_two_process_index_equals_the_single_process_index(photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    single = tmp_path / "single"
    s1 = update_index(photos, FakeModel(), single, chunk_size=2, progress=False)
    ranks = _finish(_start("index", photos, tmp_path / "two"))
    assert [seen for seen, _ in ranks] == [6, 6]  # disjoint halves: 13 files r::2, one does not decode
    two = tmp_path / "two"
    assert _rows(two) == _rows(single)  # same files, same ids, same hashes
    a, b = load_index(single), load_index(two)
    assert torch.allclose(a.emb.float(), b.emb.float(), atol=1e-3) and a.emb.dtype == b.emb.dtype
    s2 = ranks[0][1]
    assert (s2["total"], s2["added"], s2["embedded"], s2["unreadable"]) == (s1.total, s1.added, 12, 1)
    assert not list((two / PARTS).glob("*.jsonl")) and len(list((two / "shards").iterdir())) == 1
    # a rerun has nothing to do, and the unreadable file is not retried
    again = _finish(_start("index", photos, two))
    assert [seen for seen, _ in again] == [0, 0] and again[0][1]["unchanged"] == 12


def test_two_process_embed_equals_the_single_process_file(photos, tmp_path):
    from clipft.embed import embed_folder, read_folder_embeddings
    embed_folder(FakeModel(), photos, tmp_path / "one.safetensors", workers=0, progress=False)
    ranks = _finish(_start("embed", photos, tmp_path / "two.safetensors"))
    assert [seen for seen, _ in ranks] == [6, 6]
    t1, p1, m1 = read_folder_embeddings(tmp_path / "one.safetensors")
    t2, p2, m2 = read_folder_embeddings(tmp_path / "two.safetensors")
    assert p1 == p2 and torch.allclose(t1["embeddings"], t2["embeddings"], atol=1e-6)
    assert torch.equal(t1["sizes"], t2["sizes"]) and m1["fingerprint"] == m2["fingerprint"]
    assert not (tmp_path / "two.safetensors.parts").exists()


def _kill_when(procs, finished_a_chunk, timeout: float = 120) -> None:
    """SIGKILL both ranks as soon as `finished_a_chunk()` holds (or one exits, or `timeout` s pass)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs) and not finished_a_chunk():
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def test_killed_two_process_index_resumes_without_re_embedding_finished_chunks(photos, tmp_path):
    index_dir = tmp_path / "idx"
    procs = _start("index", photos, index_dir, delay=0.4)  # 2 images per chunk: ~0.8 s a chunk
    parts = index_dir / PARTS
    _kill_when(procs, lambda: {f.name for f in parts.glob("rank*.jsonl") if f.read_text().strip()}
               == {"rank0.jsonl", "rank1.jsonl"})
    finished: set[str] = set()
    for f in parts.glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            finished |= {x[0] for x in json.loads(line)["files"]}
    assert 4 <= len(finished) < 12, "killed after each rank finished a chunk, before the end"
    ranks = _finish(_start("index", photos, index_dir))
    assert sum(seen for seen, _ in ranks) == 12 - len(finished)  # finished chunks are not embedded again
    assert ranks[0][1]["unchanged"] == len(finished) and ranks[0][1]["total"] == 12
    fresh = tmp_path / "fresh"
    update_index(photos, FakeModel(), fresh, progress=False)
    # the result is the uninterrupted index (ids follow the order chunks finished in, so by path)
    assert sorted(r[1:] for r in _rows(index_dir)) == sorted(r[1:] for r in _rows(fresh))
    a, b = load_index(index_dir), load_index(fresh)
    order = [a.paths.index(p) for p in b.paths]
    assert torch.allclose(a.emb[order].float(), b.emb.float(), atol=1e-3)


def test_killed_two_process_embed_resumes_from_its_part_files(photos, tmp_path):
    from clipft.embed import embed_folder, read_folder_embeddings
    out = tmp_path / "emb.safetensors"
    procs = _start("embed", photos, out, delay=0.4)
    parts = out.with_name(out.name + ".parts")
    _kill_when(procs, lambda: {f.name.split("-")[0] for f in parts.glob("*/rank*.safetensors")} == {"rank0", "rank1"})
    done = len(list(parts.glob("*/rank*.safetensors")))  # chunks of 2 images
    assert 2 <= done < 6 and not out.exists()
    ranks = _finish(_start("embed", photos, out))
    assert sum(seen for seen, _ in ranks) == 12 - 2 * done  # finished chunks are not embedded again
    embed_folder(FakeModel(), photos, tmp_path / "one.safetensors", workers=0, progress=False)
    t1, p1, _ = read_folder_embeddings(tmp_path / "one.safetensors")
    t2, p2, _ = read_folder_embeddings(out)
    assert p1 == p2 and torch.allclose(t1["embeddings"], t2["embeddings"], atol=1e-6)


def test_rebuild_drops_a_killed_runs_parts(photos, tmp_path):
    """Parts left by a killed multi-process run hold the old model's rows: --rebuild must not merge them."""
    index_dir = tmp_path / "idx"
    update_index(photos, FakeModel(), index_dir, progress=False)
    parts = index_dir / PARTS
    parts.mkdir()
    shard = next((index_dir / "shards").iterdir()).name  # fake-1's rows, as a killed run's chunk would hold
    st = (photos / "green_01.png").stat()
    line = {"shard": shard, "files": [["green_01.png", st.st_size, st.st_mtime_ns, "x", 0]]}
    (parts / "rank0.jsonl").write_text(json.dumps(line) + "\n")
    model = FakeModel("fake-2")
    s = update_index(photos, model, index_dir, rebuild=True, progress=False)
    assert (s.total, s.embedded, model.images_seen) == (12, 12, 12) and not list(parts.glob("*.jsonl"))
