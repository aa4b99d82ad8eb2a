import random

import numpy as np
import pytest
import torch

from clipft.config import ConfigError
from clipft.config import Config, apply_overrides, from_dict, to_dict
from clipft.runtime import (Precision, amp_dtype_for, atomic_torch_save, cpu_has_native_bf16, hardware_info,
                            resolve_device, rng_state, seed_everything, set_rng_state, select_precision)

CPU = torch.device("cpu")


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_auto_precision_on_a_cpu_with_and_without_bf16():
    """cpu_bf16 is the seam standing in for the CPU check: both branches run on any machine."""
    with_bf16 = select_precision(CPU, "auto", cpu_bf16=True)
    assert (with_bf16.dtype, with_bf16.channels_last, with_bf16.name) == (torch.bfloat16, True, "bf16")
    assert "native bf16" in with_bf16.reason
    without = select_precision(CPU, "auto", cpu_bf16=False)
    assert (without.dtype, without.channels_last, without.name) == (None, False, "fp32")
    assert "no native bf16" in without.reason
    # Left to PyTorch's own check, auto follows it; channels_last=false keeps NCHW.
    assert select_precision(CPU, "auto").name == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert not select_precision(CPU, "auto", channels_last=False, cpu_bf16=True).channels_last
    assert amp_dtype_for(CPU, "auto") == select_precision(CPU, "auto").dtype


def test_explicit_precisions_and_refusals():
    assert select_precision(CPU, "off", cpu_bf16=True) == Precision(None, False, "train.amp=off")
    assert select_precision(CPU, "bf16", cpu_bf16=False).dtype == torch.bfloat16  # forced, even emulated
    assert select_precision(CPU, True, cpu_bf16=False).name == "fp32"  # a bool is auto/off
    assert select_precision(CPU, False, cpu_bf16=True).name == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        select_precision(CPU, "fp16")
    with pytest.raises(ConfigError, match="train.amp must be one of auto, bf16, fp16, off"):
        select_precision(CPU, "half")
    rec = select_precision(CPU, "auto", cpu_bf16=True).to_dict()
    assert rec == {"dtype": "bf16", "channels_last": True, "reason": "auto: this CPU has native bf16"}


def test_precision_autocast_context():
    x, w = torch.randn(4, 8), torch.randn(8, 2)
    with select_precision(CPU, "auto", cpu_bf16=True).autocast(CPU):
        assert (x @ w).dtype == torch.bfloat16
    with select_precision(CPU, "off").autocast(CPU):
        assert (x @ w).dtype == torch.float32


def test_config_refuses_unknown_amp_and_negative_chunk():
    from clipft.config import load_config
    with pytest.raises(ConfigError, match="train.amp must be one of auto, bf16, fp16, off"):
        load_config(overrides=["train.amp=half"])
    with pytest.raises(ConfigError, match="train.embed_chunk must be"):
        load_config(overrides=["train.embed_chunk=-1"])
    assert load_config(overrides=["train.embed_chunk=64"]).train.embed_chunk == 64


def test_amp_config_reads_older_booleans():
    assert Config().train.amp == "auto"
    cfg = apply_overrides(Config(), ["train.amp=false"])
    assert cfg.train.amp == "off"
    assert apply_overrides(Config(), ["train.amp=bf16"]).train.amp == "bf16"
    saved = to_dict(Config())
    saved["train"]["amp"] = True  # a config.json written before amp had modes
    assert from_dict(saved).train.amp == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_amp_dtype_on_cuda():
    cuda = torch.device("cuda")
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert select_precision(cuda, "auto").dtype == want and select_precision(cuda, "auto").channels_last
    assert select_precision(cuda, "fp16").dtype == torch.float16
    assert select_precision(cuda, "off").dtype is None and select_precision(cuda, "off").channels_last


def test_rng_round_trip():
    seed_everything(3)
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b


def test_atomic_save_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "last.pt"
    atomic_torch_save({"v": 1}, p)
    atomic_torch_save({"v": 2}, p)
    assert torch.load(p)["v"] == 2
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]


def test_atomic_save_failure_keeps_previous_file(tmp_path):
    p = tmp_path / "last.pt"
    atomic_torch_save({"v": 1}, p)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"v": Unpicklable()}, p)
    assert torch.load(p)["v"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]


