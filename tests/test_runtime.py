import random

import numpy as np
import pytest
import torch

from clipft.config import ConfigError
from clipft.runtime import (amp_dtype_for, atomic_torch_save, hardware_info, resolve_device, rng_state,
                            seed_everything, set_rng_state)


def test_device_and_amp_on_cpu():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    # AMP is a CUDA-only feature here: CPU training runs fp32.
    assert amp_dtype_for(torch.device("cpu"), True) is None
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_amp_dtype_on_cuda():
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert amp_dtype_for(torch.device("cuda"), True) == want
    assert amp_dtype_for(torch.device("cuda"), False) is None


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
    from clipft.cli import main
    from test_train import small_args
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
