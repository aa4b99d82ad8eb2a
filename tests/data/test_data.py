"""clipft.data: COCO loading + validation, subsets, robust image decoding, datasets, collation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from clipft.config import ConfigError, DataConfig
from clipft.data import (CaptionedImages, CenterSquareResize, DataError, EvalImageDataset, ImageRecord, TrainDataset,
                         build_transform, coco_annotation_path, collate_eval, collate_skip,
                         collate_train, detect_format, left_right_captions, load_coco_captions, load_image,
                         load_split, swap_left_right)
from clipft.data.shapes import make_shapes_dataset

MEAN = DataConfig().mean
STD = DataConfig().std


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("coco"), n_train=12, n_val=6, seed=0,
                               image_size=48)


def write_coco(root: Path, split: str, data, raw: str | None = None) -> Path:
    """Write an annotation file (JSON of `data`, or `raw` text) plus the images dir."""
    path = coco_annotation_path(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    (root / f"{split}2014").mkdir(exist_ok=True)
    path.write_text(raw if raw is not None else json.dumps(data))
    return path


# --------------------------------------------------------------------------- loading


def test_load_shapes_counts_and_flat_order(shapes_root):
    raw = json.loads(coco_annotation_path(shapes_root, "train").read_text())
    ds = load_coco_captions(shapes_root, "train")
    assert len(ds) == 12 and ds.name == f"coco:{shapes_root}:train"
    assert ds.image_ids == sorted(i["id"] for i in raw["images"])
    assert len(ds.captions) == len(ds.caption_ids) == 60
    # flat order: all captions of image 0 (by annotation id), then image 1, ...
    by_id = {a["id"]: a for a in raw["annotations"]}
    for cap, cid, row in zip(ds.captions, ds.caption_ids, ds.caption_to_image.tolist()):
        assert by_id[cid]["caption"] == cap
        assert by_id[cid]["image_id"] == ds.images[row].image_id
    assert ds.caption_to_image.dtype == torch.long
    assert ds.caption_to_image.tolist() == sorted(ds.caption_to_image.tolist())
    offsets = ds.caption_offsets()
    assert offsets.dtype == torch.long and offsets.tolist() == list(range(0, 61, 5))
    for i, rec in enumerate(ds.images):
        assert ds.captions[offsets[i]:offsets[i + 1]] == rec.captions
        assert rec.path == shapes_root / "train2014" / f"COCO_train2014_{rec.image_id:012d}.jpg"
    assert load_coco_captions(shapes_root, "val").image_ids == [1_000_001 + k for k in range(6)]


def test_hand_written_order_strip_and_drops(tmp_path):
    data = {"images": [{"id": 9, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"},
                       {"id": 5, "file_name": "lonely.jpg"}],
            "annotations": [{"id": 40, "image_id": 9, "caption": "  nine second \n"},
                            {"id": 7, "image_id": 3, "caption": "three"},
                            {"id": 30, "image_id": 9, "caption": "nine first"},
                            {"id": 8, "image_id": 5, "caption": "   "}]}
    write_coco(tmp_path, "train", data)
    ds = load_coco_captions(tmp_path, "train")
    assert ds.image_ids == [3, 9]  # by id; image 5 had only an empty caption
    assert ds.captions == ["three", "nine first", "nine second"]
    assert ds.caption_ids == [7, 30, 40]
    assert ds.caption_to_image.tolist() == [0, 1, 1]
    assert ds.caption_offsets().tolist() == [0, 1, 3]
    assert ds.dropped_images == 1 and ds.dropped_captions == 1


def _img(i=1, name="a.jpg"):
    return {"id": i, "file_name": name}


def _ann(i=10, image_id=1, caption="a cat"):
    return {"id": i, "image_id": image_id, "caption": caption}


MALFORMED = {
    "not_json": (None, '{"images": [\n  {"id": 1,,}', "not valid JSON (line 2"),
    "top_level_list": ([], None, "top level"),
    "missing_images": ({"annotations": []}, None, "'images'"),
    "missing_annotations": ({"images": [_img()]}, None, "'annotations'"),
    "images_not_list": ({"images": {"1": "a.jpg"}, "annotations": []}, None, "'images'"),
    "image_not_object": ({"images": ["a.jpg"], "annotations": []}, None, "images[0]"),
    "image_without_id": ({"images": [{"file_name": "a.jpg"}], "annotations": []}, None, "'id'"),
    "image_id_not_int": ({"images": [{"id": "1", "file_name": "a.jpg"}], "annotations": []}, None, "'id'"),
    "image_without_file_name": ({"images": [{"id": 1}], "annotations": []}, None, "'file_name'"),
    "file_name_not_str": ({"images": [{"id": 1, "file_name": 7}], "annotations": []}, None, "'file_name'"),
    "duplicate_image_id": ({"images": [_img(), _img()], "annotations": [_ann()]}, None, "duplicate"),
    "ann_without_image_id": ({"images": [_img()], "annotations": [{"id": 1, "caption": "x"}]}, None,
                             "'image_id'"),
    "ann_without_caption": ({"images": [_img()], "annotations": [{"id": 1, "image_id": 1}]}, None,
                            "'caption'"),
    "ann_without_id": ({"images": [_img()], "annotations": [{"image_id": 1, "caption": "x"}]}, None,
                       "'id'"),
    "ann_unknown_image": ({"images": [_img()], "annotations": [_ann(image_id=2)]}, None,
                          "not in 'images'"),
    "caption_not_string": ({"images": [_img()], "annotations": [_ann(caption=5)]}, None, "caption"),
    "caption_null": ({"images": [_img()], "annotations": [_ann(caption=None)]}, None, "caption"),
    "duplicate_ann_id": ({"images": [_img()], "annotations": [_ann(), _ann()]}, None, "duplicate"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_annotations_name_the_file(tmp_path, case):
    data, raw, needle = MALFORMED[case]
    path = write_coco(tmp_path, "val", data, raw)
    with pytest.raises(DataError) as exc:
        load_coco_captions(tmp_path, "val")
    msg = str(exc.value)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg
    assert needle in msg


def test_missing_annotation_file_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="annotation file not found") as exc:
        load_coco_captions(tmp_path, "train")
    assert str(exc.value).startswith(str(coco_annotation_path(tmp_path, "train")))
    with pytest.raises(DataError) as exc:
        detect_format(tmp_path)  # empty dir
    assert str(exc.value).startswith(f"{tmp_path}: ")
    with pytest.raises(DataError, match="not found"):
        detect_format(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown data format"):
        load_split(tmp_path, "train", DataConfig(format="parquet"))


def test_missing_image_directory(tmp_path):
    path = coco_annotation_path(tmp_path, "train")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": [_img()], "annotations": [_ann()]}))
    with pytest.raises(DataError) as exc:
        load_coco_captions(tmp_path, "train")
    assert str(exc.value).startswith(f"{tmp_path / 'train2014'}: ")


def test_detect_and_load_split_with_subsets(shapes_root):
    assert detect_format(shapes_root) == "coco"
    cfg = DataConfig(train_images=5, val_images=0, subset_seed=3)
    train = load_split(shapes_root, "train", cfg)
    val = load_split(shapes_root, "val", cfg)
    assert len(train) == 5 and len(val) == 6
    assert train.image_ids == load_coco_captions(shapes_root, "train").subset(5, 3).image_ids


def test_subset_is_deterministic_and_ordered(shapes_root):
    full = load_coco_captions(shapes_root, "train")
    a, b = full.subset(5, seed=1), full.subset(5, seed=1)
    assert a.image_ids == b.image_ids and len(a) == 5
    assert a.image_ids == sorted(a.image_ids) and set(a.image_ids) <= set(full.image_ids)
    others = {tuple(full.subset(5, seed=s).image_ids) for s in range(2, 8)}
    assert len(others | {tuple(a.image_ids)}) > 1  # the seed matters
    # captions travel with their image
    assert a.captions == [c for r in full.images if r.image_id in set(a.image_ids) for c in r.captions]
    assert full.subset(0, 1) is full and full.subset(12, 1) is full and full.subset(99, 1) is full


# --------------------------------------------------------------------------- images


@pytest.fixture
def bad_images(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    p = {}

    def save(name, im, fmt, **kw):
        p[name] = tmp_path / f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}"
        im.save(p[name], format=fmt, **kw)

    save("rgb_jpeg", rgb, "JPEG", quality=90)
    save("gray_jpeg", rgb.convert("L"), "JPEG")
    save("cmyk_jpeg", rgb.convert("CMYK"), "JPEG")
    save("palette_png", rgb.convert("P"), "PNG")
    rgba = rgb.convert("RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent -> composited onto white
    save("rgba_png", rgba, "PNG")
    save("la_png", rgb.convert("LA"), "PNG")
    save("i16_png", Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16)), "PNG")
    p["png_named_jpg"] = tmp_path / "actually_png.jpg"
    rgb.save(p["png_named_jpg"], format="PNG")
    p["truncated_jpeg"] = tmp_path / "truncated.jpg"
    p["truncated_jpeg"].write_bytes(p["rgb_jpeg"].read_bytes()[:600])
    p["random_bytes"] = tmp_path / "noise.jpg"
    p["random_bytes"].write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    p["empty_file"] = tmp_path / "empty.jpg"
    p["empty_file"].write_bytes(b"")
    p["missing"] = tmp_path / "missing.jpg"
    return p


CONVERTIBLE = ["rgb_jpeg", "gray_jpeg", "cmyk_jpeg", "palette_png", "rgba_png", "la_png", "i16_png",
               "png_named_jpg"]
BROKEN = {"truncated_jpeg": "truncated", "random_bytes": "undecodable", "empty_file": "undecodable",
          "missing": "missing"}


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_convertible_images_load_as_rgb(bad_images, name):
    im, reason = load_image(bad_images[name])
    assert reason is None and im is not None
    assert im.mode == "RGB" and len(im.getbands()) == 3
    assert np.asarray(im).shape[2] == 3
    if name == "rgba_png":
        assert im.getpixel((0, 0)) == (255, 255, 255)
    if name == "i16_png":  # 16-bit white stays white (rescaled, not clipped/wrapped)
        assert im.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_images_give_none_and_reason(bad_images, name, caplog):
    with caplog.at_level(logging.WARNING, logger="clipft.data"):
        im, reason = load_image(bad_images[name])
        load_image(bad_images[name])  # second failure on the same path: no second warning
    assert im is None
    assert reason.startswith(BROKEN[name]), reason
    warnings = [r for r in caplog.records if str(bad_images[name]) in r.getMessage()]
    assert len(warnings) == 1


def test_draft_decodes_big_jpeg_no_smaller_than_asked(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (800, 600), (200, 10, 10)).save(path, quality=90)
    im, _ = load_image(path, draft_size=64)
    assert min(im.size) >= 64 and im.size[0] < 800  # reduced by DCT scaling, still big enough
    assert load_image(path)[0].size == (800, 600)


def test_transform_shape_and_normalisation():
    size = 32
    mean_rgb = tuple(round(m * 255) for m in MEAN)
    uniform = Image.new("RGB", (70, 45), mean_rgb)  # non-square on purpose
    for train, augment in ((False, False), (True, False), (True, True)):
        x = build_transform(size, MEAN, STD, train=train, augment=augment)(uniform)
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert x.abs().max() < 0.02  # the mean colour normalises to ~0
    white = build_transform(size, MEAN, STD)(Image.new("RGB", (40, 40), (255, 255, 255)))
    expected = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(white[:, 0, 0], expected, atol=1e-4, rtol=0)


def test_center_square_resize_matches_resize_then_crop():
    """One-pass box resize == the picture of torchvision's Resize(short side) + CenterCrop."""
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((320, 240), Image.BICUBIC)  # smooth, like a photo
    ref = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(224)])
    a = np.asarray(ref(im), dtype=float)
    b = np.asarray(CenterSquareResize(224)(im), dtype=float)
    assert a.shape == b.shape == (224, 224, 3)
    assert np.abs(a - b).mean() < 1.0  # grey levels: sub-pixel alignment only
    assert CenterSquareResize(10)(Image.new("RGB", (30, 90))).size == (10, 10)


