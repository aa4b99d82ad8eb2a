import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from clipft.data import prepare as prep
from clipft.config import DataConfig
from clipft.data import DataError, TrainDataset, build_transform, load_coco_captions, load_image, prepared_dir
from clipft.data.device_transform import DeviceTransform
from clipft.data.prepared_reader import PreparedDataset, PreparedImages, PreparedLoader, identity_collate
from clipft.data.prepare import prepare_images
from clipft.data.shapes import make_shapes_dataset

MEAN, STD = DataConfig().mean, DataConfig().std


@pytest.fixture()
def split(tmp_path):
    root = make_shapes_dataset(tmp_path / "coco", n_train=10, n_val=2, seed=1, image_size=80)
    s = load_coco_captions(root, "train")
    s.images[3].path.write_bytes(b"not a jpeg")  # one unreadable image
    return s


def test_prepare_writes_squares_and_counts_bad(split, tmp_path):
    out = prepared_dir(tmp_path / "cache", "train", 48)
    info = prepare_images(split, out, size=48, workers=1, progress=False)
    assert info["images"] == 10 and info["bad"] == 1
    p = PreparedImages.open(out)
    assert p.array.shape == (10, 48, 48, 3) and p.ok.tolist() == [i != 3 for i in range(10)]
    want = prep._square(load_image(split.images[0].path)[0], 48)
    assert np.array_equal(p.array[0], want)
    assert not p.array[3].any()
    assert json.loads((out / "index.json").read_text())["bad"]
    assert not (out / "done.json").exists()
    # A complete cache for the same images is not rebuilt.
    assert prepare_images(split, out, size=48, workers=1, progress=False)["seconds"] == 0.0


def test_prepare_resumes_after_a_kill(split, tmp_path):
    chunk = 3  # 10 images -> chunks 0..3
    out = tmp_path / "p"
    real, calls = prep._work, []

    def dies_on_chunk_2(job):
        if job[0] == 2:
            raise KeyboardInterrupt
        calls.append(job[0])
        return real(job)
    with pytest.raises(KeyboardInterrupt):
        prepare_images(split, out, size=32, workers=1, progress=False, chunk=chunk, work=dies_on_chunk_2)
    assert calls == [0, 1] and PreparedImages.open(out) is None
    info = prepare_images(split, out, size=32, workers=1, progress=False, chunk=chunk,
                          work=lambda job: calls.append(job[0]) or real(job))
    assert calls == [0, 1, 2, 3]  # chunks 0 and 1 were not decoded again
    assert info["bad"] == 1
    fresh = tmp_path / "fresh"
    prepare_images(split, fresh, size=32, workers=1, progress=False, chunk=chunk)
    assert np.array_equal(PreparedImages.open(out).array, PreparedImages.open(fresh).array)


def test_parallel_equals_serial(split, tmp_path):
    prepare_images(split, tmp_path / "a", size=32, workers=1, progress=False, chunk=4)
    prepare_images(split, tmp_path / "b", size=32, workers=2, progress=False, chunk=4)
    assert np.array_equal(PreparedImages.open(tmp_path / "a").array, PreparedImages.open(tmp_path / "b").array)


def test_rows_for_subset_and_missing(split, tmp_path):
    prepare_images(split, tmp_path / "p", size=32, workers=1, progress=False)
    p = PreparedImages.open(tmp_path / "p")
    sub = split.subset(4, seed=0)
    rows = p.rows_for(sub)
    assert [p.paths[r] for r in rows] == prep.relative_paths([r.path for r in sub.images], p.path)
    other = load_coco_captions(split.images[0].path.parents[1], "val")
    assert p.rows_for(other) is None


