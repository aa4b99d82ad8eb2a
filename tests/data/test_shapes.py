"""The embedded synthetic shapes dataset: layout, determinism, captions, labels, pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipft.data.shapes import (COLORS, POSITIONS, SHAPES, SIZES, VAL_ID_OFFSET, load_shapes_labels,
                           make_shapes_dataset)

N_TRAIN, N_VAL, SIZE = 12, 6, 64


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=N_TRAIN, n_val=N_VAL,
                               seed=0, image_size=SIZE)


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"captions_{split}2014.json").read_text())


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_exactly_coco_2014(shapes_root):
    files = set(_all_files(shapes_root))
    expected = {f"annotations/{kind}_{split}2014.json"
                for kind in ("captions", "shapes_labels") for split in ("train", "val")}
    expected |= {f"train2014/COCO_train2014_{i:012d}.jpg" for i in range(1, N_TRAIN + 1)}
    expected |= {f"val2014/COCO_val2014_{VAL_ID_OFFSET + i:012d}.jpg" for i in range(1, N_VAL + 1)}
    assert files == expected
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        data = _coco(shapes_root, split)
        assert set(data) >= {"info", "images", "annotations"}
        assert len(data["images"]) == n
        for img in data["images"]:
            assert set(img) >= {"id", "file_name", "width", "height"}
            assert (img["width"], img["height"]) == (SIZE, SIZE)
            assert (shapes_root / f"{split}2014" / img["file_name"]).is_file()
        for ann in data["annotations"]:
            assert set(ann) >= {"id", "image_id", "caption"}


def test_same_seed_same_bytes_different_seed_differs(tmp_path, shapes_root):
    again = _all_files(make_shapes_dataset(tmp_path / "a", N_TRAIN, N_VAL, seed=0, image_size=SIZE))
    assert again == _all_files(shapes_root)
    other = _all_files(make_shapes_dataset(tmp_path / "b", N_TRAIN, N_VAL, seed=1, image_size=SIZE))
    assert other.keys() == again.keys()
    assert other["annotations/captions_train2014.json"] != again["annotations/captions_train2014.json"]
    jpgs = [k for k in again if k.endswith(".jpg")]
    assert sum(other[k] != again[k] for k in jpgs) > len(jpgs) // 2


def test_five_distinct_captions_per_image(shapes_root):
    for split in ("train", "val"):
        data = _coco(shapes_root, split)
        caps: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            caps.setdefault(ann["image_id"], []).append(ann["caption"])
        assert set(caps) == {img["id"] for img in data["images"]}
        for image_id, cs in caps.items():
            assert len(cs) == 5 and len(set(cs)) == 5, (image_id, cs)
            assert all(c == c.strip() and c for c in cs)


def test_ids_unique_across_splits(shapes_root):
    train, val = _coco(shapes_root, "train"), _coco(shapes_root, "val")
    image_ids = [i["id"] for d in (train, val) for i in d["images"]]
    ann_ids = [a["id"] for d in (train, val) for a in d["annotations"]]
    assert len(image_ids) == len(set(image_ids)) == N_TRAIN + N_VAL
    assert len(ann_ids) == len(set(ann_ids)) == 5 * (N_TRAIN + N_VAL)
    assert all(isinstance(i, int) for i in image_ids + ann_ids)


def test_labels_match_captions(shapes_root):
    for split in ("train", "val"):
        labels = load_shapes_labels(shapes_root, split)
        caps: dict[int, list[str]] = {}
        for ann in _coco(shapes_root, split)["annotations"]:
            caps.setdefault(ann["image_id"], []).append(ann["caption"])
        assert set(labels) == set(caps)
        for image_id, objects in labels.items():
            assert 1 <= len(objects) <= 3
            assert len({o["position"] for o in objects}) == len(objects)  # one object per cell
            for o in objects:
                assert o["color"] in COLORS and o["shape"] in SHAPES
                assert o["size"] in SIZES and o["position"] in POSITIONS
                assert any(o["color"] in c and o["shape"] in c for c in caps[image_id]), (o, caps[image_id])
            # at least one caption names colour + shape of every object
            assert any(all(f"{o['color']} {o['shape']}" in c for o in objects) for c in caps[image_id])
            # every caption names every colour (no caption describes only part of the picture)
            assert all(all(o["color"] in c for o in objects) for c in caps[image_id])


def test_images_are_rgb_jpegs_of_requested_size(shapes_root):
    for path in sorted(shapes_root.rglob("*.jpg")):
        with Image.open(path) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (SIZE, SIZE)


def test_objects_are_drawn_where_the_labels_say(shapes_root):
    """Each labelled object's colour is present in its grid cell; empty cells are background."""
    labels = load_shapes_labels(shapes_root, "train")
    cell = SIZE // 3
    for image_id, objects in labels.items():
        arr = np.asarray(Image.open(shapes_root / "train2014" / f"COCO_train2014_{image_id:012d}.jpg"),
                         dtype=np.int32)
        background = np.median(arr.reshape(-1, 3), axis=0)
        occupied = {POSITIONS.index(o["position"]): o for o in objects}
        for idx in range(9):
            r, c = divmod(idx, 3)
            patch = arr[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].reshape(-1, 3)
            if idx in occupied:
                target = np.array(COLORS[occupied[idx]["color"]])
                close = (np.abs(patch - target).max(axis=1) < 45).sum()
                assert close >= 10, (image_id, occupied[idx], close)
            else:
                off = (np.abs(patch - background).max(axis=1) > 60).mean()
                assert off < 0.02, (image_id, idx, off)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_shapes_dataset(Path("/nonexistent/never"), n_train=-1)