def test_eval_transform_resizes_short_side_and_center_crops():
    im = Image.new("RGB", (90, 30), (0, 0, 0))
    im.paste((255, 255, 255), (30, 0, 60, 30))  # white middle third
    x = build_transform(30, (0, 0, 0), (1, 1, 1))(im)
    assert x.shape == (3, 30, 30)
    assert x.min() > 0.95  # the crop is exactly the white middle third


# --------------------------------------------------------------------------- datasets


def _split_with_bad_images(shapes_root: Path, tmp_path: Path) -> CaptionedImages:
    """The shapes train split, with image 2 corrupted and image 7 missing (copied to tmp)."""
    full = load_coco_captions(shapes_root, "train")
    images = []
    for row, rec in enumerate(full.images):
        path = tmp_path / rec.path.name
        if row == 2:
            path.write_bytes(bytes(range(256)) * 4)
        elif row != 7:
            path.write_bytes(rec.path.read_bytes())
        images.append(ImageRecord(rec.image_id, path, rec.captions, rec.caption_ids))
    return CaptionedImages(images=images, name="test")


def test_train_loader_skips_bad_images(shapes_root, tmp_path):
    split = _split_with_bad_images(shapes_root, tmp_path)
    text = torch.randn(len(split.captions), 8)  # [M, D]
    ds = TrainDataset(split, text, build_transform(32, MEAN, STD), seed=0)
    assert ds[2] is None and ds[7] is None
    loader = DataLoader(ds, batch_size=5, shuffle=False, num_workers=0, collate_fn=collate_train)
    seen, skipped, batches = [], 0, 0
    for images, texts, index, n_skipped in loader:
        batches += 1
        assert images.shape == (len(index), 3, 32, 32) and texts.shape == (len(index), 8)
        assert index.dtype == torch.long
        assert len(index) + n_skipped == min(5, 12 - 5 * (batches - 1))
        for b, i in enumerate(index.tolist()):
            j = ds.caption_index(i)
            assert split.caption_to_image[j] == i  # the caption belongs to the image
            torch.testing.assert_close(texts[b], text[j])
        seen += index.tolist()
        skipped += n_skipped
    assert batches == 3 and skipped == 2
    assert sorted(seen) == [i for i in range(12) if i not in (2, 7)]


