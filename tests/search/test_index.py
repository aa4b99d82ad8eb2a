"""clipft.search.index: incremental updates, resume after a kill, model fingerprint, atomic shards."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clipft.search.index import SHARDS, SearchError, default_index_dir, update_index
from clipft.search.query import load_index

from .fake import FakeModel, draw


def _rows(index_dir: Path) -> dict[str, int]:
    with sqlite3.connect(index_dir / "meta.sqlite") as conn:
        return dict(conn.execute("SELECT path, id FROM files"))


def test_first_run_embeds_every_image_and_records_the_model(photos, fake_model):
    s = update_index(photos, fake_model, progress=False)
    assert (s.total, s.added, s.embedded, s.changed, s.removed, s.unchanged) == (12, 12, 12, 0, 0, 0)
    assert fake_model.images_seen == 12
    idx = load_index(default_index_dir(photos))
    assert len(idx) == 12 and idx.emb.shape == (12, fake_model.embed_dim) and idx.emb.dtype == torch.float16
    assert idx.info["fingerprint"] == "fake-1" and idx.info["root"] == str(photos.resolve())
    assert "trip/red_00.jpg" in idx.paths
    assert torch.allclose(idx.emb.float().norm(dim=1), torch.ones(12), atol=1e-2)  # float16 storage
    # the stored row is the model's embedding of that file
    row = idx.paths.index("green_01.png")
    assert torch.allclose(idx.emb[row].float(), fake_model.encode_images([photos / "green_01.png"])[0], atol=1e-3)
    assert len(list((default_index_dir(photos) / SHARDS).iterdir())) == 1  # compacted


def test_rerun_embeds_only_added_and_changed_files_and_drops_removed(photos, fake_model):
    update_index(photos, fake_model, progress=False)
    ids_before = _rows(default_index_dir(photos))
    draw(photos / "new" / "cyan_new.png", "cyan", seed=100)                   # added
    draw(photos / "green_01.png", "black", seed=101, fmt="PNG")               # changed content
    (photos / "trip" / "red_00.jpg").unlink()                                 # removed
    st = (photos / "blue_02.webp").stat()
    os.utime(photos / "blue_02.webp", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched only
    counter = FakeModel()
    s = update_index(photos, counter, progress=False)
    assert (s.added, s.changed, s.removed, s.touched, s.embedded, s.total) == (1, 1, 1, 1, 2, 12)
    assert counter.images_seen == 2
    ids_after = _rows(default_index_dir(photos))
    assert ids_after["green_01.png"] == ids_before["green_01.png"]  # a changed file keeps its id
    assert "trip/red_00.jpg" not in ids_after
    assert ids_after["new/cyan_new.png"] > max(ids_before.values())  # ids are never reused
    idx = load_index(default_index_dir(photos))
    row = idx.paths.index("green_01.png")
    assert torch.allclose(idx.emb[row].float(), FakeModel().encode_images([photos / "green_01.png"])[0], atol=1e-3)
    again = FakeModel()
    s = update_index(photos, again, progress=False)
    assert (s.unchanged, s.embedded, again.images_seen) == (12, 0, 0)


def test_killed_run_resumes_without_redoing_committed_chunks(photos):
    dying = FakeModel(fail_after=9)
    with pytest.raises(KeyboardInterrupt):
        update_index(photos, dying, chunk_size=4, progress=False)
    partial = load_index(default_index_dir(photos))
    assert len(partial) == 8  # two committed chunks of 4: searchable as they are
    resumed = FakeModel()
    s = update_index(photos, resumed, chunk_size=4, progress=False)
    assert (s.unchanged, s.added, resumed.images_seen, s.total) == (8, 4, 4, 12)
    assert len(list((default_index_dir(photos) / SHARDS).iterdir())) == 1


_KILL_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[2])
from search.fake import FakeModel
from clipft.search.index import update_index
class Slow(FakeModel):
    def encode_pixels(self, pixels):
        time.sleep(0.3 * len(pixels))
        return super().encode_pixels(pixels)
update_index(sys.argv[1], Slow(), chunk_size=2, batch_size=2, workers=0, progress=False)
"""


def test_sigkill_during_indexing_then_resume(photos):
    tests_dir = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                                      os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(photos), tests_dir], env=env)
    db = default_index_dir(photos) / "meta.sqlite"
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(db) as conn:
                done = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        except sqlite3.Error:
            pass
        if done >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= done < 12, "the run should be killed half-way"
    kept = len(load_index(default_index_dir(photos)))  # the killed index is consistent and loadable
    resumed = FakeModel()
    s = update_index(photos, resumed, progress=False)
    assert resumed.images_seen == 12 - kept and s.unchanged == kept and s.total == 12
    assert sorted(p.name for p in (default_index_dir(photos) / SHARDS).iterdir())[0].endswith(".npy")
    assert len(list((default_index_dir(photos) / SHARDS).iterdir())) == 1  # temp and old shards removed


def test_another_model_is_refused_without_rebuild(photos, fake_model):
    update_index(photos, fake_model, progress=False)
    other = FakeModel(fingerprint="fake-2")
    with pytest.raises(SearchError, match="fingerprint fake-1.*--rebuild"):
        update_index(photos, other, progress=False)
    assert other.images_seen == 0
    s = update_index(photos, other, rebuild=True, progress=False)
    assert (s.embedded, other.images_seen) == (12, 12)
    assert load_index(default_index_dir(photos)).info["fingerprint"] == "fake-2"


