"""data.splits: which split a name means, and the seeded subsets of data.train_images/val_images."""

from clipft.config import DataConfig
from clipft.data.splits import load_split, subset_size


def test_subset_sizes_and_load_split(coco_root):
    cfg = DataConfig(train_images=8, val_images=0)
    assert (subset_size("train", cfg), subset_size("val", cfg), subset_size("test", cfg)) == (8, 0, 0)
    train = load_split(coco_root, "train", cfg)
    assert len(train) == 8 and ":subset=8" in train.name
    assert len(load_split(coco_root, "val", cfg)) == 12
