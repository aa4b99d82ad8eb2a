"""clipft.export: the export folder round-trips, ONNX matches PyTorch, bad folders give one line."""

import json
import shutil

import pytest
import torch

from clipft.inference import load
from clipft.cli.commands import main
from clipft.export import ONNX_TOLERANCE, export_checkpoint, format_size, onnx_parity
from clipft.model import ModelError


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """best.pt exported with --onnx through the CLI: (folder, printed output)."""
    out = tmp_path_factory.mktemp("export") / "shapes-resnet18"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", str(trained_run / "best.pt"), "--out", str(out), "--onnx"]) == 0
    return out, buf.getvalue()


def _val_images(coco_root):
    return sorted((coco_root / "val2014").glob("*.jpg"))


def test_export_writes_the_hub_layout_and_prints_sizes(exported):
    out, printed = exported
    names = ["README.md", "config.json", "image_tower.onnx", "model.safetensors", "open_clip_config.json",
             "open_clip_model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert f"wrote {out / name} (" in printed
    assert "ONNX check" in printed
    cfg = json.loads((out / "config.json").read_text())
    for key in ("backbone", "head", "pooling", "image_size", "mean", "std", "embed_dim", "temperature",
                "text_encoder", "clipft_version"):
        assert key in cfg
    assert cfg["head"]["hidden_size"] == 32 and cfg["backbone"] == "resnet18" and cfg["image_size"] == 32
    assert set(cfg["text_encoder"]) >= {"name", "fingerprint"} and len(cfg["text_encoder"]["fingerprint"]) == 64
    assert cfg["onnx"]["max_abs_diff"] <= ONNX_TOLERANCE
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "logit_scale" in keys and not any("optimizer" in k or k.startswith("state") for k in keys)


def test_round_trip_gives_the_same_embeddings_and_fingerprint(exported, trained_run, coco_root):
    out, _ = exported
    images = _val_images(coco_root)[:6]
    ref = load(trained_run / "best.pt")
    exp = load(out)
    assert exp.name == out.name and exp.embed_dim == ref.embed_dim and exp.image_size == ref.image_size
    assert torch.allclose(exp.encode_images(images), ref.encode_images(images), atol=1e-6)
    assert torch.allclose(exp.encode_texts(["a red circle"]), ref.encode_texts(["a red circle"]), atol=1e-6)
    assert exp.fingerprint == ref.fingerprint
    assert exp.logit_scale == pytest.approx(ref.logit_scale)


def test_onnx_backend_gives_the_same_embeddings(exported, trained_run, coco_root):
    out, _ = exported
    images = _val_images(coco_root)
    onnx_model = load(out, backend="onnx")
    assert onnx_model.backend == "onnx"
    got, want = onnx_model.encode_images(images, batch_size=5), load(out).encode_images(images)
    assert got.shape == want.shape and float((got - want).abs().max()) <= ONNX_TOLERANCE


def test_onnx_parity_check_refuses_a_file_that_differs(exported, trained_run, tmp_path):
    from clipft.inference import tower_from_export
    out, _ = exported
    tower = tower_from_export(out)
    pixels = torch.randn(3, 3, 32, 32)
    assert onnx_parity(tower, out / "image_tower.onnx", pixels) <= ONNX_TOLERANCE
    with torch.no_grad():
        tower.head.net[-1].bias.add_(0.5)  # the PyTorch side no longer matches the file
    assert onnx_parity(tower, out / "image_tower.onnx", pixels) > ONNX_TOLERANCE


def test_refused_onnx_export_writes_nothing(trained_run, tmp_path, monkeypatch):
    import clipft.export as E
    monkeypatch.setattr(E, "onnx_parity", lambda *a, **k: 1.0)
    out = tmp_path / "refused"
    with pytest.raises(ModelError, match="refused"):
        export_checkpoint(trained_run / "best.pt", out, onnx=True)
    assert not out.exists() or not any(out.iterdir())


def test_model_card_has_no_placeholders_and_names_its_protocol(exported):
    out, _ = exported
    card = (out / "README.md").read_text()
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    for key in ("library_name: clipft", "tags:", "datasets:", "metrics:"):
        assert key in head
    assert "Protocol: the training-time validation split" in body and "all captions per image" in body
    assert "best mean R@5" in body and "`val`" in body  # the split that chose the checkpoint
    assert "Intended use and limits" in body and "Zero-shot classification" in body
    assert "lr 0.001" in body and "resnet18" in body and "image_tower.onnx" in body
    for placeholder in ("TODO", "TBD", "None", "nan", "{", "}", "<", "[More Information", "XXX", "??"):
        assert placeholder not in body, placeholder


def test_bad_export_folders_give_one_clear_line(exported, tmp_path, capsys):
    out, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "format_version": 99, "clipft_version": "9.0.0"}))
    with pytest.raises(ModelError, match=r"config.json: export format version 99 \(written by clipft 9.0.0\)"):
        load(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    data = (out / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelError, match="model.safetensors: not a readable safetensors file"):
        load(bad)
    (bad / "model.safetensors").write_bytes(b"\x07" * 64)  # corrupt
    with pytest.raises(ModelError, match="model.safetensors: not a readable safetensors file"):
        load(bad)
    assert main(["embed", "--model", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipft: error: ") and err.count("\n") == 1 and "Traceback" not in err
    (bad / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json"):
        load(bad)


def test_cli_errors_are_one_line(trained_run, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    assert main(["export", str(other), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a clipft checkpoint" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["export", str(trained_run / "best.pt"), "--out", str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err and (busy / "notes.txt").read_text() == "mine"
    assert main(["embed", "--model", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json" in err


def test_format_size():
    assert format_size(512) == "512 B" and format_size(1_234_567) == "1.2 MB" and format_size(3 * 10**9) == "3.0 GB"


def test_open_clip_timm_tower_form_loads_in_open_clip(exported):
    pytest.importorskip("timm")
    from open_clip.timm_model import TimmModel
    from safetensors.torch import load_file

    from clipft.inference import tower_from_export
    out, printed = exported
    cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    v = cfg["vision_cfg"]
    assert v["timm_proj"] == "mlp" and cfg["embed_dim"] == 16  # head_hidden 32 = 2 x 16: it maps
    visual = TimmModel(v["timm_model_name"], cfg["embed_dim"], image_size=v["image_size"], pool=v["timm_pool"],
                       proj=v["timm_proj"], proj_bias=v["timm_proj_bias"], drop=v["timm_drop"])
    state = load_file(str(out / "open_clip_model.safetensors"))
    visual.load_state_dict({k[len("visual."):]: t for k, t in state.items() if k.startswith("visual.")})  # strict
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got = torch.nn.functional.normalize(visual.eval()(pixels), dim=-1)
        want = tower_from_export(out)(pixels)
    assert torch.allclose(got, want, atol=1e-5)
    assert "open_clip_config.json" in json.loads((out / "config.json").read_text())["files"].values()


def test_open_clip_form_says_why_a_head_does_not_map(trained_run):
    from clipft.config import ModelConfig
    from clipft.export import open_clip_form
    from clipft.model import ImageTower
    tower = ImageTower(ModelConfig(backbone="resnet18", image_weights="none", head_hidden=48, pooling="attention"), 16)
    why = open_clip_form(tower, {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "logit_scale": 10.0,
                                 "text_encoder": {"name": "x"}})
    assert isinstance(why, str) and "pooling attention" in why and "head hidden 48 != 2 x embedding 16" in why


def test_readme_numpy_preprocessing_gives_the_models_pixels(exported, tmp_path):
    # The NumPy recipe of docs/export.md ("The ONNX file"), for other runtimes.
    import numpy as np
    from PIL import Image
    out, _ = exported
    cfg = json.loads((out / "config.json").read_text())

    def pixel_values(path, size, mean, std):  # -> [3, size, size] float32
        img = Image.open(path).convert("RGB")
        w, h = img.size
        s = min(w, h)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)  # the centre square
        x = np.asarray(img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=None), np.float32) / 255
        return ((x - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)

    png = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(png)
    ours = pixel_values(png, cfg["image_size"], cfg["mean"], cfg["std"])
    assert ours.dtype == np.float32
    assert np.allclose(ours, load(out).pixels(png).numpy(), atol=1e-6)


# --------------------------------------------------------------------------- hardening

@pytest.mark.parametrize("change", [{"image_size": -5}, {"image_size": 1e9}, {"image_size": "big"},
                                    {"std": [0.0, 0.26, 0.27]}, {"mean": [0.5]}, {"std": [float("nan")] * 3},
                                    {"embed_dim": 0}, {"logit_scale": -1.0}])
def test_a_config_with_impossible_preprocessing_values_is_one_model_error(exported, tmp_path, change):
    out, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, **change}))
    key = next(iter(change))
    with pytest.raises(ModelError) as e:
        load(bad).encode_images([torch.zeros(3, 8, 8, dtype=torch.uint8)])
    msg = str(e.value)
    assert "\n" not in msg and "config.json" in msg and key in msg, msg


def _tampered_onnx(src, dst):
    """A valid ONNX file of a different tower: one initializer of `src` shifted."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(src))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.dims else 0)
    arr = numpy_helper.to_array(init).copy() + 0.25
    init.CopyFrom(numpy_helper.from_array(arr.astype(numpy_helper.to_array(init).dtype), init.name))
    onnx.save(m, str(dst))


def test_a_tampered_onnx_file_is_refused_or_fingerprinted_apart(exported, tmp_path):
    out, _ = exported
    good = load(out, backend="onnx").fingerprint
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    _tampered_onnx(out / "image_tower.onnx", bad / "image_tower.onnx")
    with pytest.raises(ModelError, match=r"image_tower\.onnx.*sha256"):
        load(bad, backend="onnx")  # the export recorded the file's sha256: checked on load
    # an export without the recorded digest: the fingerprint covers the file's bytes
    cfg = json.loads((bad / "config.json").read_text())
    cfg["onnx"].pop("sha256", None)
    (bad / "config.json").write_text(json.dumps(cfg))
    assert load(bad, backend="onnx").fingerprint != good
    shutil.copy(out / "image_tower.onnx", bad / "image_tower.onnx")
    assert load(bad, backend="onnx").fingerprint == good


def test_export_files_follow_the_umask(trained_run, tmp_path):
    import os
    old = os.umask(0o022)
    try:
        out = tmp_path / "perm"
        export_checkpoint(trained_run / "best.pt", out)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes


def test_export_onnx_checks_for_parity_images_before_the_slow_work(trained_run, tmp_path, monkeypatch):
    import clipft.export as E
    ckpt = tmp_path / "lonely" / "best.pt"
    ckpt.parent.mkdir()
    shutil.copy(trained_run / "best.pt", ckpt)  # no summary.json beside it: no validation data known
    calls = []
    monkeypatch.setattr(E, "export_onnx", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(E, "_text_encoder_entry", lambda *a, **k: calls.append("text") or {})
    with pytest.raises(ModelError, match="--check-images"):
        export_checkpoint(ckpt, tmp_path / "o", onnx=True)
    assert calls == []  # refused before loading the text encoder or exporting anything
    assert not (tmp_path / "o").exists()
