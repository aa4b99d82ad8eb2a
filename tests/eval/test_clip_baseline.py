"""The CLIP baseline embeds with the model's OWN image processor, vision tower and text tower."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipft.eval.clip_baseline import clip_baseline_embeddings, save_tiny_clip_model
from clipft.data import load_coco_captions, load_image


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip_model(tmp_path_factory.mktemp("clipfull") / "tiny", image_size=32)


def test_embeddings_match_clipmodel_features(coco_root, clip_dir, tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    data = load_coco_captions(coco_root, "val").subset(3, seed=0)
    img, rows, txt = clip_baseline_embeddings(str(clip_dir), data, tmp_path / "cache.safetensors",
                                              torch.device("cpu"), batch_size=2)
    assert rows.tolist() == [0, 1, 2] and img.shape == (3, 16) and txt.shape == (15, 16)

    # Reference: the full CLIPModel with its processor and tokenizer, as the HF docs use it.
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    proc = CLIPImageProcessor.from_pretrained(str(clip_dir))
    tok = AutoTokenizer.from_pretrained(str(clip_dir))
    pixels = proc(images=[load_image(r.path)[0] for r in data.images], return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (32, 32)
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=pixels)
        ref_img = getattr(ref_img, "pooler_output", ref_img)
        ids = tok(data.captions, padding=True, return_tensors="pt")
        ref_txt = model.get_text_features(**ids)
        ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
    assert torch.allclose(img, F.normalize(ref_img, dim=-1), atol=1e-5)
    assert torch.allclose(txt, F.normalize(ref_txt, dim=-1), atol=1e-5)


def test_compare_zero_shot_offline_hint_names_its_own_option(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from clipft.data.shapes import make_shapes_dataset
    from clipft.model import ModelError
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    root = make_shapes_dataset(tmp_path / "d", n_train=1, n_val=2, image_size=32)
    with pytest.raises(ModelError) as e:
        clip_baseline_embeddings("openai/clip-vit-base-patch32", load_coco_captions(root, "val"),
                                 tmp_path / "c.safetensors", torch.device("cpu"))
    assert "--compare-zero-shot /path/to/" in str(e.value) and "text.encoder" not in str(e.value)