def test_prepared_dataset_batches_and_caption_rule(split, tmp_path):
    prepare_images(split, tmp_path / "p", size=32, workers=1, progress=False)
    p = PreparedImages.open(tmp_path / "p")
    text = torch.randn(len(split.captions), 8)
    ds = PreparedDataset(p, p.rows_for(split), text, split.caption_offsets().tolist(), seed=5)
    ds.set_epoch(2)
    loader = DataLoader(ds, batch_size=4, collate_fn=identity_collate)
    batches = list(loader)
    images, texts, idx, skipped = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (3, 32, 32, 3)  # row 3 is unreadable
    assert skipped == 1 and batches[1][0].shape == (4, 32, 32, 3)
    assert sum(b[3] for b in batches) == 1 and sum(len(b[2]) for b in batches) == 9
    # Same caption per (seed, epoch, image) as the JPEG dataset: switching loaders changes nothing.
    jpeg = TrainDataset(split, text, build_transform(32, MEAN, STD), seed=5)
    jpeg.set_epoch(2)
    for b in batches:
        for t, i in zip(b[1], b[2].tolist()):
            assert torch.equal(t, text[jpeg.caption_index(i)])


def test_prepared_loader_gives_the_dataloader_batches(split, tmp_path):
    prepare_images(split, tmp_path / "p", size=32, workers=1, progress=False)
    p = PreparedImages.open(tmp_path / "p")
    text = torch.randn(len(split.captions), 8)
    ds = PreparedDataset(p, p.rows_for(split), text, split.caption_offsets().tolist(), seed=5)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    ref = list(DataLoader(ds, batch_size=4, sampler=order, collate_fn=identity_collate))
    loader = PreparedLoader(ds, order, batch_size=4)
    assert len(loader) == len(ref) == 3
    for _ in range(2):  # re-iterable, like a DataLoader
        got = list(loader)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_prepared_loader_stops_its_thread_and_raises_reader_errors(split, tmp_path):
    prepare_images(split, tmp_path / "p", size=32, workers=1, progress=False)
    p = PreparedImages.open(tmp_path / "p")
    ds = PreparedDataset(p, p.rows_for(split), torch.randn(len(split.captions), 8),
                         split.caption_offsets().tolist())
    before = threading.active_count()
    it = iter(PreparedLoader(ds, list(range(len(ds))), batch_size=1, prefetch=1))
    next(it)
    it.close()  # the consumer stops early (an epoch cut short): the reader must not linger
    assert threading.active_count() == before

    class Broken(PreparedDataset):
        def __getitems__(self, idx):
            raise OSError(f"{p.path}/images.u8: read error")
    broken = Broken(p, p.rows_for(split), None)
    with pytest.raises(OSError, match="read error"):
        list(PreparedLoader(broken, list(range(len(broken))), batch_size=4))


def test_device_transform_normalise_layouts_agree():
    """The vectorised channels_last path and the NCHW path compute the same (x - mean) / std."""
    tf = DeviceTransform(8, MEAN, STD)
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)  # [B, H, W, 3]
    ref = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = tf(x)  # channels_last view in, channels_last out
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tf._normalise(x.permute(0, 3, 1, 2).contiguous()), ref, atol=1e-5, rtol=1e-5)


def test_device_transform_eval_matches_jpeg_path(split, tmp_path):
    prepare_images(split, tmp_path / "p", size=64, workers=1, progress=False)
    p = PreparedImages.open(tmp_path / "p")
    tf = DeviceTransform(48, MEAN, STD)
    x = tf(torch.from_numpy(np.array(p.array[:2])))
    assert x.shape == (2, 3, 48, 48) and x.dtype == torch.float32
    ref = torch.stack([build_transform(48, MEAN, STD)(load_image(split.images[i].path)[0]) for i in range(2)])
    # Different resampling order (square first), same picture: small mean difference.
    assert (x - ref).abs().mean() < 0.08


def test_device_transform_normalises_and_augments():
    mean_colour = torch.tensor([round(m * 255) for m in MEAN], dtype=torch.uint8)
    img = mean_colour.view(1, 1, 1, 3).expand(2, 40, 40, 3).contiguous()
    assert DeviceTransform(32, MEAN, STD)(img).abs().max() < 0.02
    # A left/right asymmetric image: augmentation crops and flips per sample, reproducibly.
    asym = torch.zeros(8, 40, 40, 3, dtype=torch.uint8)
    asym[:, :, :20] = 255
    aug = DeviceTransform(32, MEAN, STD, augment=True, scale=(0.9, 1.0))
    a = aug(asym, torch.Generator().manual_seed(0))
    b = aug(asym, torch.Generator().manual_seed(0))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    left_bright = a[:, 0, :, :8].mean((1, 2)) > a[:, 0, :, -8:].mean((1, 2))
    assert 0 < int(left_bright.sum()) < 8  # some samples flipped, some not


