"""clipft.inference: load a checkpoint / export / original CLIP, embed images and texts, zero-shot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipft
from clipft.inference import ImageTextModel, load, similarity, state_digest
from clipft.model import ModelError


@pytest.fixture(scope="module")
def ckpt_model(trained_run):
    return load(trained_run / "best.pt")


@pytest.fixture(scope="module")
def saved_embeddings(trained_run, coco_root, tmp_path_factory):
    """`clipft evaluate --save-embeddings` of best.pt on the val split: (tensors, {image_id: path}, captions)."""
    from safetensors.torch import load_file

    from clipft.cli.commands import main
    from clipft.config import from_dict
    from clipft.data import load_split
    out = tmp_path_factory.mktemp("eval")
    emb_file = out / "emb.safetensors"
    assert main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(coco_root),
                 "--out", str(out / "m.json"), "--save-embeddings", str(emb_file), "--quiet",
                 # The API embeds images in fp32; evaluation's default (train.amp=auto) is bf16 on CPUs
                 # with native bf16, equal only within bf16 rounding. fp32 against fp32 is the exact check.
                 "--set", "train.amp=off"]) == 0
    cfg = from_dict(torch.load(trained_run / "best.pt", weights_only=False)["config"])
    split = load_split(coco_root, "val", cfg.data)
    return load_file(str(emb_file)), {r.image_id: r.path for r in split.images}, split


def test_checkpoint_embeddings_equal_evaluate_save_embeddings(ckpt_model, saved_embeddings):
    tensors, path_of, split = saved_embeddings
    paths = [path_of[int(i)] for i in tensors["image_ids"]]
    img = ckpt_model.encode_images(paths, batch_size=5)  # another batching than evaluate's
    assert img.dtype == torch.float32 and img.device.type == "cpu"
    assert torch.allclose(img, tensors["image_emb"], atol=1e-5, rtol=0)
    caption_of = dict(zip(split.caption_ids, split.captions))
    txt = ckpt_model.encode_texts([caption_of[int(c)] for c in tensors["caption_ids"]])
    assert torch.allclose(txt, tensors["text_emb"], atol=1e-5, rtol=0)
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(img)), atol=1e-5)


def test_every_input_kind_gives_the_same_embedding(ckpt_model, tmp_path):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (40, 52, 3), dtype=torch.uint8, generator=g)
    png = tmp_path / "x.png"
    Image.fromarray(pixels.numpy()).save(png)
    pil = Image.open(png)
    u8 = pixels.permute(2, 0, 1).contiguous()  # [3, H, W] uint8, torchvision.io.read_image's layout
    pre = ckpt_model.pixels(str(png))  # [3, S, S] preprocessed
    out = ckpt_model.encode_images([png, str(png), pil, u8, pre])
    assert out.shape == (5, ckpt_model.embed_dim)
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)
    batch = ckpt_model.encode_images(torch.stack([u8, u8]))  # a [B, 3, H, W] uint8 tensor = B images
    assert torch.allclose(batch, out[:2], atol=1e-6)
    assert ckpt_model.encode_images([]).shape == (0, ckpt_model.embed_dim)


def test_bad_image_inputs_name_the_problem(ckpt_model, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg: cannot use this image"):
        ckpt_model.encode_images([bad])
    with pytest.raises(ValueError, match="uint8 pixels"):
        ckpt_model.encode_images([torch.zeros(3, 7, 7)])
    with pytest.raises(ValueError, match="cannot embed a int"):
        ckpt_model.encode_images([3])
    with pytest.raises(ValueError, match="a folder is embedded by `clipft embed"):  # a folder given as one image
        ckpt_model.encode_images(tmp_path)


def test_a_single_input_is_one_item_like_sentence_transformers(ckpt_model, tmp_path):
    import numpy as np
    png = tmp_path / "one.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(png)
    many = ckpt_model.encode_images([png])  # [1, D]
    for one in (str(png), png, Image.open(png), ckpt_model.pixels(str(png))):
        got = ckpt_model.encode_images(one)  # a path is one image, not its characters
        assert got.shape == (ckpt_model.embed_dim,) and torch.allclose(got, many[0], atol=1e-6)
    t = ckpt_model.encode_texts("a red square")
    assert t.shape == (ckpt_model.embed_dim,)
    assert torch.allclose(t, ckpt_model.encode_texts(["a red square"])[0], atol=1e-6)
    arr = ckpt_model.encode_texts(["a red square", "a blue circle"], convert_to_numpy=True)
    assert isinstance(arr, np.ndarray) and arr.shape == (2, ckpt_model.embed_dim) and arr.dtype == np.float32
    assert isinstance(ckpt_model.encode_images(png, as_numpy=True), np.ndarray)
    assert torch.allclose(ckpt_model.encode_images([png], normalize=True).norm(dim=-1), torch.ones(1), atol=1e-5)
    assert ckpt_model.encode_images([png], show_progress=True).shape == (1, ckpt_model.embed_dim)
    assert ckpt_model.to("cpu") is ckpt_model and ckpt_model.device == torch.device("cpu")


def test_zero_shot_default_templates_are_the_clis(ckpt_model, coco_root):
    from clipft.config import EvalConfig
    from clipft.eval.zeroshot import class_embeddings, class_probabilities
    from clipft.text import load_text_encoder
    images = sorted((coco_root / "val2014").glob("*.jpg"))[:2]
    labels = ["red circle", "blue square"]
    probs = ckpt_model.zero_shot(images, labels)  # no templates: eval.zeroshot_templates, as `clipft zeroshot`
    enc = load_text_encoder(ckpt_model.text_encoder_name, amp="off")
    want = class_probabilities(ckpt_model.encode_images(images),
                               class_embeddings(enc, labels, list(EvalConfig().zeroshot_templates)),
                               ckpt_model.logit_scale)
    assert torch.allclose(probs, want, atol=1e-5)


def test_similarity_and_zero_shot(ckpt_model, trained_run, coco_root):
    from clipft.text import load_text_encoder
    from clipft.eval.zeroshot import class_embeddings, class_probabilities
    images = sorted((coco_root / "val2014").glob("*.jpg"))[:3]
    img = ckpt_model.encode_images(images)
    sim = ckpt_model.similarity(img, img)
    assert sim.shape == (3, 3) and torch.allclose(sim.diagonal(), torch.ones(3), atol=1e-5)
    assert torch.equal(clipft.similarity(img, img), sim)
    labels, templates = ["red circle", "blue square", "orange star"], ["a photo of a {}.", "a {} shape"]
    probs = ckpt_model.zero_shot(images, labels, templates=templates)
    assert probs.shape == (3, 3) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    # the same numbers as `clipft zeroshot` (templates "a {}" -> "an {}" before a vowel included)
    enc = load_text_encoder(ckpt_model.text_encoder_name, amp="off")  # the API default: fp32
    want = class_probabilities(img, class_embeddings(enc, labels, templates), ckpt_model.logit_scale)
    assert torch.allclose(probs, want, atol=1e-5)


def test_fingerprint_is_stable_and_tells_models_apart(ckpt_model, trained_run, tiny_clip_dir, tmp_path):
    from clipft.eval.clip_baseline import save_tiny_clip_model
    again = load(trained_run / "best.pt")
    assert again.fingerprint == ckpt_model.fingerprint and len(ckpt_model.fingerprint) == 64
    clip = load(save_tiny_clip_model(tmp_path / "clip"))
    assert clip.fingerprint != ckpt_model.fingerprint
    tower = torch.load(trained_run / "best.pt", weights_only=False)["model"]
    changed = dict(tower)
    changed["logit_scale"] = tower["logit_scale"] + 1e-3
    assert state_digest(changed) != state_digest(tower)


def test_original_clip_has_the_same_interface(coco_root, tmp_path):
    from clipft.eval.clip_baseline import clip_image_embeddings, load_clip_vision, save_tiny_clip_model
    from clipft.config import Config
    from clipft.data import load_split
    from clipft.text import load_text_encoder
    d = save_tiny_clip_model(tmp_path / "clip", image_size=32)
    m = load(str(d))
    assert isinstance(m, ImageTextModel) and m.embed_dim == 16 and m.image_size == 32
    split = load_split(coco_root, "val", Config().data)
    vision, processor = load_clip_vision(str(d), torch.device("cpu"))
    want, rows = clip_image_embeddings(vision, processor, split, torch.device("cpu"))
    got = m.encode_images([split.images[int(r)].path for r in rows])
    assert torch.allclose(got, want, atol=1e-5)
    texts = ["a red circle", "two blue squares"]
    assert torch.allclose(m.encode_texts(texts), load_text_encoder(str(d), amp="off").encode(texts), atol=1e-5)
    assert m.zero_shot([split.images[0].path], ["circle", "square"]).shape == (1, 2)


def test_bad_sources_give_one_clear_line(trained_run, tmp_path):
    with pytest.raises(ModelError, match=r"training run directory.*best\.pt"):
        load(trained_run)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load(empty)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ModelError, match="not a clipft checkpoint"):
        load(other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="not a readable checkpoint"):
        load(garbage)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="neither a clipft export"):
        load(bert)
    with pytest.raises(ModelError, match="not found"):
        load(tmp_path / "missing" / "model")
    with pytest.raises(ModelError, match="backend"):
        load(trained_run / "best.pt", backend="tensorrt")
    with pytest.raises(ModelError, match="onnx backend needs an export folder"):
        load(trained_run / "best.pt", backend="onnx")


def test_loaded_model_imports_nothing_of_training(trained_run, tmp_path):
    png = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png)
    code = f"""