def test_train_dataset_rejects_wrong_embedding_count(shapes_root):
    split = load_coco_captions(shapes_root, "val")
    with pytest.raises(ValueError, match=r"\[30, D\]"):
        TrainDataset(split, torch.zeros(29, 4), build_transform(32, MEAN, STD))


def test_caption_choice_deterministic_per_seed_and_epoch(shapes_root):
    split = load_coco_captions(shapes_root, "train")
    text = torch.zeros(len(split.captions), 2)
    a, b = (TrainDataset(split, text, None, seed=5) for _ in range(2))
    c = TrainDataset(split, text, None, seed=6)
    choices = {}
    for epoch in range(8):
        for ds in (a, b, c):
            ds.set_epoch(epoch)
        ca = [a.caption_index(i) for i in range(len(a))]
        assert ca == [b.caption_index(i) for i in range(len(b))]  # same (seed, epoch) -> same
        choices[epoch] = ca
        assert all(5 * i <= j < 5 * i + 5 for i, j in enumerate(ca))
        assert len({j % 5 for j in ca}) > 1  # not the same slot for every image
    per_image = [{choices[e][i] for e in choices} for i in range(len(a))]
    assert all(len(s) > 1 for s in per_image)  # captions change across epochs
    a.set_epoch(0)
    c.set_epoch(0)
    assert choices[0] == [a.caption_index(i) for i in range(len(a))]  # set_epoch back restores
    assert choices[0] != [c.caption_index(i) for i in range(len(c))]  # the seed matters


