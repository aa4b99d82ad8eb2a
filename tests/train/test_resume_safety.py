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

from train.test_loop import small_args

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
    from clipft.data.device_transform import DeviceTransform
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


class _Payload:
    """Pickles to a call of os.system: loading it with a full unpickler touches `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path, marker):
    """A .pt that looks like a clipft checkpoint and runs a command when unpickled."""
    torch.save({"model": _Payload(marker), "model_config": {}, "embed_dim": 16, "epoch": 1, "step": 3,
                "config": {}}, path)


@pytest.mark.parametrize("command", ["load", "export", "evaluate", "embed", "resume"])
def test_a_checkpoint_with_a_payload_never_runs_it(command, coco_root, tiny_clip_dir, tmp_path, capsys):
    marker, bad = tmp_path / "ran", tmp_path / "model.pt"
    _plant(bad, marker)
    if command == "load":
        import clipft
        from clipft.model import ModelError
        with pytest.raises(ModelError) as e:
            clipft.load(bad)
        err = str(e.value)
    else:
        argv = {"export": ["export", str(bad), "--out", str(tmp_path / "out")],
                "evaluate": ["evaluate", "--checkpoint", str(bad), "--data", str(coco_root), "--quiet"],
                "embed": ["embed", "--model", str(bad), "--images", str(coco_root), "--out", str(tmp_path / "e.st")],
                "resume": ["train", "--data", str(coco_root), "--out", str(tmp_path / "run"),
                           *small_args(tiny_clip_dir, 1)]}[command]
        if command == "resume":
            (tmp_path / "run").mkdir()
            shutil.copy(bad, tmp_path / "run" / "last.pt")
        capsys.readouterr()
        assert main(argv) != 0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
    assert not marker.exists(), "the checkpoint's payload ran"
    assert "not a clipft" in err and "refused without running it" in err, err


def test_evaluate_names_what_is_wrong_with_a_file(trained_run, coco_root, tmp_path, capsys):
    csv = tmp_path / "data.csv"
    csv.write_text("image,caption\na.jpg,a cat\n")
    assert main(["evaluate", "--checkpoint", str(csv), "--data", str(coco_root), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.csv" in err and "not a readable checkpoint" in err, err
    ckpt = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    del ckpt["embed_dim"], ckpt["checksum"]
    torch.save(ckpt, tmp_path / "no_dim.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "no_dim.pt"), "--data", str(coco_root), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_dim.pt: not a clipft checkpoint (no embed_dim entries)" in err, err


def test_checkpoints_hold_plain_data_and_older_ones_still_load(trained_run, tmp_path):
    """weights_only=True reads what clipft writes; a checkpoint with numpy's RNG state as an ndarray
    (written before) loads too, and the resume puts that numpy state back."""
    import numpy as np
    from clipft.model import read_checkpoint
    from clipft.runtime import rng_state, set_rng_state
    ckpt = torch.load(trained_run / "last.pt", map_location="cpu", weights_only=True)
    old = {k: v for k, v in ckpt.items() if k != "checksum"}
    np.random.seed(7)
    old["rng"] = {**ckpt["rng"], "numpy": np.random.get_state()}
    torch.save(old, tmp_path / "old.pt")
    again = read_checkpoint(tmp_path / "old.pt", require=("epoch", "step"))
    np.random.seed(1)
    set_rng_state(again["rng"])
    np.random.seed(7)
    want = np.random.rand(3)
    set_rng_state(again["rng"])
    assert np.array_equal(np.random.rand(3), want)
    set_rng_state(rng_state())  # the plain form round-trips too


def _flip_tensor_byte(path, member_suffix, offset_in_data, xor=0x40):
    """Flip one byte inside the stored bytes of a torch.save zip member (tensor data, not the pickle)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if i.filename.endswith(member_suffix)), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + offset_in_data
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ xor]))