def test_training_reads_the_prepared_cache(coco_root, tiny_clip_dir, tmp_path, caplog):
    """`clipft prepare-images` then `clipft train`: batches come from the uint8 cache (no JPEG decoding),
    the run learns a finite loss, and turning the cache off falls back to JPEGs."""
    import logging
    import shutil

    from clipft.train import loop as train_mod
    from clipft.cli.commands import main
    from train.test_loop import small_args

    root = tmp_path / "coco"
    shutil.copytree(coco_root, root, ignore=shutil.ignore_patterns("cache"))
    assert main(["prepare-images", "--data", str(root), "--split", "train", "--size", "40", "--quiet"]) == 0
    assert (root / "cache" / "images" / "train-40" / "images.u8").is_file()
    seen = []  # (dtype, side of the uint8 batch handed to train_step, whether a device transform came with it)
    real = train_mod.train_step

    def spy(model, micro, *a, **kw):
        seen.append((micro[0][0].dtype, micro[0][0].shape[1], kw.get("transform") is not None))
        return real(model, micro, *a, **kw)
    caplog.set_level(logging.INFO, logger="clipft.train.loop")
    args = small_args(tiny_clip_dir, 1, ["--set", "data.prepared_size=40", "--set", "data.augment=true"])
    with train_mod.use_hooks(step=spy):
        assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), *args]) == 0
    # Prepared rows are 40 px squares; the device transform crops/resizes them to data.image_size (32).
    assert seen and all(d == torch.uint8 and side == 40 and has_tf for d, side, has_tf in seen)
    assert "prepared cache" in caplog.text
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in rec if r["type"] == "epoch")

    seen.clear()
    caplog.clear()
    args = small_args(tiny_clip_dir, 1, ["--set", "data.prepared=false"])
    with train_mod.use_hooks(step=spy):
        assert main(["train", "--data", str(root), "--out", str(tmp_path / "run2"), *args]) == 0
    # JPEG path: workers decode and crop to 32 px uint8; the device transform only normalises.
    assert seen and all(d == torch.uint8 and side == 32 and has_tf for d, side, has_tf in seen)
    assert "prepared cache" not in caplog.text


# --------------------------------------------------------------------------- integrity (driven through the CLI)

def _prepare_cli(root, *extra):
    from clipft.cli.commands import main
    return main(["prepare-images", "--data", str(root), "--split", "train", "--size", "32", "--workers", "1",
                 "--quiet", *extra])


@pytest.fixture()
def small_coco(tmp_path):
    """10 train images prepared at 32 px in chunks of 3 (chunks 0..3), where the CLI puts them; the
    CLI's reruns keep the chunk size the cache was made with."""
    root = make_shapes_dataset(tmp_path / "coco", n_train=10, n_val=2, seed=2, image_size=48)
    out = root / "cache" / "images" / "train-32"
    prepare_images(load_coco_captions(root, "train"), out, size=32, workers=1, progress=False, root=root, chunk=3)
    return root, out


def _row_bytes():
    return 32 * 32 * 3