def test_caption_choice_same_in_worker_processes(shapes_root):
    split = load_coco_captions(shapes_root, "train")
    text = torch.arange(len(split.captions), dtype=torch.float32)[:, None]  # row j holds j
    ds = TrainDataset(split, text, build_transform(16, MEAN, STD), seed=1)
    ds.set_epoch(3)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_train)
    got = {}
    for _images, texts, index, _n in loader:
        got.update(zip(index.tolist(), texts[:, 0].long().tolist()))
    assert got == {i: ds.caption_index(i) for i in range(len(ds))}


def test_eval_dataset_and_collate(shapes_root, tmp_path):
    split = _split_with_bad_images(shapes_root, tmp_path)
    ds = EvalImageDataset(split, build_transform(24, MEAN, STD))
    assert len(ds) == 12 and ds[7] is None
    images, index, n_skipped = collate_eval([ds[0], ds[7], ds[5]])
    assert images.shape == (2, 3, 24, 24) and index.tolist() == [0, 5] and n_skipped == 1
    images, index, n_skipped = collate_eval([None, None])
    assert images.shape[0] == 0 and index.shape[0] == 0 and n_skipped == 2
    images, texts, index, n_skipped = collate_train([None])
    assert images.shape[0] == texts.shape[0] == index.shape[0] == 0 and n_skipped == 1
    assert collate_skip([None, None, None])[-1] == 3


