"""Resume exactness with decoding workers and augmentation, world-size changes, safe checkpoint
loading (weights_only), checksums of checkpoints and text caches, best.pt vs summary.json after a
kill, and the data identity covering pixels."""

from __future__ import annotations

import json
import os
import signal
import shutil

import pytest
import torch

from clipft.cli.commands import main
from clipft.train import loop as train_mod

from test_train import small_args

# JPEG path with 2 decoding workers, random resized crops, flips and colour jitter.
WORKERS_AUGMENT = ["--set", "data.augment=true", "--set", "data.color_jitter=0.4", "--set", "data.num_workers=2",
                   "--set", "data.prepared=false"]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _stop_at(at_step, sig=signal.SIGTERM):
    """A train_step hook that sends `sig` to this process while step `at_step` runs."""
    real, calls = train_mod.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    return step


def test_mid_epoch_resume_is_exact_with_workers_and_augmentation(coco_root, tiny_clip_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = small_args(tiny_clip_dir, 2, WORKERS_AUGMENT)
    assert main(["train", "--data", str(coco_root), "--out", str(a), *args]) == 0
    with train_mod.use_hooks(step=_stop_at(2)):  # epoch 1, after its 2nd of 3 steps
        assert main(["train", "--data", str(coco_root), "--out", str(b), *args]) == 128 + signal.SIGTERM
    assert main(["train", "--data", str(coco_root), "--out", str(b), "--quiet"]) == 0
    sa, sb = _weights(a / "last.pt"), _weights(b / "last.pt")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_jpeg_augmentation_is_a_function_of_seed_epoch_and_sample(coco_root):
    """The same (seed, epoch, i) gives the same pixels whatever else the process drew before."""
    from clipft.data import TrainDataset, build_transform, load_split
    from clipft.config import DataConfig
    split = load_split(coco_root, "train", DataConfig())
    tf = build_transform(32, (0.5,) * 3, (0.5,) * 3, train=True, augment=True, color_jitter=0.4, output="uint8")
    ds = TrainDataset(split, torch.zeros(len(split.captions), 4), tf, seed=3)
    ds.set_epoch(2)
    torch.manual_seed(0)
    first = ds[5][0]
    torch.manual_seed(1)
    torch.rand(7)
    assert torch.equal(first, ds[5][0])
    ds.set_epoch(3)
    assert not torch.equal(first, ds[5][0])  # a new epoch, a new crop


def test_device_augmentation_is_a_function_of_seed_epoch_and_sample():
    """The prepared-cache path: a sample's crop and flip do not depend on its batch or the RNG."""
    from clipft.data.prepare import DeviceTransform
    tf = DeviceTransform(16, (0.5,) * 3, (0.5,) * 3, augment=True)
    images = torch.randint(0, 256, (4, 24, 24, 3), dtype=torch.uint8)
    keys = tf.sample_keys(seed=1, epoch=2, indices=torch.tensor([10, 11, 12, 13]))
    torch.manual_seed(0)
    whole = tf(images, keys=keys)
    torch.manual_seed(5)
    part = tf(images[2:], keys=keys[2:])
    assert torch.equal(whole[2:], part)
    other = tf(images, keys=tf.sample_keys(seed=1, epoch=3, indices=torch.tensor([10, 11, 12, 13])))
    assert not torch.equal(whole, other)


def _rewrite(path, **changes):
    """Change entries of a checkpoint the way clipft writes them (plain data, fresh checksum)."""
    from clipft.checkpoint_file import add_checksum
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    torch.save(add_checksum({**ckpt, **changes}), path)


def test_resuming_with_another_number_of_processes_is_refused(coco_root, tiny_clip_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(coco_root), "--out", str(run), *small_args(tiny_clip_dir, 1)]) == 0
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    _rewrite(run / "last.pt", world_size=2, rng_per_rank=[ckpt["rng"], ckpt["rng"]])
    capsys.readouterr()
    assert main(["train", "--data", str(coco_root), "--out", str(run), *small_args(tiny_clip_dir, 2)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "written by 2 process(es), this run has 1" in err, err