def test_a_flipped_byte_in_last_pt_falls_back_to_last_prev(tmp_path, caplog):
    from clipft import distributed
    from clipft.train.checkpoint import Checkpointer
    from clipft.train.rundir import RunFiles
    run = RunFiles(tmp_path)
    single = distributed.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None,
                                     created=False)
    ck = Checkpointer(run, single)
    weights = torch.ones(1000)  # 1.0 = 0x3f800000: one flipped exponent bit and it is another number
    ck.save({"epoch": 1, "step": 3, "model": {"w": weights}}, is_best=False)
    ck.save({"epoch": 2, "step": 6, "model": {"w": weights * 2}}, is_best=False)
    _flip_tensor_byte(run.last, "/data/0", 4 * 500 + 3)  # the exponent byte of element 500
    with caplog.at_level("WARNING"):
        got = Checkpointer(run, single).open_resume(True)
    assert got["epoch"] == 1 and torch.equal(got["model"]["w"], weights)
    assert "does not match its checksum" in caplog.text and "resuming from" in caplog.text


def test_a_flipped_byte_in_a_text_cache_rebuilds_it(tiny_clip_dir, tmp_path, caplog):
    from clipft.text import get_text_embeddings
    captions = ["a red square", "a blue circle", "two green triangles"]
    cache = tmp_path / "text.safetensors"
    emb, info = get_text_embeddings(captions, str(tiny_clip_dir), cache)
    assert info["built"]
    data = bytearray(cache.read_bytes())
    data[-5] ^= 0x40  # inside the last embedding's float bytes
    cache.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        again, info = get_text_embeddings(captions, str(tiny_clip_dir), cache)
    assert info["built"] and torch.equal(again, emb)
    assert "do not match their checksum" in caplog.text and "rebuilding" in caplog.text


class _Killed(BaseException):
    """Stands in for a SIGKILL: nothing after it runs."""


def test_a_kill_while_best_pt_is_written_is_repaired_by_the_rerun(coco_root, tiny_clip_dir, tmp_path, monkeypatch):
    from clipft.train import checkpoint as ck
    run = tmp_path / "run"
    real, seen = ck.atomic_torch_save, []

    def killed_writing_epoch2_best(obj, path, *args, **kwargs):
        if path.name == "best.pt" and obj["epoch"] == 2:
            raise _Killed()
        return real(obj, path, *args, **kwargs)

    def rising(val, k):  # every epoch is the best so far
        seen.append(1)
        return float(len(seen))
    monkeypatch.setattr(ck, "atomic_torch_save", killed_writing_epoch2_best)
    with train_mod.use_hooks(metric=rising), pytest.raises(_Killed):
        main(["train", "--data", str(coco_root), "--out", str(run), *small_args(tiny_clip_dir, 2)])
    monkeypatch.setattr(ck, "atomic_torch_save", real)
    assert torch.load(run / "best.pt", weights_only=False)["epoch"] == 1  # the kill left epoch 1's
    with train_mod.use_hooks(metric=rising):
        assert main(["train", "--data", str(coco_root), "--out", str(run), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    best = torch.load(run / "best.pt", weights_only=False)
    assert summary["best_epoch"] == best["epoch"] == 2
    assert all(torch.equal(v, best["model"][k]) for k, v in _weights(run / "last.pt").items())


def test_an_image_edited_in_place_is_other_data(coco_root, tiny_clip_dir, tmp_path, capsys):
    from PIL import Image
    root, run = tmp_path / "coco", tmp_path / "run"
    shutil.copytree(coco_root, root)
    assert main(["train", "--data", str(root), "--out", str(run), *small_args(tiny_clip_dir, 1)]) == 0
    image = sorted((root / "train2014").glob("*.jpg"))[3]
    with Image.open(image) as im:
        im.convert("L").convert("RGB").save(image, quality=60)  # same name, other pixels
    capsys.readouterr()
    assert main(["train", "--data", str(root), "--out", str(run), *small_args(tiny_clip_dir, 2)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trained on other data" in err and "image" in err, err
