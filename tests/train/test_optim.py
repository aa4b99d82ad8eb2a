"""clipft.train.optim: the learning-rate schedule and AdamW's parameter groups."""
import pytest

from clipft.config import Config, ConfigError, apply_overrides, load_config
from clipft.model import build_image_tower
from clipft.train.optim import build_optimizer, cosine_with_warmup


def test_cosine_with_warmup():
    total, warm = 100, 10
    assert cosine_with_warmup(0, total, warm) == pytest.approx(0.1)
    assert cosine_with_warmup(9, total, warm) == pytest.approx(1.0)
    assert cosine_with_warmup(10, total, warm) == pytest.approx(1.0)
    assert cosine_with_warmup(55, total, warm) == pytest.approx(0.5)
    assert cosine_with_warmup(100, total, warm) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(100, total, warm, min_ratio=0.1) == pytest.approx(0.1)
    vals = [cosine_with_warmup(s, total, warm) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay after warmup


def test_optimizer_groups_skip_decay_on_1d_params():
    cfg = apply_overrides(Config(), ["model.backbone=resnet18", "model.image_weights=none",
                                     "model.learnable_temperature=true"])
    m = build_image_tower(cfg.model, 8)
    opt = build_optimizer(m, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert any(p is m.logit_scale for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_optimizer_part_groups_with_backbone_lr_ratio():
    cfg = apply_overrides(Config(), ["model.backbone=resnet18", "model.image_weights=none",
                                     "model.learnable_temperature=true", "model.trainable_stages=2",
                                     "model.pooling=attention"])
    m = build_image_tower(cfg.model, 8)
    opt = build_optimizer(m, 1e-3, 0.1, backbone_lr_ratio=0.25)
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["head/decay", "head/no_decay", "logit_scale", "backbone/decay", "backbone/no_decay"]
    assert groups["backbone/decay"]["lr"] == pytest.approx(2.5e-4) and groups["head/decay"]["lr"] == 1e-3
    assert groups["logit_scale"]["params"] == [m.logit_scale] and groups["logit_scale"]["weight_decay"] == 0
    for name, g in groups.items():
        assert all((p.ndim >= 2) == name.endswith("/decay") for p in g["params"]) or name == "logit_scale"
        assert g["weight_decay"] == (0.1 if name.endswith("/decay") else 0.0)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in m.parameters() if p.requires_grad}  # frozen stages left out
    assert any(p is m.pool.positional_embedding for p in groups["head/decay"]["params"])  # new: head rate
    with pytest.raises(ConfigError, match="backbone_lr_ratio"):  # the schema's range, before any work
        load_config(None, ["train.backbone_lr_ratio=-1"])