# --------------------------------------------------------------------------- ablation augmentations

@pytest.mark.parametrize("caption,expected", [
    ("a red square on the left", "a red square on the right"),
    ("Left of the cat, right of the dog", "Right of the cat, left of the dog"),
    ("the LEFTMOST block and the rightmost one", "the RIGHTMOST block and the leftmost one"),
    ("a left-hand glove", "a right-hand glove"),
    ("move rightwards", "move leftwards"),
    ("a bright light on a cleft", "a bright light on a cleft"),  # not whole words
    ("no direction here", "no direction here"),
])
def test_swap_left_right(caption, expected):
    assert swap_left_right(caption) == expected
    assert swap_left_right(expected) == caption  # an involution: flipping twice restores it


def test_left_right_captions_rows_point_at_swapped_versions():
    caps = ["a dog", "a cat on the left", "nothing", "Right side up"]
    rows, swapped = left_right_captions(caps)
    assert rows.tolist() == [-1, 0, -1, 1]
    assert swapped == ["a cat on the right", "Left side up"]


def test_transform_flip_and_colour_jitter_options():
    def kinds(**kw):
        return [type(t).__name__ for t in build_transform(32, MEAN, STD, **kw).transforms]
    assert kinds(train=True, augment=True) == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert kinds(train=True, augment=True, flip=False) == ["RandomResizedCrop", "ToTensor", "Normalize"]
    assert "ColorJitter" in kinds(train=True, color_jitter=0.4)
    assert "ColorJitter" not in kinds(train=False, color_jitter=0.4)  # never at evaluation
    jitter = build_transform(32, MEAN, STD, train=True, color_jitter=0.4).transforms[1]
    assert kinds(train=False) == ["CenterSquareResize", "ToTensor", "Normalize"]
    assert jitter.hue is None and jitter.brightness == (0.6, 1.4)  # no hue: captions name colours
    with pytest.raises(ConfigError, match="color_jitter"):
        build_transform(32, MEAN, STD, train=True, color_jitter=-1)


def test_train_dataset_flips_image_and_swaps_caption_embedding(tmp_path):
    im = Image.new("RGB", (8, 8), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 4, 8))  # red on the left half
    im.save(tmp_path / "a.png")
    im.save(tmp_path / "b.png")
    split = CaptionedImages([ImageRecord(1, tmp_path / "a.png", ["red on the left", "red and blue"], [1, 2]),
                             ImageRecord(2, tmp_path / "b.png", ["a red half, left side"], [3])], "t")
    text = torch.arange(3, dtype=torch.float32)[:, None].repeat(1, 2)  # [3, 2]: row j = (j, j)
    rows, swapped = left_right_captions(split.captions)
    flip_text = 100 + torch.arange(len(swapped), dtype=torch.float32)[:, None].repeat(1, 2)  # [K, 2]
    to_tensor = lambda x: torch.from_numpy(np.asarray(x).copy())  # noqa: E731 - [8, 8, 3] uint8
    ds = TrainDataset(split, text, to_tensor, seed=3, flip_embeds=flip_text, flip_rows=rows)
    original = to_tensor(im)
    flips = 0
    for epoch in range(40):
        ds.set_epoch(epoch)
        for i in range(2):
            x, t, _ = ds[i]
            j = ds.caption_index(i)
            if ds.flipped(i):
                flips += 1
                assert torch.equal(x, original.flip(1))  # mirrored: red now on the right
                assert torch.equal(t, flip_text[rows[j]] if rows[j] >= 0 else text[j])
            else:
                assert torch.equal(x, original) and torch.equal(t, text[j])
    assert 20 <= flips <= 60  # about half of the 80 items
    plain = TrainDataset(split, text, to_tensor, seed=3)
    assert not any(plain.flipped(i) for i in range(2))
    with pytest.raises(ValueError, match="flip_embeds"):
        TrainDataset(split, text, to_tensor, flip_embeds=flip_text)
