"""The export folder as a whole open_clip model, checked from outside clipft: open_clip loads it with
`local-dir:` in a process that never imports clipft and gives clipft's image and text embeddings."""

import contextlib
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from clipft.cli.commands import main
from clipft.inference import load
from clipft.model import ModelError

pytest.importorskip("open_clip")
pytest.importorskip("timm")

CAPTIONS = ["a red circle", "a blue square on a white background", "", "three green triangles!",
            " ".join(["a long caption about a yellow star"] * 20)]

# Run by a fresh interpreter with only open_clip: the folder must stand on its own.
OUTSIDE = r"""
import json, sys, torch
import open_clip
folder, pixels_file, out_file = sys.argv[1:4]
captions = json.loads(sys.argv[4])
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
model.eval()
with torch.no_grad():
    img = model.encode_image(torch.load(pixels_file), normalize=True)
    txt = model.encode_text(tokenizer(captions), normalize=True)
    probs = (model.logit_scale.exp() * img @ txt.T).softmax(dim=-1)
torch.save({"image": img, "text": txt, "probs": probs, "logit_scale": float(model.logit_scale.exp()),
            "clipft_imported": any(m == "clipft" or m.startswith("clipft.") for m in sys.modules),
            "transform": repr(preprocess)}, out_file)
"""


@pytest.fixture(scope="module")
def oc_export(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("oc") / "shapes-open-clip"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", str(trained_run / "best.pt"), "--out", str(out), "--format", "open_clip", "--onnx",
                     "--quantize", "int8"]) == 0
    return out, buf.getvalue()


def _val_images(coco_root):
    return sorted((coco_root / "val2014").glob("*.jpg"))