def test_several_models_keep_their_own_index_of_one_folder(photos, tmp_path):
    a, b = FakeModel("fake-1"), FakeModel("fake-2")
    update_index(photos, a, progress=False)
    update_index(photos, b, photos / ".clipft-index-b", progress=False)
    update_index(photos, b, tmp_path / "elsewhere", progress=False)
    assert load_index(default_index_dir(photos)).info["fingerprint"] == "fake-1"
    assert load_index(photos / ".clipft-index-b").info["fingerprint"] == "fake-2"
    assert len(load_index(tmp_path / "elsewhere")) == 12


def test_index_folder_inside_the_photos_is_not_indexed(photos, fake_model):
    update_index(photos, fake_model, photos / "my-index", progress=False)
    (photos / "my-index" / "thumbs").mkdir()
    draw(photos / "my-index" / "thumbs" / "1.jpg", "red", seed=5)
    s = update_index(photos, fake_model, photos / "my-index", progress=False)
    assert s.total == 12 and s.added == 0


def test_unreadable_files_are_counted_and_not_retried_until_they_change(photos, fake_model):
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    s = update_index(photos, fake_model, progress=False)
    assert (s.total, s.unreadable) == (12, 1)
    s = update_index(photos, FakeModel(), progress=False)
    assert (s.unreadable, s.embedded) == (1, 0)
    draw(photos / "broken.jpg", "red", seed=7, fmt="JPEG")
    s = update_index(photos, FakeModel(), progress=False)
    assert (s.unreadable, s.embedded, s.total) == (0, 1, 13)


def test_an_orphan_shard_from_a_crash_is_ignored_and_removed(photos, fake_model):
    update_index(photos, fake_model, progress=False)
    shards = default_index_dir(photos) / SHARDS
    np.save(shards / "deadbeef.npy", np.ones((3, fake_model.embed_dim), dtype=np.float16))
    (shards / ".half-written.npy.tmp").write_bytes(b"\x93NUMPY")
    assert len(load_index(default_index_dir(photos))) == 12
    update_index(photos, fake_model, progress=False)
    assert len(list(shards.iterdir())) == 1


def test_bad_input_is_one_clear_error(tmp_path, fake_model):
    with pytest.raises(SearchError, match="not a folder"):
        update_index(tmp_path / "missing", fake_model)
    with pytest.raises(SearchError, match="no clipft index"):
        load_index(tmp_path)
    with pytest.raises(SearchError, match="dtype"):
        update_index(tmp_path, fake_model, dtype="int8")


def test_float32_storage(photos, fake_model):
    update_index(photos, fake_model, dtype="float32", progress=False)
    idx = load_index(default_index_dir(photos))
    row = idx.paths.index("green_01.png")
    assert torch.allclose(idx.emb[row].float(), fake_model.encode_images([photos / "green_01.png"])[0], atol=1e-6)


def _linked_folders(root: Path, links_per_dir: int) -> Path:
    """photos/a and photos/b, one photo each, every folder holding `links_per_dir` links to the other."""
    for name, colour, seed in (("a", "red", 1), ("b", "blue", 2)):
        draw(root / name / f"{colour}.png", colour, seed=seed)
    for i in range(links_per_dir):
        os.symlink("../b", root / "a" / f"to_b{i}")
        os.symlink("../a", root / "b" / f"to_a{i}")
    return root


@pytest.mark.parametrize("links_per_dir", [1, 2])
def test_symlink_loops_index_each_file_once_and_end(tmp_path, links_per_dir):
    """A mutual loop (a -> b -> a) and two links per folder: each photo once, by its link-free path.
    Run in a child process so that a walk that never ends fails the test instead of hanging it."""
    root = _linked_folders(tmp_path / "photos", links_per_dir)
    code = "import sys; from clipft.embed import list_images; print([p.as_posix() for p in list_images(sys.argv[1])])"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    try:
        out = subprocess.run([sys.executable, "-c", code, str(root)], env=env, capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("list_images did not finish on a folder with symlink loops")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['a/red.png', 'b/blue.png']"


def test_a_linked_file_is_indexed_once(photos, fake_model):
    os.symlink(photos / "green_01.png", photos / "trip" / "alias.png")
    s = update_index(photos, fake_model, progress=False)
    assert s.total == 12 and "green_01.png" in load_index(default_index_dir(photos)).paths


def test_a_tiff_is_indexed(photos, fake_model):
    """The extensions training reads (clipft.data) are the ones the index reads: no silent gap."""
    draw(photos / "scan.tif", "red", seed=40)
    draw(photos / "scan2.TIFF", "blue", seed=41, fmt="TIFF")
    update_index(photos, fake_model, progress=False)
    assert {"scan.tif", "scan2.TIFF"} <= set(load_index(default_index_dir(photos)).paths)


def test_summary_times_the_embedding_apart_from_the_whole_update(photos, fake_model, monkeypatch):
    """The summary's "embedded N in Xs" is the embedding loop (what the progress bar showed), with the
    whole update's time (listing, hashing, compaction) beside it, not one figure mixing both."""
    import clipft.search.index as I
    real_plan = I._plan

    def slow_plan(*a, **k):  # listing and hashing that take a while, outside the embedding loop
        time.sleep(0.5)
        return real_plan(*a, **k)
    monkeypatch.setattr(I, "_plan", slow_plan)
    s = update_index(photos, fake_model, progress=False)
    assert s.embed_seconds < 0.5 <= s.seconds
    assert f"embedded {s.embedded} in {s.embed_seconds:.1f}s ({s.seconds:.1f}s in all" in s.summary()