def test_checksums_catch_a_flipped_byte_and_rerun_repairs_only_that_chunk(small_coco, caplog):
    root, out = small_coco
    pristine = np.array(PreparedImages.open(out).array)
    idx = json.loads((out / "index.json").read_text())
    assert idx["version"] == prep.FORMAT_VERSION and idx["chunk"] == 3 and sorted(idx["checksums"]) == list("0123")
    with open(out / "images.u8", "r+b") as f:  # one flipped byte in image 4 (chunk 1)
        f.seek(4 * _row_bytes() + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    p = PreparedImages.open(out)  # the sizes are right: only the checksums can tell
    assert p.damaged_chunks() == [1]
    with pytest.raises(DataError, match=r"images\.u8: 1 of 4 checked chunk\(s\) do not match .*images 3-5"):
        p.verify()
    decoded = []
    info = prepare_images(load_coco_captions(root, "train"), out, size=32, workers=1, progress=False, root=root,
                          work=lambda job: decoded.append(job[0]) or prep._work(job))
    assert decoded == [1] and info["repaired"] == 1  # only the damaged chunk is decoded again
    assert "do not match their checksums" in caplog.text
    assert np.array_equal(PreparedImages.open(out).array, pristine)
    PreparedImages.open(out).verify()


def test_zeroed_images_are_refused_by_training_and_rebuilt(small_coco, tiny_clip_dir, tmp_path, capsys, caplog):
    """256 zeroed images (here: a chunk's worth, 3) pass every size check; training refuses them with
    one line, `prepare-images` rebuilds them, and training then reads the cache."""
    from clipft.cli.commands import main
    from train.test_loop import small_args
    root, out = small_coco
    with open(out / "images.u8", "r+b") as f:
        f.seek(6 * _row_bytes())
        f.write(bytes(3 * _row_bytes()))  # chunk 2 zeroed
    args = small_args(tiny_clip_dir, 1, ["--set", "data.prepared_size=32"])
    capsys.readouterr()
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"clipft: error: {out / 'images.u8'}: ")
    assert "do not match their checksums" in err and "clipft prepare-images" in err
    assert not (tmp_path / "run" / "last.pt").exists()
    assert _prepare_cli(root) == 0
    assert "1 of 4 finished chunk(s) do not match their checksums (first: images 6-8): decoding them again" \
        in caplog.text
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), *args]) == 0


def test_truncated_cache_is_not_complete_and_training_says_so(small_coco, tiny_clip_dir, tmp_path, capsys,
                                                                 caplog):
    """A truncated images.u8 was once reported complete, then training died in mmap."""
    from clipft.cli.commands import main
    from train.test_loop import small_args
    root, out = small_coco
    pristine = np.array(PreparedImages.open(out).array)
    with open(out / "images.u8", "r+b") as f:
        f.truncate(5 * _row_bytes() + 7)
    args = small_args(tiny_clip_dir, 1, ["--set", "data.prepared_size=32"])
    capsys.readouterr()
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "images.u8: " in err and "truncated" in err and "mmap" not in err
    assert _prepare_cli(root) == 0
    assert "3 of 4 finished chunk(s) do not match" in caplog.text  # chunk 1 torn, chunks 2 and 3 gone
    assert np.array_equal(PreparedImages.open(out).array, pristine)


def test_resume_reverifies_the_chunks_done_json_lists(split, tmp_path):
    """A kill mid-prepare, then a chunk listed as done is altered: the resume decodes it again."""
    out = tmp_path / "p"
    real = prep._work

    def dies_on_chunk_2(job):
        if job[0] == 2:
            raise KeyboardInterrupt
        return real(job)
    with pytest.raises(KeyboardInterrupt):
        prepare_images(split, out, size=32, workers=1, progress=False, chunk=3, work=dies_on_chunk_2)
    assert sorted(json.loads((out / "done.json").read_text())["done"]) == [0, 1]
    with open(out / "images.u8", "r+b") as f:
        f.seek(32 * 32 * 3 + 5)  # image 1: chunk 0
        f.write(b"\xff\x00\xff")
    decoded = []
    info = prepare_images(split, out, size=32, workers=1, progress=False,
                          work=lambda job: decoded.append(job[0]) or real(job))  # chunk 3: kept from the start
    assert decoded == [0, 2, 3] and info["repaired"] == 1
    fresh = tmp_path / "fresh"
    prepare_images(split, fresh, size=32, workers=1, progress=False, chunk=3)
    assert np.array_equal(PreparedImages.open(out).array, PreparedImages.open(fresh).array)


def test_spelling_of_the_data_path_does_not_matter(tmp_path, monkeypatch, capsys, caplog):
    """`--data s2` and `--data /abs/s2` are one cache: no rebuild, and training finds every image."""
    import logging

    from clipft.config import Config
    from clipft.data import load_split
    from clipft.data.caches import data_root
    root = make_shapes_dataset(tmp_path / "s2", n_train=6, n_val=2, seed=3, image_size=40)
    monkeypatch.chdir(tmp_path)
    assert _prepare_cli("s2") == 0
    caplog.set_level(logging.INFO, logger="clipft.data.prepare")
    capsys.readouterr()
    for spelling in (str(root), "./s2", f"{tmp_path}/./s2/"):
        assert _prepare_cli(spelling) == 0
        assert "in 0.0s" in capsys.readouterr().out, spelling  # reported complete, not rebuilt
        cfg = Config()
        split = load_split(spelling, "train", cfg.data)
        p = PreparedImages.open(Path(spelling) / "cache" / "images" / "train-32")
        assert p.rows_for(split, data_root(spelling, "train", cfg)) is not None, spelling
    assert "preparing it again" not in caplog.text
    assert all(not q.startswith("/") for q in PreparedImages.open(root / "cache" / "images" / "train-32").paths)


