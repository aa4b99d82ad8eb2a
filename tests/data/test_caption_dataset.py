"""clipft.data.caption_dataset: the public CaptionDataset gives what `clipft train` trains on, as dicts."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

import clipft
from clipft.config import Config
from clipft.data import TrainDataset, build_transform, load_split
from clipft.data.caption_dataset import CaptionDataset, collate_captions


@pytest.fixture(scope="module")
def cfg(tiny_clip_dir):
    c = Config()
    c.text.encoder = str(tiny_clip_dir)
    c.data.image_size = 32
    return c


def test_items_equal_what_clipft_train_uses(trained_run, coco_root, tiny_clip_dir, cfg):
    # The run's own cache file: CaptionDataset reads the embeddings `clipft train` wrote.
    summary = json.loads((trained_run / "summary.json").read_text())
    ds = clipft.CaptionDataset(coco_root, split="train", text_encoder=str(tiny_clip_dir), config=cfg)
    assert str(ds.cache_file) == summary["text"]["train"]["path"]
    from safetensors.torch import load_file
    cached = load_file(summary["text"]["train"]["path"])["embeds"]
    assert torch.equal(ds.text_embeds, cached)
    # Item by item, the caption (and image) training draws for the same seed and epoch.
    tf = build_transform(32, cfg.data.mean, cfg.data.std, train=False)
    train = TrainDataset(load_split(coco_root, "train", cfg.data), cached, tf, seed=cfg.train.seed, draft_size=32)
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        train.set_epoch(epoch)
        for i in range(len(ds)):
            item, (image, text, row) = ds[i], train[i]
            assert set(item) == {"image", "text_embedding", "caption", "image_id"}
            assert torch.equal(item["image"], image) and torch.equal(item["text_embedding"], text)
            assert item["caption"] == ds.data.captions[train.caption_index(i)]
            assert item["image_id"] == ds.data.images[row].image_id
    assert ds.embed_dim == cached.shape[1] and len(ds) == 24


def test_all_captions_and_collate_skip_unreadable_images(coco_root, cfg, tmp_path):
    ds = CaptionDataset(coco_root, split="val", config=cfg, return_all_captions=True)
    item = ds[0]
    n = len(ds.data.images[0].captions)
    assert set(item) == {"image", "text_embeddings", "captions", "image_id"}
    assert item["text_embeddings"].shape == (n, ds.embed_dim) and item["captions"] == ds.data.images[0].captions
    batch = collate_captions([item, None, ds[1]])
    assert batch["skipped"] == 1 and batch["image"].shape == (2, 3, 32, 32)
    assert [e.shape[0] for e in batch["text_embeddings"]] == [n, len(ds.data.images[1].captions)]
    assert collate_captions([None])["skipped"] == 1


def test_a_broken_image_is_skipped_by_the_loader(coco_root, cfg, tmp_path):
    import shutil
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root, ignore=shutil.ignore_patterns("cache"))
    first = sorted((root / "val2014").glob("*.jpg"))[0]
    first.write_bytes(b"broken")
    ds = CaptionDataset(root, split="val", config=cfg)
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_captions))
    assert sum(b["skipped"] for b in batches) == 1
    assert sum(len(b["image_id"]) for b in batches) == len(ds) - 1


def test_the_readme_custom_loop_runs(coco_root, tiny_clip_dir, cfg):
    # The ten-line loop of docs/using-a-model.md ("Your own training loop"), on the tiny data.
    from clipft.config import ModelConfig
    from clipft.loss import clip_loss
    from clipft.model import build_image_tower
    ds = clipft.CaptionDataset(coco_root, split="train", text_encoder=str(tiny_clip_dir), config=cfg)
    loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate_captions)
    model = build_image_tower(ModelConfig(backbone="resnet18", image_weights="none", head_hidden=32), ds.embed_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for epoch in range(1):
        ds.set_epoch(epoch)
        for batch in loader:
            loss = clip_loss(model(batch["image"]), batch["text_embedding"], model.logit_scale.exp())["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.isfinite(loss)
