"""pyproject.toml's torch range: the minimum the code really needs, and a range the installed torch meets."""

import re
import tomllib
from pathlib import Path

import pytest
import torch

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _minimum(spec: list[str], name: str) -> tuple[int, ...]:
    for s in spec:
        m = re.fullmatch(rf"{name}\s*>=\s*([\d.]+)(,.*)?", s.strip())
        if m:
            return tuple(int(x) for x in m.group(1).split("."))
    raise AssertionError(f"no {name}>= in {spec}")


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", v).groups())


def test_declared_minimum_torch_is_what_the_code_needs():
    proj = tomllib.loads(PYPROJECT.read_text())["project"]
    deps, onnx = proj["dependencies"], proj["optional-dependencies"]["onnx"]
    # torch.amp.GradScaler(device) (the trainer's fp16 scaler) is torch 2.3; torchvision 0.18 is its pair.
    assert _minimum(deps, "torch") >= (2, 3)
    assert _minimum(deps, "torchvision") >= (0, 18)
    # torch.onnx.export(dynamo=True, dynamic_shapes=..., external_data=...) is torch 2.5: the onnx extra says so.
    assert _minimum(onnx, "torch") >= (2, 5)
    # and the range admits the torch this machine runs (e.g. 2.14.1 / torchvision 0.29.1)
    import torchvision
    assert _version(torch.__version__) >= _minimum(deps, "torch") and _version(torch.__version__) < (3,)
    assert _version(torchvision.__version__) >= _minimum(deps, "torchvision")


def test_onnx_export_on_an_older_torch_is_one_clear_line(monkeypatch):
    from clipft import export
    from clipft.model import ModelError
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(ModelError, match=r"torch >= 2\.5.*2\.4\.1"):
        export.check_onnx_tools()