def test_hardware_info():
    info = hardware_info(torch.device("cpu"))
    assert info["cpu"] and info["cpu_count"] >= 1 and info["torch"] == torch.__version__


def test_storage_error_reads_errno_through_wrapped_errors(tmp_path):
    """torch.save and safetensors wrap a failed write in their own error types; the errno (or its
    words) is found in the chain. An explicit seam, so this runs where no small disk can be made."""
    import errno

    from clipft.runtime import storage_error
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from inner
    except RuntimeError as e:
        err = storage_error(tmp_path / "last.pt", e, needed=3 * 1024 * 1024)
    assert err is not None and str(err).startswith(f"{tmp_path / 'last.pt'}: no space left on device (needs about 3.0 MB, ")
    assert "\n" not in str(err)
    assert "cannot write here (read-only" in str(storage_error("x", OSError(errno.EROFS, "Read-only file system")))
    assert storage_error("x", ValueError("something else")) is None


def test_atomic_save_on_a_full_disk_is_one_line_and_keeps_the_previous_file(small_tmpfs):
    from clipft.runtime import StorageError
    path = small_tmpfs / "last.pt"
    atomic_torch_save({"w": torch.zeros(1000)}, path)  # 4 KB: fits
    with pytest.raises(StorageError) as e:
        atomic_torch_save({"w": torch.zeros(1_000_000)}, path)  # 3.8 MB on a 2 MB disk
    msg = str(e.value)
    assert msg.startswith(f"{path}: no space left on device (needs about 3.8 MB, ") and "free" in msg
    assert "\n" not in msg and "inline_container" not in msg
    assert torch.load(path)["w"].shape == (1000,)  # the previous checkpoint is intact
    assert [p.name for p in small_tmpfs.iterdir()] == ["last.pt"]  # no temp file left


def test_umask_is_applied(tmp_path):
    import os

    from clipft.runtime import apply_umask, process_umask
    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        f = tmp_path / "f"
        f.write_bytes(b"")
        os.chmod(f, 0o600)
        apply_umask(f)
        assert f.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_train_on_a_full_disk_ends_in_one_line(coco_root, tiny_clip_dir, small_tmpfs, capsys):
    """`clipft train --out` on a 2 MB disk: the first checkpoint does not fit. One line naming the
    file and the space it needed (not two chained tracebacks), and no temp file left."""
    from clipft.cli.commands import main
    from train.test_loop import small_args
    run = small_tmpfs / "run"
    assert main(["train", "--data", str(coco_root), "--out", str(run), *small_args(tiny_clip_dir, 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"clipft: error: {run}/"), err
    assert "no space left on device (needs about " in err[0] and " MB" in err[0]
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_overriding_sets_existing_attributes_and_restores_them():
    import types

    import pytest

    from clipft.runtime import overriding
    hooks = types.SimpleNamespace(step="real")
    with overriding(hooks, step="fake") as h:
        assert h.step == "fake"
    assert hooks.step == "real"
    with pytest.raises(AttributeError, match="no stpe"):  # a typo is an error, not a silent new seam
        with overriding(hooks, stpe="fake"):
            pass
    with pytest.raises(KeyError):
        with overriding(hooks, step="fake"):
            raise KeyError("restored on errors too")
    assert hooks.step == "real"


def test_auto_keeps_small_cpu_images_in_fp32():
    """Below 64 px a ResNet's last stages run on 1x1 maps, where oneDNN's bf16 stride-2 convolution
    gives wrong weight gradients: auto stays fp32 there; bf16 can still be forced."""
    from clipft.runtime import CPU_BF16_MIN_SIZE, select_precision
    cpu = torch.device("cpu")
    small = select_precision(cpu, "auto", cpu_bf16=True, image_size=CPU_BF16_MIN_SIZE - 1)
    assert small.dtype is None and "below 64 px" in small.reason
    assert select_precision(cpu, "auto", cpu_bf16=True, image_size=CPU_BF16_MIN_SIZE).dtype == torch.bfloat16
    assert select_precision(cpu, "bf16", image_size=32).dtype == torch.bfloat16


def test_worker_count_is_capped_at_the_cpus_available(monkeypatch):
    import clipft.runtime as rt
    monkeypatch.setattr(rt.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert rt.available_cpus() == 2
    assert rt.worker_count(4) == 2 and rt.worker_count(2) == 2 and rt.worker_count(0) == 0
