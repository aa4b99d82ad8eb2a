"""Checkpoint selection never sees Karpathy test images when a Karpathy split file is there, and every
Karpathy figure says how many of its images took part in selection."""

import json
import logging
from pathlib import Path

import pytest

from clipft.config import Config, load_config
from clipft.data import load_split
from clipft.data.shapes import make_shapes_dataset
from clipft.eval.protocols import resolve_eval_split

PRESET = Path(__file__).resolve().parents[2] / "configs" / "coco-rn50.yaml"


def _karpathy_file(root: Path, where: Path) -> dict[str, set[str]]:
    """dataset_coco.json over the shapes COCO root: every train2014 image 'train', the val2014 images
    cut into test / val / restval thirds (as Karpathy cut val2014). Returns split -> file names."""
    images, names = [], {"train": set(), "val": set(), "test": set(), "restval": set()}
    for folder in ("train2014", "val2014"):
        files = sorted(p.name for p in (root / folder).glob("*.jpg"))
        for k, name in enumerate(files):
            split = "train" if folder == "train2014" else ("test", "val", "restval")[k % 3]
            names[split].add(name)
            cocoid = int(name.rsplit("_", 1)[1].split(".")[0])
            images.append({"filepath": folder, "filename": name, "cocoid": cocoid, "split": split,
                           "sentences": [{"raw": f"caption {j} of {name}", "sentid": cocoid * 10 + j} for j in range(2)]})
    where.write_text(json.dumps({"dataset": "coco", "images": images}))
    return names


@pytest.fixture()
def root(tmp_path):
    return make_shapes_dataset(tmp_path / "coco", n_train=12, n_val=30, seed=0, image_size=16)


def test_the_preset_selects_on_karpathy_val(root):
    cfg = load_config(PRESET)
    assert cfg.data.val_split == "karpathy-val"


def test_with_the_file_selection_is_karpathy_val_and_never_a_test_image(root):
    names = _karpathy_file(root, root / "dataset_coco.json")
    cfg = load_config(PRESET)
    cfg.data.val_images = 5000
    sel = load_split(root, cfg.data.val_split, cfg.data)
    got = {r.path.name for r in sel.images}
    assert got == names["val"] and not got & names["test"]
    assert "karpathy" in sel.name


def test_without_the_file_selection_falls_back_and_says_it_may_not_be_comparable(root, caplog):
    cfg = load_config(PRESET)
    cfg.data.val_images = 10
    with caplog.at_level(logging.WARNING):
        sel = load_split(root, cfg.data.val_split, cfg.data)
    assert len(sel) == 10 and all(r.path.parent.name == "val2014" for r in sel.images)
    assert "dataset_coco.json" in caplog.text and "may not be comparable" in caplog.text


def test_a_karpathy_figure_states_how_many_of_its_images_took_part_in_selection(root, tmp_path):
    kfile = tmp_path / "elsewhere" / "dataset_coco.json"
    kfile.parent.mkdir()
    names = _karpathy_file(root, kfile)
    # selection on a seeded val2014 subset (the old preset): some Karpathy test images chose best.pt
    cfg = Config()
    cfg.data.val_images = 24
    es = resolve_eval_split(root, "karpathy-test", cfg, karpathy=kfile)
    sel = {r.path.name for r in load_split(root, "val", cfg.data).images}
    n = len(sel & names["test"])
    assert n > 0 and es.selection_overlap["images"] == n and es.selection_overlap["of"] == len(names["test"])
    assert "WARNING" in es.protocol and f"{n} of its {len(names['test'])} images" in es.protocol
    # selection on Karpathy val (the file sits in the data root): zero, and the figure says so
    (root / "dataset_coco.json").write_text(kfile.read_text())
    cfg.data.val_split = "karpathy-val"
    es = resolve_eval_split(root, "karpathy-test", cfg, karpathy=kfile)
    assert es.selection_overlap["images"] == 0 and "none of its" in es.protocol and "WARNING" not in es.protocol
    # the 1K folds too
    es = resolve_eval_split(root, "karpathy-test-1k", cfg, karpathy=kfile)
    assert es.selection_overlap["images"] == 0 and "none of its" in es.protocol


def test_unknown_selection_says_the_figure_may_not_be_comparable(root, tmp_path):
    kfile = tmp_path / "dataset_coco.json"
    _karpathy_file(root, kfile)
    cfg = Config()
    cfg.data.val_split = "nonesuch"  # the run's selection split cannot be loaded here
    es = resolve_eval_split(root, "karpathy-test", cfg, karpathy=kfile)
    assert es.selection_overlap["images"] is None and "may not be comparable" in es.protocol
