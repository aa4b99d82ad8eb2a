"""Zero-shot classification: prompts, class embeddings, ground-truth rules, scoring, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipft.cli.commands import main
from clipft.config import ConfigError
from clipft.data import DataError
from clipft.data.shapes import load_shapes_labels
from clipft.eval.zeroshot import (LabelSet, accuracy_at_k, class_embeddings, class_probabilities, class_prompts,
                             coco_instances_label_set, confusion_matrix, fill_template, largest_object,
                             shapes_label_set, top_k)


def test_templates_and_articles():
    assert fill_template("a photo of a {}.", "red circle") == "a photo of a red circle."
    assert fill_template("a photo of a {}.", "orange star") == "a photo of an orange star."
    assert fill_template("A {} on a table", "apple") == "An apple on a table"
    assert fill_template("{}", "orange") == "orange"
    assert class_prompts(["cat", "owl"], ["a {}", "the {}"]) == [["a cat", "the cat"], ["an owl", "the owl"]]
    with pytest.raises(ConfigError, match="no '{}'"):
        fill_template("a photo", "cat")
    with pytest.raises(ConfigError):
        class_prompts([], ["a {}"])


class FakeEncoder:
    """Embeds each prompt to a fixed, hand-chosen unit vector."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return F.normalize(torch.tensor([self.table[t] for t in texts], dtype=torch.float), dim=-1)


def test_class_embedding_is_the_normalised_mean_of_its_prompts():
    enc = FakeEncoder({"a cat": [1.0, 0.0], "the cat": [0.0, 1.0], "a dog": [-1.0, 0.0], "the dog": [-3.0, 0.0]})
    emb = class_embeddings(enc, ["cat", "dog"], ["a {}", "the {}"])
    assert enc.calls == [["a cat", "the cat", "a dog", "the dog"]]  # one batch for all prompts
    s = 2 ** -0.5
    assert torch.allclose(emb, torch.tensor([[s, s], [-1.0, 0.0]]))
    probs = class_probabilities(torch.tensor([[1.0, 0.0]]), emb, logit_scale=10.0)
    want = torch.softmax(torch.tensor([10 * s, -10.0]), 0)
    assert torch.allclose(probs[0], want)
    assert top_k(probs, ["cat", "dog"], 5) == [[("cat", pytest.approx(float(want[0]))),
                                                ("dog", pytest.approx(float(want[1])))]]


def test_scoring_by_hand():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    target = torch.tensor([1, 1, 0, 0])
    acc = accuracy_at_k(probs, target, ks=(1, 2))
    assert acc == {"top1": 50.0, "top2": 75.0}  # image 2's class 0 is third
    cm = confusion_matrix(probs.argmax(-1), target, 3)
    assert cm.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize("objects,want", [
    ([{"size": "small", "shape": "star"}], "star"),
    ([{"size": "small", "shape": "star"}, {"size": "large", "shape": "cross"}], "cross"),
    ([{"size": "large", "shape": "star"}, {"size": "large", "shape": "cross"}], None),
    ([{"size": "small", "shape": "star"}, {"size": "small", "shape": "cross"}], None),
    ([{"size": "small", "shape": "a"}, {"size": "large", "shape": "b"}, {"size": "small", "shape": "c"}], "b"),
])
def test_largest_object_rule(objects, want):
    got = largest_object(objects)
    assert (got["shape"] if got else None) == want


def test_shapes_label_set_follows_the_labels_file(coco_root):
    raw = load_shapes_labels(coco_root, "val")
    for field, n in (("color-shape", 40), ("shape", 5), ("color", 8)):
        ls = shapes_label_set(coco_root, "val", field)
        assert len(ls.classes) == n
        assert set(ls.targets) | set(ls.unlabelled) == set(raw) and not set(ls.targets) & set(ls.unlabelled)
        for image_id, t in ls.targets.items():
            obj = largest_object(raw[image_id])
            want = {"shape": obj["shape"], "color": obj["color"]}.get(field, f"{obj['color']} {obj['shape']}")
            assert ls.classes[t] == want
    with pytest.raises(DataError, match="unknown field"):
        shapes_label_set(coco_root, "val", "size")


def test_coco_instances_labels_use_the_largest_annotation(tmp_path):
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps({
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}],
        "annotations": [{"image_id": 1, "category_id": 17, "area": 50.0},
                        {"image_id": 1, "category_id": 18, "area": 80.0},
                        {"image_id": 2, "category_id": 17, "bbox": [0, 0, 3, 4]}]}))
    ls = coco_instances_label_set(path)
    assert ls.classes == ["cat", "dog"]  # category id order
    assert ls.targets == {1: 1, 2: 0} and ls.unlabelled == [3]
    r = ls.restrict(["dog"])
    assert r.classes == ["dog"] and r.targets == {1: 0} and sorted(r.unlabelled) == [2, 3]
    path.write_text(json.dumps({"categories": [], "annotations": [{"image_id": 1}]}))
    with pytest.raises(DataError, match="instances_val2014.json"):
        coco_instances_label_set(path)


def test_cli_zeroshot_on_image_files(trained_run, coco_root, tmp_path, capsys):
    imgs = sorted((coco_root / "val2014").glob("*.jpg"))[:2]
    plot = tmp_path / "zs.png"
    assert main(["zeroshot", "--checkpoint", str(trained_run / "best.pt"), "--image", *map(str, imgs),
                 "--labels", "red circle", "blue square", "green star", "--template", "a {}",
                 "--template", "a picture of a {}", "--top-k", "2", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(imgs[0]) and out[3] == str(imgs[1])
    probs = [float(line.split()[0]) for line in (out[1], out[2])]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert Image.open(plot).size[0] > 0

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["zeroshot", "--checkpoint", str(trained_run / "best.pt"), "--image", str(bad),
                 "--labels", "a", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jpg" in err[0]


def test_cli_zeroshot_on_a_labelled_split(trained_run, coco_root, tmp_path, capsys):
    out = tmp_path / "zs"
    assert main(["zeroshot", "--checkpoint", str(trained_run / "best.pt"), "--data", str(coco_root),
                 "--labels-from", "shapes:shape", "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "zeroshot_val.json").read_text())
    assert r["classes"] == ["circle", "square", "triangle", "star", "cross"] and r["chance_top1"] == 20.0
    cm = np.array(r["confusion"])
    assert cm.sum() == r["num_images"] > 0 and r["num_images"] + r["unlabelled_images"] == 12
    assert r["top1"] == pytest.approx(100.0 * np.trace(cm) / cm.sum())
    assert r["top5"] == 100.0  # 5 classes
    for f in ("zeroshot_val_confusion.png", "zeroshot_val_examples.png"):
        assert (out / f).is_file()
    assert "top-1" in capsys.readouterr().out

    # Either --image or --data; --data needs --labels-from.
    ck = ["zeroshot", "--checkpoint", str(trained_run / "best.pt")]
    assert main(ck + ["--labels", "a"]) == 2
    assert main(ck + ["--data", str(coco_root)]) == 2
    assert "--labels-from" in capsys.readouterr().err


def test_labelset_restrict_keeps_order():
    ls = LabelSet(["a", "b", "c"], {1: 0, 2: 2, 3: 1}, "x", "rule")
    r = ls.restrict(["c", "a"])
    assert r.targets == {1: 1, 2: 0} and r.unlabelled == [3]


def test_shapes_labels_on_other_data_explain_where_they_exist(tmp_path):
    from clipft.eval.zeroshot import shapes_label_set
    with pytest.raises(DataError, match="shapes dataset only"):
        shapes_label_set(tmp_path, "val")
