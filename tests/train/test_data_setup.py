"""clipft.train.data_setup: the data a run reads, and the identity a resume compares."""

from __future__ import annotations

import shutil

import pytest
import torch

from clipft.config import Config
from clipft.data import load_split
from clipft.data.shapes import make_shapes_dataset
from clipft.train.data_setup import data_identity, prepare_data


@pytest.fixture()
def root(tmp_path):
    return make_shapes_dataset(tmp_path / "a", n_train=8, n_val=4, seed=0, image_size=32)


def _identity(root):
    cfg = Config().data
    return data_identity(root, load_split(root, "train", cfg), load_split(root, "val", cfg))


def test_identity_follows_the_content_not_the_path(root, tmp_path):
    a = _identity(root)
    moved = shutil.copytree(root, tmp_path / "elsewhere")
    b = _identity(moved)
    assert a["path"] != b["path"] and {k: a[k] for k in ("train", "val")} == {k: b[k] for k in ("train", "val")}
    assert (a["train"]["format"], a["train"]["images"], a["train"]["captions"]) == ("coco", 8, 40)
    other = _identity(make_shapes_dataset(tmp_path / "b", n_train=8, n_val=4, seed=1, image_size=32))
    assert other["train"]["captions_sha256"] != a["train"]["captions_sha256"]
    assert other["train"]["images"] == a["train"]["images"]  # same sizes: only the digests tell them apart


def test_the_check_sees_the_identity_before_any_caption_is_embedded(root, tiny_clip_dir):
    cfg = Config()
    cfg.text.encoder, cfg.model.image_weights, cfg.model.backbone = str(tiny_clip_dir), "none", "resnet18"
    seen = []

    def refuse(identity):
        seen.append(identity)
        raise RuntimeError("refused")
    with pytest.raises(RuntimeError, match="refused"):
        prepare_data(cfg, root, torch.device("cpu"), check=refuse)
    assert seen == [_identity(root)] and not (root / "cache").exists()  # nothing embedded, nothing cached
    data = prepare_data(cfg, root, torch.device("cpu"), check=seen.append)
    assert data.identity == seen[-1] and data.train_text.shape[0] == 40
