"""Karpathy's split files (clipft.data.karpathy): one parser for dataset_coco.json and the Flickr
files (no 'filepath', ids in 'imgid'), file order kept, empty captions counted, schema errors named."""

from __future__ import annotations

import json

import pytest

from clipft.data import DataError
from clipft.data.karpathy import read_karpathy_split


def write(path, images):
    path.write_text(json.dumps({"images": images}))
    return path


def flickr_image(i, split, raws):
    return {"imgid": i, "filename": f"{1000 + i}.jpg", "split": split,
            "sentences": [{"raw": r, "sentid": i * 10 + j} for j, r in enumerate(raws)]}


def test_flickr_schema_in_file_order(tmp_path):
    f = write(tmp_path / "dataset_flickr30k.json",
              [flickr_image(5, "test", [" b ", "c"]), flickr_image(2, "train", ["x"]),
               flickr_image(1, "test", ["a", ""]), flickr_image(7, "test", ["   "])])
    ks = read_karpathy_split(f, "test", id_key="imgid", require_filepath=False)
    assert [im.image_id for im in ks.images] == [5, 1] and [im.position for im in ks.images] == [0, 2]
    assert ks.images[0].captions == ["b", "c"] and ks.images[0].caption_ids == [50, 51]
    assert ks.images[0].filepath is None and ks.images[1].filename == "1001.jpg"
    assert (ks.dropped_images, ks.dropped_captions) == (1, 2)


def test_coco_schema_needs_filepath_and_cocoid(tmp_path):
    img = {"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "cocoid": 1, "split": "test",
           "sentences": [{"raw": "a cat"}]}
    ks = read_karpathy_split(write(tmp_path / "c.json", [img]), "test")
    assert ks.images[0].filepath == "val2014" and ks.images[0].caption_ids == [100]  # cocoid * 100 + position
    del img["filepath"]
    with pytest.raises(DataError, match=r"images\[0\] has no string 'filepath'"):
        read_karpathy_split(write(tmp_path / "c.json", [img]), "test")


@pytest.mark.parametrize("images, needle", [
    ([flickr_image(1, "test", ["a"]), flickr_image(1, "test", ["b"])], "duplicate imgid 1"),
    ([{**flickr_image(1, "test", ["a"]), "sentences": [{"tokens": []}]}], r"sentences\[0\] \(imgid 1\) has no string 'raw'"),
    ([flickr_image(1, "train", ["a"])], "no image with split == 'test'"),
])
def test_errors_name_the_entry(tmp_path, images, needle):
    f = write(tmp_path / "dataset_flickr8k.json", images)
    with pytest.raises(DataError, match=needle) as e:
        read_karpathy_split(f, "test", id_key="imgid", require_filepath=False)
    assert str(e.value).startswith(str(f)) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="unknown Karpathy split 'dev'"):
        read_karpathy_split(f, "dev")
