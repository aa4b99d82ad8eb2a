"""clipft.data.caches: the one place that names cache files. The names on disk are part of the contract
(a rename would silently re-embed every user's captions), so each one is spelled out here."""

from __future__ import annotations

from pathlib import Path

from clipft.config import Config
from clipft.data.caches import (dataset_cache_dir, eval_text_cache_file, prepared_dir, prepared_split_dir,
                                swapped_text_cache_file, text_cache_file, text_cache_path)

ENC = "openai_clip-vit-base-patch32"


def test_coco_cache_names(coco_root):
    cfg, cache = Config(), coco_root / "cache"
    assert dataset_cache_dir(coco_root, cfg) == cache
    assert text_cache_file(coco_root, "train", cfg) == cache / f"train_text_embeds_{ENC}.safetensors"
    assert swapped_text_cache_file(coco_root, cfg) == cache / f"train-lrswap_text_embeds_{ENC}.safetensors"
    # Evaluation shares the training splits' files; other protocols get their own, per encoder.
    assert eval_text_cache_file(coco_root, "val", cfg) == text_cache_file(coco_root, "val", cfg)
    assert eval_text_cache_file(coco_root, "karpathy-test", cfg) == cache / f"karpathy-test_text_embeds_{ENC}.safetensors"
    assert eval_text_cache_file(coco_root, "val", cfg, encoder="my/clip") == cache / "val_text_embeds_my_clip.safetensors"
    assert prepared_split_dir(coco_root, "train", cfg) == cache / "images" / "train-256"
    assert prepared_split_dir(coco_root, "val", cfg, 96) == prepared_dir(cache, "val", 96) == cache / "images" / "val-96"


def test_subset_and_cache_dir_settings(coco_root, tmp_path):
    cfg = Config()
    cfg.data.train_images, cfg.data.subset_seed = 10, 4
    cfg.text.cache_dir = str(tmp_path / "elsewhere")
    assert swapped_text_cache_file(coco_root, cfg) == \
        tmp_path / "elsewhere" / f"train-subset10-seed4-lrswap_text_embeds_{ENC}.safetensors"
    assert prepared_split_dir(coco_root, "train", cfg) == tmp_path / "elsewhere" / "images" / "train-256"
    assert text_cache_path(Path("/c"), "x", "a b/c") == Path("/c/x_text_embeds_a_b_c.safetensors")


def test_a_prepared_cache_of_another_size_says_why_it_is_unused(tmp_path):
    from clipft.data.caches import prepared_sizes, unused_prepared_note
    from clipft.data.shapes import make_shapes_dataset
    root = make_shapes_dataset(tmp_path / "d", n_train=2, n_val=2, image_size=32)
    cfg = Config()
    cfg.data.image_size = 64
    assert unused_prepared_note(root, "train", cfg) is None  # nothing prepared: nothing to explain
    for size in (32, 96):
        d = prepared_dir(root / "cache", "train", size)
        d.mkdir(parents=True)
        (d / "index.json").write_text("{}")
    assert prepared_sizes(root, "train", cfg) == [32, 96]
    note = unused_prepared_note(root, "train", cfg)
    assert "data.prepared_size is 256" in note and "--set data.prepared_size=96" in note
    cfg.data.image_size = 128
    assert "prepare-images --size 128" in unused_prepared_note(root, "train", cfg)
    cfg.data.prepared_size = 96
    assert unused_prepared_note(root, "train", cfg) is not None  # 32 px is still there, and too small
