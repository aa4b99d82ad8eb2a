"""clipft.search.quality: precision@10 of colour+shape text queries on the shapes data, from its
labels, for a model trained as the demo trains (small) and for the deterministic fake; the demo's step."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipft.search.index import update_index
from clipft.search.query import load_index
from clipft.search.quality import demo_search, precision_at_k, shapes_queries
from clipft.data.shapes import load_shapes_labels, make_shapes_dataset

from .fake import FakeModel


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=64, n_val=16, seed=0, image_size=64)


@pytest.fixture(scope="module")
def demo_style_model(shapes, tmp_path_factory):
    """`clipft train` with the demo preset at test size (64 images, 6 epochs at 24 px, offline MiniLM text)."""
    pytest.importorskip("sentence_transformers")
    from clipft.cli.commands import main
    run = tmp_path_factory.mktemp("run")
    args = ["--config", "demo", "--set", "train.epochs=6", "--set", "train.batch_size=16", "--set", "train.lr=2e-3",
            "--set", "train.warmup_steps=2", "--set", "data.image_size=24", "--set", "model.head_hidden=64",
            "--set", "data.train_images=64", "--set", "data.val_images=16", "--quiet"]
    assert main(["train", "--data", str(shapes), "--out", str(run), *args]) == 0
    return run / "best.pt"


def test_shapes_queries_come_from_the_labels(shapes):
    labels = load_shapes_labels(shapes, "train")
    q = shapes_queries(shapes, "train", min_relevant=1)
    pairs = {(o["color"], o["shape"]) for objs in labels.values() for o in objs}
    assert set(q) == {f"a {c} {s}" for c, s in pairs}
    c, s = next(iter(pairs))
    assert q[f"a {c} {s}"] == {f"COCO_train2014_{i:012d}.jpg" for i, objs in labels.items()
                               if any((o["color"], o["shape"]) == (c, s) for o in objs)}


def test_precision_counts_relevant_hits(shapes, tmp_path):
    model = FakeModel()
    update_index(shapes / "train2014", model, tmp_path / "i", progress=False)
    idx = load_index(tmp_path / "i")
    everything = {Path(p).name for p in idx.paths}
    assert precision_at_k(idx, model, {"red": everything}, k=10) == {"queries": 1, "k": 10, "precision": 1.0,
                                                                     "chance": 1.0}
    assert precision_at_k(idx, model, {"red": set()}, k=10)["precision"] == 0.0


def test_a_colour_model_finds_colour_shape_queries_above_chance(shapes, tmp_path):
    """Deterministic: the fake model sees colours only, so its precision bounds what colour alone gives."""
    model = FakeModel()
    update_index(shapes / "train2014", model, tmp_path / "i", progress=False)
    p = precision_at_k(load_index(tmp_path / "i"), model, shapes_queries(shapes, "train", min_relevant=2))
    assert p["queries"] >= 20 and p["precision"] >= 3 * p["chance"], p


@pytest.mark.slow
def test_a_trained_model_finds_colour_shape_queries_well_above_chance(shapes, demo_style_model, tmp_path):
    """On the 64 images it was trained on (robust at test size; the demo's held-out figure is in docs/measurements.md)."""
    from clipft.inference import load
    model = load(demo_style_model)
    update_index(shapes / "train2014", model, tmp_path / "i", progress=False)
    p = precision_at_k(load_index(tmp_path / "i"), model, shapes_queries(shapes, "train", min_relevant=2))
    assert p["queries"] >= 20 and p["precision"] >= 2 * p["chance"], p


@pytest.mark.slow
def test_demo_search_indexes_the_validation_images_and_prints_the_serve_command(shapes, demo_style_model, tmp_path):
    text = demo_search(demo_style_model, shapes, "val", tmp_path / "search-index")
    lines = text.splitlines()
    assert "16 images (16 new" in lines[0] and lines[1].startswith("precision@10 of ")
    assert lines[2] == 'search "a red circle":' and len(lines) == 3 + 5 + 1
    assert lines[-1] == f"search them in your browser: clipft serve --index {tmp_path / 'search-index'}"
    assert len(load_index(tmp_path / "search-index")) == 16


@pytest.mark.slow
def test_demo_search_follows_a_retrained_model(shapes, demo_style_model, tmp_path):
    """A resumed or restarted demo trains a new best.pt: its index is rebuilt, never refused."""
    import torch
    demo_search(demo_style_model, shapes, "val", tmp_path / "search-index")
    ckpt = torch.load(demo_style_model, weights_only=False)
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and v.ndim == 2)
    ckpt["model"][key] = ckpt["model"][key] + 0.01  # another model, as a retrained demo has
    from clipft.checkpoint_file import CHECKSUM_KEY, add_checksum
    ckpt.pop(CHECKSUM_KEY, None)
    other = tmp_path / "best.pt"
    torch.save(add_checksum(ckpt), other)  # a checkpoint as training writes it (content checksum included)
    text = demo_search(other, shapes, "val", tmp_path / "search-index")
    assert "16 images (16 new" in text.splitlines()[0]