import sys, clipft
assert "torch" not in sys.modules, "import clipft must stay light"
m = clipft.load({str(trained_run / 'best.pt')!r})
m.encode_images([{str(png)!r}]); m.encode_texts(["a red square"])
training = ("clipft.train.loop", "clipft.loss", "clipft.data", "clipft.data.caption_dataset", "clipft.prepare",
            "clipft.distributed", "clipft.eval.evaluate", "clipft.train.health", "clipft.cli.ablate", "clipft.eval.zeroshot")
print(sorted(n for n in sys.modules if n.startswith(training)))
"""
    src = str(Path(clipft.__file__).parents[1])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_amp_auto_is_close_to_fp32_and_fingerprinted_apart(trained_run):
    """amp="auto" (bf16 autocast on CPUs with native bf16, fp32 elsewhere): near the fp32 embeddings,
    and never the same fingerprint as an fp32 model when the precision differs (indexes are not mixed)."""
    exact = clipft.load(trained_run / "best.pt")
    fast = clipft.load(trained_run / "best.pt", amp="auto")
    imgs = [torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
            for i in range(3)]
    a, b = exact.encode_images(imgs), fast.encode_images(imgs)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    assert (exact.fingerprint != fast.fingerprint) == (fast._encode_pixels.precision.dtype is not None)
    with pytest.raises(ModelError, match="amp must be one of"):
        clipft.load(trained_run / "best.pt", amp="fp8")


def test_a_checkpoint_fingerprint_needs_no_text_encoder(trained_run, tmp_path, monkeypatch):
    """Training records the text encoder's fingerprint, so an image-only use of a checkpoint (clipft
    index) never loads the encoder, and the fingerprint is the one computed from the loaded encoder
    (equal to an export's)."""
    import clipft.text as T
    from clipft.inference import text_fingerprint
    from clipft.text import load_text_encoder
    m = load(trained_run / "best.pt")
    want = text_fingerprint(load_text_encoder(m.text_encoder_name))
    calls = []
    real = T.load_text_encoder
    monkeypatch.setattr(T, "load_text_encoder", lambda *a, **k: calls.append(a) or real(*a, **k))
    fresh = load(trained_run / "best.pt")
    assert fresh.fingerprint == m.fingerprint and fresh._text.fingerprint() == want
    assert calls == []
