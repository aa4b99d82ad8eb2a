"""WebDataset shards (clipft.data.shards, `clipft shard`): written from any format, read back with the
captions in split order, trained on with the map-style machinery (every sample once per epoch across
workers, the same run as from the original folder, exact mid-epoch resume), img2dataset's layout read
as is, and damaged shards skipped and counted."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipft.cli.commands import main
from clipft.config import DataConfig
from clipft.data import DataError, load_split
from clipft.data import shards as shards_mod
from clipft.data.images import load_image
from clipft.train import loop as train_mod
from clipft.train.rundir import read_records

from train.test_loop import small_args


@pytest.fixture(scope="module")
def shard_dir(coco_root, tmp_path_factory):
    """coco_root (24 train / 12 val) as shards of 10: train-000000..000002.tar, val-000000..000001.tar."""
    out = tmp_path_factory.mktemp("shards") / "sh"
    assert main(["shard", str(coco_root), "--out", str(out), "--shard-size", "10", "--quiet"]) == 0
    return out


def keys_of(paths) -> list[str]:
    return [str(p).rsplit(".tar/", 1)[1] for p in paths]


# --------------------------------------------------------------------------- writing and reading

def test_shard_writes_train_and_val_sets_with_wids_index_and_sizes(coco_root, shard_dir):
    assert sorted(p.name for p in shard_dir.glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar", "val-000001.tar"]
    sizes = json.loads((shard_dir / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 4,
                     "val-000000.tar": 10, "val-000001.tar": 2}
    index = json.loads((shard_dir / "shards.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [(d["url"], d["nsamples"]) for d in index["shardlist"]] == [
        ("train-000000.tar", 10), ("train-000001.tar", 10), ("train-000002.tar", 4)]
    with tarfile.open(shard_dir / "train-000000.tar") as t:
        assert t.getnames()[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
        meta = json.loads(t.extractfile("000000000.json").read())
    original = load_split(coco_root, "train", DataConfig())
    assert meta["split"] == "train" and meta["source"] == str(original.images[0].path)
    assert meta["image_id"] == original.images[0].image_id
    # Read back: the same captions in the same order; small JPEGs stored byte for byte.
    for split in ("train", "val"):
        back, orig = load_split(shard_dir, split, DataConfig()), load_split(coco_root, split, DataConfig())
        assert [r.captions for r in back.images] == [r.captions for r in orig.images]
        assert [r.image_id for r in back.images] == list(range(len(orig)))  # global index in the shard set
    back = load_split(shard_dir, "train", DataConfig())
    with shards_mod.open_member(back.images[5].path) as f:
        assert f.read() == Path(original.images[5].path).read_bytes()


def test_a_brace_pattern_and_a_pipe_url_read_the_same_samples(shard_dir):
    whole = load_split(shard_dir, "train", DataConfig())
    pattern = f"{shard_dir}/train-{{000000..000002}}.tar"
    assert shards_mod.expand(pattern) == [str(shard_dir / f"train-00000{i}.tar") for i in range(3)]
    for spec in (pattern, f"file:{pattern}", f"pipe:cat {pattern}"):
        got = load_split(spec, "train", DataConfig())
        assert [r.captions for r in got.images] == [r.captions for r in whole.images], spec
        img, reason = load_image(got.images[-1].path)
        assert reason is None and img.size == (48, 48)
    # The val split of a pattern: the val shards `clipft shard` wrote beside it.
    assert len(load_split(pattern, "val", DataConfig())) == 12


def test_big_images_are_resized_once_short_side_to_image_size(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    Image.new("RGB", (400, 300), (200, 10, 10)).save(folder / "a.png")
    (folder / "a.txt").write_text("a red picture\n")
    Image.new("RGB", (64, 64), (10, 10, 200)).save(folder / "b.jpg")
    (folder / "b.txt").write_text("a blue picture\nanother caption\n")
    assert main(["shard", str(folder), "--out", str(tmp_path / "s"), "--image-size", "100", "--split", "all",
                 "--quiet"]) == 0
    data = load_split(tmp_path / "s" / "all-000000.tar", "train", DataConfig())
    sizes = [load_image(r.path)[0].size for r in data.images]
    assert sizes == [(133, 100), (64, 64)] and data.images[1].captions == ["a blue picture", "another caption"]


def test_caption_loading_reads_text_members_only_and_caches_them_by_key(coco_root, tmp_path, monkeypatch):
    out = tmp_path / "sh"
    assert main(["shard", str(coco_root), "--out", str(out), "--shard-size", "10", "--quiet"]) == 0

    def no_decoding(*a, **k):
        raise AssertionError("an image was opened while loading captions")
    monkeypatch.setattr(Image, "open", no_decoding)
    first = load_split(out, "train", DataConfig())
    cache = shards_mod._captions_cache(out / "train-000000.tar")
    stored = json.loads(cache.read_text())["samples"]
    assert list(stored)[:2] == ["000000000", "000000001"]  # keyed by sample key
    assert stored["000000000"]["captions"] == first.images[0].captions
    monkeypatch.setattr(shards_mod, "scan_shard", no_decoding)  # cached: the tars' text is not read again
    assert [r.captions for r in load_split(out, "train", DataConfig()).images] == [r.captions for r in first.images]


def test_bad_shard_specs_are_one_line_errors(tmp_path, shard_dir):
    with pytest.raises(DataError, match=r"train-000003.tar: shard not found"):
        load_split(f"{shard_dir}/train-{{000000..000009}}.tar", "train", DataConfig())
    with pytest.raises(DataError, match="only local paths, file: and pipe: URLs"):
        shards_mod.localize("https://example.org/a.tar")
    with pytest.raises(DataError, match="the pipe command failed"):
        load_split("pipe:exit 3; echo {000..001}.tar", "train", DataConfig())
    with pytest.raises(DataError, match="no validation shards"):
        load_split(f"{tmp_path}/x-{{0..1}}.tar", "val", DataConfig())


# --------------------------------------------------------------------------- img2dataset

def _img2dataset(root: Path, n: int, per_shard: int) -> Path:
    """img2dataset's output: NNNNN.tar with KEY.jpg / KEY.txt (one caption) / KEY.json, and side files."""
    root.mkdir(parents=True)
    for s in range(0, n, per_shard):
        with tarfile.open(root / f"{s // per_shard:05d}.tar", "w") as t:
            for i in range(s, min(n, s + per_shard)):
                key = f"{s // per_shard:05d}{i % per_shard:04d}"
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), (i * 9 % 255, 80, 120)).save(buf, format="JPEG")
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", f"photo number {i}".encode()),
                                   (f"{key}.json", json.dumps({"key": key, "caption": f"photo number {i}",
                                                               "url": f"http://x/{i}.jpg"}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
        (root / f"{s // per_shard:05d}.parquet").write_bytes(b"PAR1")
        (root / f"{s // per_shard:05d}_stats.json").write_text("{}")
    return root


def test_img2dataset_output_is_read_as_is(tmp_path):
    train, val = _img2dataset(tmp_path / "train", 12, 5), _img2dataset(tmp_path / "val", 4, 5)
    cfg = DataConfig(val_path=str(val))
    from clipft.data import detect_format
    assert detect_format(train) == "webdataset"
    t, v = load_split(train, "train", cfg), load_split(train, "val", cfg)
    assert [r.captions for r in t.images] == [[f"photo number {i}"] for i in range(12)]
    assert len(v) == 4 and load_image(t.images[11].path)[0].size == (40, 30)
    with pytest.raises(DataError, match="no validation shards"):
        load_split(train, "val", DataConfig())


# --------------------------------------------------------------------------- the epoch order

def test_windowed_order_is_a_permutation_of_seed_and_epoch_reading_few_shards_at_a_time():
    shard_ids = [i // 10 for i in range(200)]  # 20 shards of 10
    a = shards_mod.windowed_order(shard_ids, seed=3, epoch=1, window=4)
    assert sorted(a.tolist()) == list(range(200))
    assert torch.equal(a, shards_mod.windowed_order(shard_ids, 3, 1, window=4))
    assert not torch.equal(a, shards_mod.windowed_order(shard_ids, 3, 2, window=4))
    for w in range(5):  # each run of 40 rows comes from 4 shards
        assert len({shard_ids[i] for i in a[w * 40:(w + 1) * 40].tolist()}) == 4
    from clipft.distributed import epoch_order  # one window: exactly the folder order
    assert torch.equal(shards_mod.windowed_order(shard_ids, 3, 1, window=20), epoch_order(200, 3, 1))


# --------------------------------------------------------------------------- training

class Recorder:
    """A make_loader hook: the real loader, recording the dataset rows each epoch's batches hold."""

    def __init__(self):
        self.rows: dict[int, list[int]] = {}
        self.paths = None

    def __call__(self, ds, cfg, epoch, device, skip_batches=0):
        self.paths = ds.paths
        loader = train_mod.make_train_loader(ds, cfg, epoch, device, skip_batches=skip_batches)
        for images, texts, idx, n_skipped in loader:
            self.rows.setdefault(epoch, []).extend(idx.tolist())
            yield images, texts, idx, n_skipped


@pytest.mark.parametrize("shard_size", [10, 24], ids=["3-shards", "1-shard-for-2-workers"])
def test_two_workers_see_every_sample_once_per_epoch(coco_root, tmp_path, tiny_clip_dir, shard_size):
    out = tmp_path / "sh"
    assert main(["shard", str(coco_root), "--out", str(out), "--shard-size", str(shard_size), "--quiet"]) == 0
    rec = Recorder()
    with train_mod.use_hooks(make_loader=rec):
        assert main(["train", "--data", f"{out}/train-{{000000..{(23 // shard_size):06d}}}.tar", "--out",
                     str(tmp_path / "run"), *small_args(tiny_clip_dir, 2, ["--set", "data.num_workers=2"])]) == 0
    everything = sorted(keys_of(rec.paths))
    assert len(everything) == 24  # 24 images / batch 8: no remainder to drop
    for epoch in (1, 2):
        seen = keys_of(rec.paths[i] for i in rec.rows[epoch])
        assert sorted(seen) == everything  # each sample exactly once
    assert rec.rows[1] != rec.rows[2]  # reshuffled per epoch


@pytest.fixture(scope="module")
def folder_and_shard_runs(coco_root, shard_dir, tiny_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "--data", str(coco_root), "--out", str(root / "folder"), *small_args(tiny_clip_dir, 2)]) == 0
    assert main(["train", "--data", str(shard_dir), "--out", str(root / "shards"), *small_args(tiny_clip_dir, 2)]) == 0
    return root


def test_a_run_from_shards_equals_the_run_from_the_original_data(folder_and_shard_runs):
    a, b = (torch.load(folder_and_shard_runs / d / "last.pt", weights_only=False) for d in ("folder", "shards"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ea, eb = (read_records(folder_and_shard_runs / d / "metrics.jsonl", "epoch") for d in ("folder", "shards"))
    assert [r["val"] for r in ea] == [r["val"] for r in eb]


def test_sigterm_mid_epoch_on_shards_resumes_exactly(shard_dir, tiny_clip_dir, tmp_path, folder_and_shard_runs):
    run = tmp_path / "b"
    real, calls = train_mod.train_step, []

    def signalled_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    with train_mod.use_hooks(step=signalled_at_step_2):
        assert main(["train", "--data", str(shard_dir), "--out", str(run), *small_args(tiny_clip_dir, 2)]) == 143
    assert torch.load(run / "last.pt", weights_only=False)["epoch_steps"] == 2
    assert main(["train", "--data", str(shard_dir), "--out", str(run), "--quiet"]) == 0
    sa = torch.load(folder_and_shard_runs / "shards" / "last.pt", weights_only=False)["model"]
    sb = torch.load(run / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- damage

def test_truncated_and_corrupt_shards_are_skipped_counted_and_reported(coco_root, tmp_path, tiny_clip_dir, caplog):
    out = tmp_path / "sh"
    assert main(["shard", str(coco_root), "--out", str(out), "--shard-size", "10", "--quiet"]) == 0
    # train-000001: cut inside the last sample's image (a truncated download).
    t1 = out / "train-000001.tar"
    with tarfile.open(t1) as t:
        last_jpg = [m for m in t.getmembers() if m.name.endswith(".jpg")][-1]
    os.truncate(t1, last_jpg.offset_data + 100)
    # train-000002: a tar header cut in half (nothing indexable past it: the whole shard is skipped).
    t2 = out / "train-000002.tar"
    os.truncate(t2, 256)
    # train-000000: a member whose bytes are not an image (decoded at training time, skipped and counted).
    t0 = out / "train-000000.tar"
    with tarfile.open(t0) as t:
        m = t.getmember("000000003.jpg")
    with open(t0, "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"\0" * m.size)
    split = load_split(out, "train", DataConfig())
    assert len(split) == 10 + 9  # shard 1 lost its last sample, shard 2 all of its 4
    assert split.caption_problems["truncated_member"] == 1 and split.caption_problems["unreadable_shard"] == 1
    assert "train-000002.tar: cannot index the tar" in split.examples["unreadable_shard"][0]
    assert main(["train", "--data", str(out), "--out", str(tmp_path / "run"), *small_args(tiny_clip_dir, 1)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"] == 1  # the corrupt member, once (19 samples / batch 8: 2 steps of 16)
    assert "1 of 3 shard(s) skipped" in caplog.text


# --------------------------------------------------------------------------- 2 processes (gloo)

def _two_process_worker(rank: int, ports: list[int], data: str, text_dir: str, runs: str) -> None:
    """2 ranks x batch 4 on shards: run a uninterrupted, recording each rank's rows per epoch; run b
    SIGTERM'd on rank 0 during step 2, then rerun."""
    from test_distributed import _init_worker, _train_args
    _init_worker(rank, ports[0])
    rec = Recorder()
    with train_mod.use_hooks(make_loader=rec):
        codes = {"a": main(["train", "--data", data, "--out", f"{runs}/a", *_train_args(text_dir)])}
    keys = {e: keys_of(rec.paths[i] for i in rows) for e, rows in rec.rows.items()}
    real_step, calls = train_mod.train_step, []

    def sigterm_rank_0_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)
    os.environ["MASTER_PORT"] = str(ports[1])
    with train_mod.use_hooks(step=sigterm_rank_0_at_step_2):
        codes["b_signalled"] = main(["train", "--data", data, "--out", f"{runs}/b", *_train_args(text_dir)])
    os.environ["MASTER_PORT"] = str(ports[2])
    codes["b_resumed"] = main(["train", "--data", data, "--out", f"{runs}/b", "--quiet"])
    Path(runs, f"rank{rank}.json").write_text(json.dumps({"codes": codes, "keys": keys}))


def test_two_processes_split_the_samples_and_resume_exactly(shard_dir, tiny_clip_dir, tmp_path):
    from test_distributed import WORLD, _free_port, _spawn
    _spawn(_two_process_worker, [_free_port() for _ in range(3)], f"{shard_dir}/train-{{000000..000002}}.tar",
           str(tiny_clip_dir), str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(g["codes"] == {"a": 0, "b_signalled": 143, "b_resumed": 0} for g in got)
    for epoch in ("1", "2"):
        per_rank = [g["keys"][epoch] for g in got]
        assert len(per_rank[0]) == len(per_rank[1]) == 12  # 3 steps x 4 per rank
        assert sorted(per_rank[0] + per_rank[1]) == [f"{i:09d}.jpg" for i in range(24)]  # disjoint, complete
    sa, sb = (torch.load(tmp_path / d / "last.pt", weights_only=False)["model"] for d in ("a", "b"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_leak_check_compares_shard_members_by_content(shard_dir, tmp_path):
    import shutil
    from clipft.data.validate import preflight
    leaky = tmp_path / "leaky"
    shutil.copytree(shard_dir, leaky, ignore=shutil.ignore_patterns("cache"))
    shutil.copy(leaky / "train-000001.tar", leaky / "val-000001.tar")  # 10 train samples also in val
    train, val = load_split(leaky, "train", DataConfig()), load_split(leaky, "val", DataConfig())
    with pytest.raises(DataError, match="10 validation image"):
        preflight(train, val, DataConfig())
    assert preflight(load_split(shard_dir, "train", DataConfig()), load_split(shard_dir, "val", DataConfig()),
                     DataConfig()) == []


def test_an_image_folder_keeping_a_tar_archive_is_still_a_folder(tmp_path):
    from clipft.data import detect_format
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a black square\n")
    with tarfile.open(tmp_path / "backup.tar", "w"):
        pass
    assert detect_format(tmp_path) == "folder"
