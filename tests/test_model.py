import math
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from clipft.config import ModelConfig
from clipft.model import (BACKBONES, ModelError, build_image_tower, count_parameters, imagenet_weights,
                          load_image_tower, read_checkpoint, tower_state)


def tower(backbone="resnet18", **kw):
    return build_image_tower(ModelConfig(backbone=backbone, image_weights="none", head_hidden=32, **kw), embed_dim=16)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_contract_shapes_norm_and_every_trainable_param_gets_grad(backbone):
    torch.manual_seed(0)
    m = tower(backbone, learnable_temperature=True)
    x = torch.randn(2, 3, 64, 64)
    emb = m(x)
    assert emb.shape == (2, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    # A loss that touches the logit scale too, as training does.
    (m.logit_scale.exp() * (emb @ torch.randn(16, 2)).sum()).backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert missing == []
    assert BACKBONES[backbone][3] == m.head.net[0].in_features


def test_fixed_temperature_is_not_trainable_and_clamp_holds():
    m = tower()
    assert not m.logit_scale.requires_grad
    assert math.isclose(float(m.logit_scale.exp()), 1 / 0.07, rel_tol=1e-6)
    m2 = tower(learnable_temperature=True, max_logit_scale=100.0)
    assert m2.logit_scale.requires_grad
    with torch.no_grad():
        m2.logit_scale.fill_(10.0)  # exp(10) >> 100
    m2.clamp_logit_scale_()
    assert m2.logit_scale.exp().item() == pytest.approx(100.0)
    trainable = count_parameters(m2)["trainable"]
    assert trainable == count_parameters(m)["trainable"] + 1


def test_unknown_backbone_and_weights():
    with pytest.raises(ModelError, match="unknown backbone"):
        tower("vgg")
    with pytest.raises(ModelError, match="image_weights"):
        build_image_tower(ModelConfig(backbone="resnet18", image_weights="laion"), 8)


def test_imagenet_weights_load_through_torchvision_enum(tmp_path, monkeypatch):
    # The real loading path (torchvision weights enum -> torch hub cache), fed a file we made.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    w = imagenet_weights("resnet18")
    assert w == torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    ref = torchvision.models.resnet18()
    with torch.no_grad():
        ref.conv1.weight.fill_(0.125)
    dest = tmp_path / "hub" / "checkpoints" / Path(w.url).name
    dest.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), dest)
    m = build_image_tower(ModelConfig(backbone="resnet18", image_weights="imagenet", head_hidden=8), 4)
    assert torch.all(m.backbone.conv1.weight == 0.125)


def test_imagenet_weights_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def no_network(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    with pytest.raises(ModelError, match="image_weights=none") as e:
        build_image_tower(ModelConfig(backbone="resnet50", image_weights="imagenet"), 8)
    assert "resnet50" in str(e.value) and "checkpoints" in str(e.value)


def test_checkpoint_round_trip(tmp_path):
    m = tower(learnable_temperature=True)
    with torch.no_grad():
        m.logit_scale.fill_(2.0)
    p = tmp_path / "ckpt.pt"
    torch.save({**tower_state(m), "config": {}}, p)
    m2 = load_image_tower(p)
    x = torch.randn(3, 3, 64, 64)
    m.eval()
    assert torch.allclose(m(x), m2(x), atol=1e-6)
    assert m2.logit_scale.item() == 2.0 and not m2.training


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=str(bad)):
        read_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ModelError, match="not a clipft checkpoint"):
        read_checkpoint(other)
