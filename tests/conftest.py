"""Shared fixtures. Everything is offline: huggingface_hub reads HF_HUB_OFFLINE once, at import, so it
is set here, before any test module imports transformers or sentence-transformers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised tiny CLIP text tower (hidden 32, 2 layers, projection 16) with OpenAI's
    real BPE tokenizer, saved with save_pretrained: `load_text_encoder(str(tiny_clip_dir))` works offline."""
    from clipft.text import save_random_clip_text_model
    return save_random_clip_text_model(tmp_path_factory.mktemp("text") / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory):
    """A tiny synthetic COCO 2014 folder (24 train / 12 val shapes images, 5 captions each) shared by
    the end-to-end tests; its text caches are built under coco_root/cache by the first run."""
    from clipft.shapes import make_shapes_dataset
    return make_shapes_dataset(tmp_path_factory.mktemp("coco"), n_train=24, n_val=12, seed=0, image_size=48)
