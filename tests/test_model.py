import math
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from clipft.config import ConfigError, ModelConfig
from clipft.model import (BACKBONES, AttentionPool2d, ModelError, build_image_tower, count_parameters,
                          head_widths, imagenet_weights, load_image_tower, parameter_parts, read_checkpoint,
                          tower_state)


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
    with pytest.raises(ConfigError, match="image_weights"):  # a choice of the schema: refused as the config is built
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


# --------------------------------------------------------------------------- ablation variants

def test_default_head_is_unchanged():
    m = tower()
    assert [type(x).__name__ for x in m.head.net] == ["Linear", "GELU", "Linear"]
    assert m.head.shortcut is None and m.pool is None
    assert not [k for k in m.state_dict() if k.startswith(("pool.", "head.shortcut"))]


@pytest.mark.parametrize("kw,kinds", [
    (dict(head_norm="batchnorm"), ["Linear", "BatchNorm1d", "GELU", "Linear"]),
    (dict(head_norm="layernorm"), ["Linear", "LayerNorm", "GELU", "Linear"]),
    (dict(head_dropout=0.3), ["Linear", "GELU", "Dropout", "Linear"]),
    (dict(head_layers=3, head_norm="batchnorm"),
     ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]),
    (dict(head_layers=1), ["Linear"]),
])
def test_head_variants(kw, kinds):
    m = tower(**kw)
    assert [type(x).__name__ for x in m.head.net] == kinds
    emb = m(torch.randn(4, 3, 32, 32))
    assert emb.shape == (4, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_deep_head_widths_halve():
    assert head_widths(2048, 1024, 3, 512) == [2048, 1024, 512, 512]  # the 2048->1024->512->D
    m = tower(head_layers=3)
    assert [l.out_features for l in m.head.net if isinstance(l, torch.nn.Linear)] == [32, 16, 16]


def test_residual_head_adds_a_linear_shortcut():
    m = tower(head_residual=True).eval()
    x = torch.randn(3, 512)
    assert torch.allclose(m.head(x), m.head.net(x) + x @ m.head.shortcut.weight.T, atol=1e-6)


@pytest.mark.parametrize("size", [32, 96])  # 1x1 and 3x3 maps: positions resized from 7x7
def test_attention_pool_any_image_size_and_grads(size):
    torch.manual_seed(0)
    m = tower(pooling="attention")
    assert isinstance(m.pool, AttentionPool2d) and m.pool.attn.num_heads == 512 // 64
    emb = m(torch.randn(2, 3, size, size))
    assert emb.shape == (2, 16)
    emb.sum().backward()
    assert m.pool.positional_embedding.grad is not None and m.backbone.layer4[1].conv2.weight.grad is not None


def test_attention_pool_matches_clip_formula_at_native_grid():
    torch.manual_seed(0)
    pool = AttentionPool2d(dim=8, heads=2, grid=2).eval()
    x = torch.randn(3, 8, 2, 2)
    tokens = x.flatten(2).permute(2, 0, 1)  # [4, B, C]
    tokens = torch.cat([tokens.mean(0, keepdim=True), tokens]) + pool.positional_embedding[:, None]
    ref, _ = pool.attn(tokens[:1], tokens, tokens)
    assert torch.allclose(pool(x), ref[0], atol=1e-6)


@pytest.mark.parametrize("kw,error", [(dict(head_norm="nope"), ConfigError), (dict(pooling="max"), ConfigError),
                                      (dict(head_layers=0), ModelError), (dict(head_dropout=1.0), ModelError),
                                      (dict(trainable_stages=6), ModelError)])
def test_bad_variant_values(kw, error):
    # Choices are the schema's (ConfigError as the config is built), ranges the model's own.
    with pytest.raises(error, match=next(iter(kw))):
        tower(**kw)


def _backbone_state(m):
    return {k: v.clone() for k, v in m.backbone.state_dict().items()}


def test_trainable_stages_freeze_earlier_stages_and_their_bn_stats():
    m = tower(trainable_stages=2).train()
    frozen, trainable = ("conv1", "bn1", "layer1", "layer2"), ("layer3", "layer4")
    for name, p in m.backbone.named_parameters():
        assert p.requires_grad == name.startswith(trainable), name
    bns = {n: mod for n, mod in m.backbone.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)}
    assert all(not mod.training for n, mod in bns.items() if n.startswith(frozen))
    assert all(mod.training for n, mod in bns.items() if n.startswith(trainable))
    before = _backbone_state(m)
    m(torch.randn(4, 3, 32, 32))  # a train-mode forward: only unfrozen BNs update their stats
    after = m.backbone.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) == k.startswith(frozen) or "weight" in k or "bias" in k, k
    assert count_parameters(m)["trainable"] < count_parameters(tower())["trainable"]


def test_set_backbone_trainable_and_frozen_bn_stats():
    m = tower()
    m.set_backbone_trainable(False)
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert all(p.requires_grad for p in m.head.parameters())
    m.train()
    assert not any(mod.training for mod in m.backbone.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    m.set_backbone_trainable(True)
    assert all(p.requires_grad for p in m.backbone.parameters()) and m.backbone.bn1.training
    f = tower(freeze_bn_stats=True).train()
    assert all(p.requires_grad for p in f.backbone.parameters())  # affine weights still train
    before = _backbone_state(f)
    f(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in f.backbone.state_dict().items())
    assert f.head.net[0].weight.requires_grad and f.training


@pytest.mark.parametrize("kw", [dict(head_norm="batchnorm", head_layers=3, head_dropout=0.1),
                                dict(head_norm="layernorm", head_residual=True),
                                dict(pooling="attention", trainable_stages=1, freeze_bn_stats=True)])
def test_every_variant_round_trips_through_load_image_tower(tmp_path, kw):
    torch.manual_seed(0)
    m = tower(**kw)
    m.train()
    m(torch.randn(4, 3, 64, 64))  # move BN running stats away from their init
    p = tmp_path / "v.pt"
    torch.save({**tower_state(m), "config": {}}, p)
    m2 = load_image_tower(p)
    assert all(getattr(m2.cfg, k) == v for k, v in kw.items())
    x = torch.randn(3, 3, 64, 64)
    assert torch.allclose(m.eval()(x), m2(x), atol=1e-5)


def test_parameter_parts_cover_every_parameter_once():
    m = tower(pooling="attention", head_residual=True, learnable_temperature=True)
    parts = parameter_parts(m)
    names = [n for ps in parts.values() for n, _ in ps]
    assert sorted(names) == sorted(n for n, _ in m.named_parameters())
    assert [n for n, _ in parts["logit_scale"]] == ["logit_scale"]
    assert all(n.startswith("backbone.") for n, _ in parts["backbone"])
    assert any(n.startswith("pool.") for n, _ in parts["head"])  # new layers learn at the head's rate


def test_a_run_directory_as_checkpoint_suggests_best_pt(tmp_path):
    from clipft.model import ModelError, read_checkpoint
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(ModelError, match=r"did you mean .*best\.pt"):
        read_checkpoint(tmp_path)
    with pytest.raises(ModelError, match="a checkpoint is a file such as RUN/best.pt"):
        read_checkpoint(tmp_path / "..")
