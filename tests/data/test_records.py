"""data.records: caption cleaning and the CaptionedImages operations every format shares."""

from pathlib import Path

from clipft.data.records import CaptionedImages, ImageRecord, caption_problem


def _split(n):
    return CaptionedImages(images=[ImageRecord(image_id=i, path=Path(f"{i}.jpg"), captions=[f"c{i}a", f"c{i}b"],
                                               caption_ids=[10 * i, 10 * i + 1]) for i in range(n)], name="t")


def test_caption_problems():
    assert [caption_problem(v) for v in (None, 3, "", "  ", "NaN", "a dog")] == \
        ["missing", "not_text", "empty", "whitespace", "placeholder", None]


def test_caption_index_subset_and_split_by_image():
    d = _split(10)
    assert d.caption_to_image.tolist() == [i for i in range(10) for _ in range(2)]
    sub = d.subset(4, seed=0)
    assert len(sub) == 4 and sub.subset(4, seed=1) is sub and d.subset(0, seed=0) is d
    train, val = d.split_by_image(0.2, seed=0)
    assert len(train) + len(val) == 10 and len(val) == 2
    assert not {r.image_id for r in train.images} & {r.image_id for r in val.images}
