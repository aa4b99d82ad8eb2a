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
    from clipft.data.shapes import make_shapes_dataset
    return make_shapes_dataset(tmp_path_factory.mktemp("coco"), n_train=24, n_val=12, seed=0, image_size=48)


@pytest.fixture(scope="session")
def trained_run(coco_root, tiny_clip_dir, tmp_path_factory):
    """A 2-epoch run on coco_root (resnet18 from scratch at 32 px, head 32, tiny CLIP text tower): the
    run directory, with best.pt. Evaluation tests write their outputs beside best.pt; a test that needs
    a pristine run directory copies it."""
    from clipft.cli import main
    run = tmp_path_factory.mktemp("trained") / "run"
    args = ["--set", f"text.encoder={tiny_clip_dir}", "--set", "train.epochs=2", "--set", "train.batch_size=8",
            "--set", "train.lr=1e-3", "--set", "train.warmup_steps=2", "--set", "model.backbone=resnet18",
            "--set", "model.image_weights=none", "--set", "model.head_hidden=32", "--set", "data.image_size=32",
            "--set", "data.num_workers=0", "--set", "train.device=cpu", "--set", "train.log_every=1", "--quiet"]
    assert main(["train", "--data", str(coco_root), "--out", str(run), *args]) == 0
    return run
