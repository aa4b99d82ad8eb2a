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


def test_worker_count_is_capped_at_the_cpus_available(monkeypatch):
    import clipft.runtime as rt
    monkeypatch.setattr(rt.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert rt.available_cpus() == 2
    assert rt.worker_count(4) == 2 and rt.worker_count(2) == 2 and rt.worker_count(0) == 0
