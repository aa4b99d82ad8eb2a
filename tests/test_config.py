import json
from pathlib import Path

import pytest


from clipft.config import (PRESETS, Config, ConfigError, apply_overrides, from_dict, load_config,
                           preset_config, to_dict)

REPO = Path(__file__).resolve().parents[1]


def test_required_keys_exist_with_sane_defaults():
    c = Config()
    assert (c.train.epochs, c.train.batch_size, c.train.lr) == (15, 128, 1e-4)
    assert c.data.image_size == 224 and c.model.backbone == "resnet50"
    assert c.model.image_weights == "imagenet" and c.model.temperature == 0.07
    assert c.model.learnable_temperature is False
    assert c.text.encoder == "openai/clip-vit-base-patch32"
    assert c.data.train_images == 0 and c.data.val_images == 0
    assert c.data.augment is False


@pytest.mark.parametrize("item,section,key,value", [
    ("train.lr=3e-4", "train", "lr", 3e-4),
    ("train.lr=1", "train", "lr", 1.0),           # an int is a valid float
    ("train.epochs=3", "train", "epochs", 3),
    ("model.learnable_temperature=true", "model", "learnable_temperature", True),
    ("model.learnable_temperature=0", "model", "learnable_temperature", False),
    ("--data.image_size=64", "data", "image_size", 64),
    ("eval.ks=1,5", "eval", "ks", (1, 5)),
    ("eval.ks=[1, 10]", "eval", "ks", (1, 10)),
    ("text.encoder=/models/clip", "text", "encoder", "/models/clip"),
])
def test_overrides_are_typed(item, section, key, value):
    c = apply_overrides(Config(), [item])
    got = getattr(getattr(c, section), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("item,match", [
    ("train.lr=fast", "expected a number"),
    ("train.epochs=2.5", "expected an integer"),
    ("model.learnable_temperature=maybe", "true/false"),
    ("train.nope=1", "unknown config key 'train.nope'"),
    ("nosuch.lr=1", "unknown config section 'nosuch'"),
    ("lr=1", "section.key"),
    ("train.lr", "section.key=value"),
    ("eval.ks=1,x", "expected an integer"),
])
def test_bad_overrides_are_errors(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Config(), [item])


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 4\n  lr: 0.001\nmodel:\n  backbone: resnet18\n")
    c = load_config(f, ["train.epochs=5"])
    assert c.train.epochs == 5 and c.train.lr == 0.001 and c.model.backbone == "resnet18"


@pytest.mark.parametrize("text,match", [
    ("train:\n  epoch: 4\n", "unknown config key 'train.epoch'"),
    ("trian:\n  epochs: 4\n", "unknown config section"),
    ("train:\n  epochs: many\n", "expected an integer"),
    ("train: [1, 2]\n", "must be a mapping"),
    ("train: {epochs: [\n", "not valid YAML"),
])
def test_bad_yaml_names_the_file(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(f)
    assert str(f) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_json():
    c = apply_overrides(Config(), ["train.lr=0.5", "eval.ks=1,2,3"])
    d = json.loads(json.dumps(to_dict(c)))
    assert from_dict(d) == c


def test_presets_build_and_match_config_files():
    for name in PRESETS:
        c = preset_config(name)
        f = REPO / "configs" / f"{name}.yaml"
        assert f.is_file(), f"configs/{name}.yaml mirrors preset {name}"
        assert load_config(f) == c, f"configs/{name}.yaml differs from PRESETS[{name!r}]"
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_config("nope")


def test_device_templates_and_bounds_are_checked_and_printed_plainly():
    from clipft.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        load_config(None, ["train.device=gpu"])
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"every template needs \{\}"):
        load_config(None, ["eval.zeroshot_templates=a photo"])
    with pytest.raises(ConfigError, match=r"train.batch_size must be in \[2, 1048576\], got 0"):
        load_config(None, ["train.batch_size=0"])
