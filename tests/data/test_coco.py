"""data.coco: the COCO 2014 layout is recognised and read with all captions per image."""

from clipft.data.coco import is_coco_root, load_coco_captions


def test_coco_root_is_recognised_and_read(coco_root, tmp_path):
    assert is_coco_root(coco_root) and not is_coco_root(tmp_path)
    val = load_coco_captions(coco_root, "val")
    assert len(val) == 12 and len(val.captions) == 60
    assert all(r.path.parent.name == "val2014" and len(r.captions) == 5 for r in val.images)