def test_folder_holds_the_whole_open_clip_model(oc_export):
    out, printed = oc_export
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "image_tower.int8.onnx", "image_tower.onnx", "model.safetensors",
                     "open_clip_config.json", "open_clip_model.safetensors"]
    assert f"wrote {out / 'open_clip_config.json'}" in printed
    oc = json.loads((out / "open_clip_config.json").read_text())
    m = oc["model_cfg"]
    assert m["vision_cfg"]["timm_model_name"] == "resnet18" and m["vision_cfg"]["timm_pool"] == "avg"
    assert m["vision_cfg"]["timm_proj"] == "mlp" and m["vision_cfg"]["timm_proj_bias"] is True
    # The tiny text tower of the test suite: width 32, 2 heads, 2 layers, QuickGELU, CLIP's vocabulary.
    assert m["text_cfg"] == {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                             "mlp_ratio": 4.0}
    assert m["quick_gelu"] is True and m["embed_dim"] == 16
    cfg = json.loads((out / "config.json").read_text())
    assert oc["preprocess_cfg"]["mean"] == cfg["mean"] and oc["preprocess_cfg"]["std"] == cfg["std"]
    rec = cfg["open_clip"]
    assert rec["written"] and rec["image_max_abs_diff"] <= 1e-4 and rec["text_max_abs_diff"] <= 1e-4
    # no staging folder left beside the export
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_open_clip_outside_clipft_gives_clipfts_embeddings(oc_export, trained_run, coco_root, tmp_path):
    out, _ = oc_export
    ref = load(trained_run / "best.pt")
    images = _val_images(coco_root)[:6]
    pixels = torch.stack([ref.pixels(p) for p in images])  # clipft's evaluation-time pixels [6, 3, 32, 32]
    torch.save(pixels, tmp_path / "pixels.pt")
    r = subprocess.run([sys.executable, "-c", OUTSIDE, str(out), str(tmp_path / "pixels.pt"),
                        str(tmp_path / "got.pt"), json.dumps(CAPTIONS)], capture_output=True, text=True,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(tmp_path / "got.pt")
    assert got["clipft_imported"] is False
    want_img, want_txt = ref.encode_images(images), ref.encode_texts(CAPTIONS)
    assert float((got["image"] - want_img).abs().max()) <= 1e-4
    assert float((got["text"] - want_txt).abs().max()) <= 1e-4
    assert got["logit_scale"] == pytest.approx(ref.logit_scale, rel=1e-6)
    # Zero-shot probabilities (one prompt per class) agree with clipft's.
    want = ref.zero_shot(images, CAPTIONS, templates=("{}",))
    assert float((got["probs"] - want).abs().max()) <= 1e-4


def test_format_open_clip_refuses_a_head_that_does_not_map_and_writes_nothing(trained_run, tmp_path, capsys):
    ckpt = torch.load(trained_run / "best.pt", weights_only=False)
    ckpt["model_config"] = {**ckpt["model_config"], "head_norm": "layernorm"}
    from clipft.config import ModelConfig
    from clipft.model import ImageTower
    tower = ImageTower(ModelConfig(**{**ckpt["model_config"], "image_weights": "none"}), ckpt["embed_dim"])
    ckpt["model"] = tower.state_dict()
    bad = tmp_path / "run" / "best.pt"
    bad.parent.mkdir()
    from clipft.checkpoint_file import add_checksum
    torch.save(add_checksum(ckpt), bad)  # as training writes it: its checksum matches, the content is the problem
    out = tmp_path / "exports" / "m"
    assert main(["export", str(bad), "--out", str(out), "--format", "open_clip"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the open_clip format: head norm layernorm" in err
    assert not out.exists() or not any(out.iterdir())
    assert [p.name for p in out.parent.iterdir()] in ([], ["m"])  # no staging folder left
    # Without --format open_clip the clipft folder is written and config.json says why open_clip is not.
    capsys.readouterr()
    assert main(["export", str(bad), "--out", str(out)]) == 0
    assert "open_clip model not written: head norm layernorm" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["open_clip"] == {"written": False, "reason": "head norm layernorm"}
    assert not (out / "open_clip_config.json").exists()


def test_text_towers_that_do_not_map_are_named():
    from clipft.export_open_clip import text_tower_form
    st = SimpleNamespace(kind="sentence-transformers", name="minilm")
    assert "sentence-transformers model" in text_tower_form(st, 384)
    cfg = SimpleNamespace(vocab_size=30522, hidden_act="relu", layer_norm_eps=1e-12, projection_dim=16,
                          hidden_size=32, num_attention_heads=2)
    enc = SimpleNamespace(kind="clip", name="odd", module=SimpleNamespace(config=cfg), tokenizer=None)
    why = text_tower_form(enc, 16)
    for part in ("vocabulary 30522", "activation relu", "layer_norm_eps 1e-12", "not OpenAI's CLIP BPE"):
        assert part in why


def test_timm_names():
    from clipft.export_open_clip import timm_model_name
    assert timm_model_name("resnet50") == "resnet50"
    assert timm_model_name("timm:convnext_tiny") == "convnext_tiny"


def test_clip_benchmark_agrees_with_clipft_evaluate(oc_export, trained_run, coco_root, tmp_path):
    """CLIP_benchmark's own command line on the exported folder (open_clip's `local-dir:`) and a
    COCO-format test set this test writes give `clipft evaluate`'s recall on the same images and captions."""
    import shutil
    pytest.importorskip("clip_benchmark")
    out, _ = oc_export
    root = tmp_path / "coco-test"  # clipft's COCO layout + the annotation file clip_benchmark's test split reads
    shutil.copytree(coco_root / "val2014", root / "val2014")
    (root / "annotations").mkdir()
    ann = json.loads((coco_root / "annotations" / "captions_val2014.json").read_text())
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(ann))
    (root / "coco_test_karpathy.json").write_text(json.dumps(ann))
    exe = shutil.which("clip_benchmark") or pytest.skip("no clip_benchmark command")
    result = tmp_path / "clip_benchmark.json"
    r = subprocess.run([exe, "eval", "--model_type", "open_clip", "--model", f"local-dir:{out}",
                        "--pretrained", "local", "--dataset", "mscoco_captions", "--dataset_root", str(root),
                        "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10", "--no_amp",
                        "--num_workers", "0", "--batch_size", "8", "--output", str(result)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = json.loads(result.read_text())["metrics"]
    mine_file = tmp_path / "clipft.json"
    # Both sides in fp32 (clip_benchmark --no_amp; clipft's train.amp=off): bf16 noise could flip a rank.
    assert main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(root), "--split", "val",
                 "--out", str(mine_file), "--device", "cpu", "--set", "train.amp=off", "--quiet"]) == 0
    mine = json.loads(mine_file.read_text())
    assert mine["num_images"] == len(ann["images"]) and mine["num_captions"] == len(ann["annotations"])
    for k in (1, 5, 10):
        # clip_benchmark: image_retrieval = caption queries -> images; text_retrieval = image queries -> captions
        assert 100 * theirs[f"image_retrieval_recall@{k}"] == pytest.approx(mine["text_to_image"][f"R@{k}"], abs=1e-4)
        assert 100 * theirs[f"text_retrieval_recall@{k}"] == pytest.approx(mine["image_to_text"][f"R@{k}"], abs=1e-4)


# --------------------------------------------------------------------------- int8 ONNX


def test_int8_tower_is_measured_recorded_and_loadable(oc_export, trained_run, coco_root, tmp_path, capsys):
    out, printed = oc_export
    assert "int8 check: mean cosine to the float tower" in printed
    q = json.loads((out / "config.json").read_text())["onnx_int8"]
    assert q["file"] == "image_tower.int8.onnx" and q["measured_images"] == 12 and q["measured_captions"] == 60
    assert q["mean_cosine"] >= q["thresholds"]["min_mean_cosine"] and q["mean_r5_drop"] <= 2.0
    assert q["speedup"] > 0 and q["bytes_int8"] < q["bytes_float"] / 2
    for d in ("image_to_text", "text_to_image"):
        assert set(q["recall_int8"][d]) == {"R@1", "R@5", "R@10"}
    images = _val_images(coco_root)
    float_model, int8 = load(out, backend="onnx"), load(out, backend="onnx", quantized=True)
    assert int8.quantized and not float_model.quantized
    cos = (int8.encode_images(images) * float_model.encode_images(images)).sum(-1)
    assert float(cos.mean()) == pytest.approx(q["mean_cosine"], abs=1e-4)
    assert int8.fingerprint != float_model.fingerprint  # an index never mixes the two
    by_path = load(out / "image_tower.int8.onnx")
    assert by_path.fingerprint == int8.fingerprint and by_path.backend == "onnx"
    # clipft index --model takes the int8 file; search reloads it from the index's record.
    index = tmp_path / "idx"
    assert main(["index", str(coco_root / "val2014"), "--model", str(out / "image_tower.int8.onnx"),
                 "--index", str(index), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", "a red circle", "--index", str(index), "--json", "--k", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3


def test_int8_below_the_threshold_is_refused_and_leaves_nothing(oc_export, trained_run, tmp_path, monkeypatch):
    import clipft.quantize as Q
    out, _ = oc_export
    float_onnx = tmp_path / "image_tower.onnx.tmp"
    float_onnx.write_bytes((out / "image_tower.onnx").read_bytes())
    cfg = torch.load(trained_run / "best.pt", weights_only=False)["config"]
    monkeypatch.setattr(Q, "MIN_MEAN_COSINE", 1.01)  # no int8 file reaches it
    with pytest.raises(ModelError, match=r"image_tower.int8.onnx: refused, int8 mean cosine to the float tower 0\.9"):
        Q.prepare_quantized(tmp_path, trained_run / "best.pt", cfg, None, "int8", float_onnx)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_tower.onnx.tmp"]


def test_int8_needs_onnx_and_an_int8_file(oc_export, trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run / "best.pt"), "--out", str(tmp_path / "o"), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quantize int8 needs --onnx" in err and not (tmp_path / "o").exists()
    with pytest.raises(ModelError, match="quantized=True runs the int8 ONNX image tower: pass backend='onnx'"):
        load(oc_export[0], quantized=True)
    lone = tmp_path / "x.onnx"
    lone.write_bytes(b"x")
    with pytest.raises(ModelError, match="no config.json beside it"):
        load(lone)
    bare = tmp_path / "float-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "image_tower.onnx"):
        (bare / name).write_bytes((oc_export[0] / name).read_bytes())
    with pytest.raises(ModelError, match="image_tower.int8.onnx: not found"):
        load(bare, backend="onnx", quantized=True)


# --------------------------------------------------------------------------- query encoders


def test_query_encoder_must_declare_the_models_text_space(oc_export, tiny_clip_dir, coco_root, tmp_path, capsys):
    import shutil
    from clipft.query_encoder import QUERY_ENCODER_FILE, declare_query_encoder
    from clipft.text import save_random_clip_text_model
    out, _ = oc_export
    base = load(out)
    other = tmp_path / "my-query-encoder"  # the frozen tower under another name: the same output space
    shutil.copytree(tiny_clip_dir, other)
    with pytest.raises(ModelError, match="does not declare this model's text space"):
        load(out, text_encoder=str(other))
    declare_query_encoder(other, base, note="a copy of the frozen tower")
    m = load(out, text_encoder=str(other))
    assert m.fingerprint == base.fingerprint and m.text_encoder_name == str(other)
    texts = ["a red circle", "ein roter Kreis"]
    assert torch.allclose(m.encode_texts(texts), base.encode_texts(texts), atol=1e-6)
    # A declaration for another space, and another dimension, are refused in one line.
    decl = json.loads((other / QUERY_ENCODER_FILE).read_text())
    (other / QUERY_ENCODER_FILE).write_text(json.dumps({**decl, "output_space": "0" * 64}))
    with pytest.raises(ModelError, match="declares output space 000000000000"):
        load(out, text_encoder=str(other))
    narrow = save_random_clip_text_model(tmp_path / "narrow", projection_dim=8)
    with pytest.raises(ModelError, match="gives 8-d embeddings, the model 16-d"):
        load(out, text_encoder=str(narrow))
    # The CLI: search with --query-encoder, and a one-line refusal.
    (other / QUERY_ENCODER_FILE).write_text(json.dumps(decl))
    index = tmp_path / "idx"
    assert main(["index", str(coco_root / "val2014"), "--model", str(out), "--index", str(index), "--quiet"]) == 0
    capsys.readouterr()
    args = ["search", "ein roter Kreis", "--index", str(index), "--json", "--k", "2"]
    assert main([*args, "--query-encoder", str(other)]) == 0
    with_query = json.loads(capsys.readouterr().out)["results"]
    assert main(args) == 0
    assert with_query == json.loads(capsys.readouterr().out)["results"]  # same space, same answers
    from clipft.search.server import open_indexes
    (served,) = open_indexes([index], query_encoder=str(other))  # clipft serve --query-encoder
    assert served.model.text_encoder_name == str(other)
    assert main([*args, "--query-encoder", str(narrow)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gives 8-d embeddings, the model 16-d" in err


def test_model_card_names_every_way_to_load_with_its_parity(oc_export):
    out, _ = oc_export
    card = (out / "README.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    section = card.split("## Ways to load this folder", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| way")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["clipft (PyTorch)", "ONNX (onnxruntime)", "int8 ONNX", "open_clip",
                                                    "CLIP_benchmark"]
    name = out.name
    assert f'clipft.load("{name}", backend="onnx", quantized=True)' in section
    assert f'open_clip.create_model_and_transforms("local-dir:{name}")' in section
    assert f"clip_benchmark eval --model_type open_clip --model local-dir:{name}" in section
    q, oc = cfg["onnx_int8"], cfg["open_clip"]
    assert f"mean cosine {q['mean_cosine']:.4f}" in section and f"{q['speedup']:.2f}x" in section
    assert f"encode_image within {oc['image_max_abs_diff']:.1e}" in section
    assert f"encode_text within {oc['text_max_abs_diff']:.1e}" in section
    body = card.split("---\n", 2)[2]
    for placeholder in ("TODO", "None", "nan", "{", "}", "<", "XXX"):
        assert placeholder not in body, placeholder


def _open_clip_text_model(cfg, quick_gelu, state, embed_dim):
    """open_clip's CLIP with `cfg` as its text tower (a throwaway timm image tower) and `state` loaded."""
    from open_clip.model import CLIP
    vision = {"timm_model_name": "resnet18", "timm_model_pretrained": False, "timm_pool": "avg",
              "timm_proj": "linear", "image_size": 32}
    model = CLIP(embed_dim, vision, cfg, quick_gelu=quick_gelu).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and all(k.startswith("visual.") or k == "logit_scale" for k in missing)
    return model


def test_clip_vit_b32_text_tower_maps_onto_open_clips_own(tmp_path):
    """A text tower shaped like CLIP ViT-B/32's (random weights) converts to open_clip's ViT-B-32-quickgelu
    text configuration, and open_clip's encode_text then equals clipft's."""
    import open_clip

    from clipft.export_open_clip import text_tower_form
    from clipft.text import load_text_encoder, save_random_clip_text_model
    folder = save_random_clip_text_model(tmp_path / "b32-text", hidden_size=512, num_layers=12, heads=8,
                                         projection_dim=512, seed=1)
    enc = load_text_encoder(str(folder), amp="off")
    cfg, quick_gelu, state = text_tower_form(enc, 512)
    assert cfg == {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0}
    builtin = open_clip.get_model_config("ViT-B-32-quickgelu")
    assert quick_gelu is builtin["quick_gelu"] is True
    assert all(builtin["text_cfg"][k] == cfg[k] for k in ("context_length", "vocab_size", "width", "heads", "layers"))
    model = _open_clip_text_model(cfg, quick_gelu, state, 512)
    with torch.no_grad():
        got = model.encode_text(open_clip.get_tokenizer("ViT-B-32-quickgelu")(CAPTIONS), normalize=True)
    assert float((got - enc.encode(CAPTIONS)).abs().max()) <= 1e-4


def test_a_shorter_max_length_becomes_open_clips_context(tiny_clip_dir):
    """text.max_length=20: open_clip's context is 20 (the first 20 positions), so it truncates as clipft does."""
    import open_clip

    from clipft.export_open_clip import text_tower_form
    from clipft.text import load_text_encoder
    enc = load_text_encoder(str(tiny_clip_dir), max_length=20, amp="off")
    cfg, quick_gelu, state = text_tower_form(enc, 16)
    assert cfg["context_length"] == 20 and state["positional_embedding"].shape == (20, 32)
    model = _open_clip_text_model(cfg, quick_gelu, state, 16)
    with torch.no_grad():
        got = model.encode_text(open_clip.get_tokenizer("ViT-B-32", context_length=20)(CAPTIONS), normalize=True)
    assert float((got - enc.encode(CAPTIONS)).abs().max()) <= 1e-4


def test_without_open_clip_installed_the_form_is_skipped_or_refused(tiny_clip_dir, tmp_path, monkeypatch):
    import clipft.export_open_clip as OC
    from clipft.config import ModelConfig
    from clipft.model import ImageTower
    monkeypatch.setattr(OC, "missing_packages", lambda: ["open_clip_torch"])
    tower = ImageTower(ModelConfig(backbone="resnet18", image_weights="none", head_hidden=32), 16).eval()
    config = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "logit_scale": 10.0,
              "text_encoder": {"name": str(tiny_clip_dir), "max_length": 77}}
    pixels = torch.zeros(2, 3, 32, 32)
    stage, rec = OC.prepare_open_clip(tmp_path / "m", tower, config, pixels, required=False)
    assert stage is None and rec == {"written": False, "reason": "open_clip_torch not installed "
                                                                  "(pip install 'clipft[open_clip]')"}
    with pytest.raises(ModelError, match="m: cannot write the open_clip format: open_clip_torch not installed"):
        OC.prepare_open_clip(tmp_path / "m", tower, config, pixels, required=True)
    assert list(tmp_path.iterdir()) == []


def test_quantize_recall_counts_like_clipft_evaluate():
    from clipft.eval.metrics import retrieval_recall as reference
    from clipft.quantize import retrieval_recall
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(9, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    txt[5] = txt[4]  # a tie between two captions
    c2i = torch.arange(30) % 7  # images 7 and 8 own no caption
    ours, want = retrieval_recall(img, txt, c2i), reference(img, txt, c2i)
    for d in ("image_to_text", "text_to_image"):
        for k in ("R@1", "R@5", "R@10"):
            assert ours[d][k] == pytest.approx(want[d][k], abs=1e-9), (d, k)
