"""The pure data behind the pictures: which images/captions are shown, and which are marked correct."""

from pathlib import Path

import torch

from clipft.data import CaptionedImages, ImageRecord
from clipft.evaluate import SplitEmbeddings
from clipft.pictures import data_samples, heatmap_data, image_to_text_results, text_to_image_results
from clipft.protocols import EvalSplit


def toy(skip_image_1: bool = False) -> SplitEmbeddings:
    # 3 images with 2 captions each; image i and its captions point along axis i (perfect retrieval).
    images = [ImageRecord(10 + i, Path(f"/x/{i}.jpg"), [f"cap {i}a", f"cap {i}b"], [2 * i, 2 * i + 1])
              for i in range(3)]
    data = CaptionedImages(images, "toy")
    text = torch.eye(3).repeat_interleave(2, dim=0)  # [6, 3]
    rows = torch.tensor([0, 2]) if skip_image_1 else torch.arange(3)
    return SplitEmbeddings(EvalSplit(data, "val", "toy"), torch.eye(3)[rows], rows, text)


def test_text_to_image_marks_the_correct_image():
    out = text_to_image_results(toy(), n=3, k=2)
    assert len(out) == 3
    for r in out:
        assert r["correct_rank"] == 0 and r["top"][0][2] is True and r["top"][1][2] is False
        assert r["query"].startswith(f"cap {r['top'][0][0].stem}")
    # Free-text queries: a dataset caption (case/spacing ignored) is marked, a new sentence is not.
    q = text_to_image_results(toy(), queries=["CAP 2a", "a dog"], query_emb=torch.eye(3)[[2, 0]], k=3)
    assert q[0]["correct_rank"] == 0 and q[0]["top"][0][0] == Path("/x/2.jpg")
    assert q[1]["correct_rank"] is None and not any(t[2] for t in q[1]["top"])


def test_image_to_text_ground_truth_and_skipped_images():
    out = image_to_text_results(toy(), n=3, k=3)
    for r in out:
        assert r["gt_rank"] == 0
        assert [t[2] for t in r["top"]] == [True, True, False]
    # An image that failed to decode is not shown, and its captions are not candidates.
    out = image_to_text_results(toy(skip_image_1=True), n=5, k=4)
    assert {r["path"] for r in out} == {Path("/x/0.jpg"), Path("/x/2.jpg")}
    assert all("cap 1" not in t[0] for r in out for t in r["top"])


def test_heatmap_has_diagonal_blocks():
    sim, labels, owner = heatmap_data(toy(), n=3)
    assert sim.shape == (3, 6) and owner == [0, 0, 1, 1, 2, 2]
    for i in range(3):
        assert sim[i, [j for j, o in enumerate(owner) if o == i]].min() > sim[i, [j for j, o in enumerate(owner) if o != i]].max()
    assert "id 10" in labels[0]


def test_data_samples_are_seeded():
    data = toy().data
    a, b = data_samples(data, n=2, seed=1), data_samples(data, n=2, seed=1)
    assert a == b and len(a) == 2 and all(len(s["captions"]) == 2 for s in a)