_SLOW_PREPARE = """
import sys, time
from clipft.data import prepare as prep, load_coco_captions
def slow(job):
    time.sleep(600)
    return prep._work(job)
prep.prepare_images(load_coco_captions(sys.argv[1], "train"), sys.argv[2], size=16, workers=2, progress=False,
                    work=slow)
"""


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc to find the worker processes")
def test_workers_die_with_their_parent(split, tmp_path):
    """SIGKILL to `prepare-images` used to leave its decoding workers running (~390 MB each)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    env = {**os.environ, "PYTHONPATH": str(Path(prep.__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(split.images[0].path.parents[1]),
                             str(tmp_path / "p")], env=env)
    try:
        workers: list[int] = []
        for _ in range(600):  # until both workers are up (they sleep in their first chunk)
            workers = [c for c in _children(proc.pid) if Path(f"/proc/{c}/cmdline").read_bytes()]
            if len(workers) >= 2:
                break
            time.sleep(0.1)
        assert len(workers) >= 2
        time.sleep(1.0)  # let the initializers run
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    for _ in range(300):
        if not any(alive(w) for w in workers):
            break
        time.sleep(0.1)
    left = [w for w in workers if alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, "prepare-images workers outlived their parent"


def test_a_full_disk_is_one_line_before_any_decoding(tmp_path, small_tmpfs, capsys):
    """16 images at 256 px need 3 MB; the 2 MB disk is found full before the first image is decoded
    (it used to end in a SIGBUS in a worker, or a broken process pool)."""
    from clipft.cli.commands import main
    root = make_shapes_dataset(tmp_path / "coco", n_train=16, n_val=2, seed=8, image_size=40)
    args = ["prepare-images", "--data", str(root), "--split", "train", "--size", "256", "--workers", "1", "--quiet",
            "--set", f"text.cache_dir={small_tmpfs}"]
    assert main(args) == 2
    array = small_tmpfs / "images" / "train-256" / "images.u8"
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clipft: error: {array}: no space left on device (needs about 3.0 MB, ") and "\n" not in err
    assert array.stat().st_size == 0  # not left looking reserved
    assert not (array.parent / "done.json").exists()  # no chunk was decoded


def test_default_prepare_of_small_images_is_the_cache_default_training_reads(tmp_path):
    """Images smaller than data.prepared_size are still prepared at that size (resized as evaluation
    resizes them), so the next default `clipft train` finds the cache where it looks for it."""
    from clipft.config import Config
    from clipft.data import prepared_split_dir
    from clipft.data.prepared_reader import PreparedImages
    root = make_shapes_dataset(tmp_path / "d", n_train=3, n_val=1, image_size=48)
    cfg = Config()
    info = prep.prepare_split(root, "train", cfg, workers=1, progress=False)
    assert info["size"] == cfg.data.prepared_size
    opened = PreparedImages.open(prepared_split_dir(root, cfg.data.train_split, cfg))
    assert opened is not None and opened.size == cfg.data.prepared_size


def test_training_says_why_a_prepared_cache_of_another_size_is_unused(coco_root, tiny_clip_dir, tmp_path, caplog):
    import logging
    import shutil

    from clipft.cli.commands import main
    from train.test_loop import small_args
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root, ignore=shutil.ignore_patterns("cache"))
    assert main(["prepare-images", "--data", str(root), "--split", "train", "--size", "40", "--quiet"]) == 0
    caplog.set_level(logging.INFO, logger="clipft.train.loop")
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), *small_args(tiny_clip_dir, 1)]) == 0
    assert "prepared at 40 px but data.prepared_size is 224: decoding JPEGs instead; set --set " \
           "data.prepared_size=40" in caplog.text
