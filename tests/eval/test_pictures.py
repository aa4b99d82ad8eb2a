"""The pure data behind the pictures: which images/captions are shown, and which are marked correct."""

from pathlib import Path

import torch

from clipft.data import CaptionedImages, ImageRecord
from clipft.eval.evaluate import SplitEmbeddings
from clipft.eval.pictures import data_samples, heatmap_data, image_to_text_results, text_to_image_results
from clipft.eval.protocols import EvalSplit


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


def ranked_toy() -> SplitEmbeddings:
    """6 images, one caption each, in 2-d: caption j's own image ranks at a known place.
    Image i sits at angle i * 30 degrees; caption j at angle a_j: caption 0 on its image (rank 0,
    cosine 1), caption 5 pointing at image 0 (its own image ranks last)."""
    import math
    images = [ImageRecord(i, Path(f"/x/{i}.jpg"), [f"cap {i}"], [i]) for i in range(6)]
    ang_img = [math.radians(30 * i) for i in range(6)]
    ang_cap = [math.radians(a) for a in (0, 35, 55, 95, 120, -10)]
    img = torch.tensor([[math.cos(a), math.sin(a)] for a in ang_img])
    cap = torch.tensor([[math.cos(a), math.sin(a)] for a in ang_cap])
    return SplitEmbeddings(EvalSplit(CaptionedImages(images, "toy"), "val", "toy"), img, torch.arange(6), cap)


def test_example_queries_are_seeded_random_plus_the_best_and_worst_by_rank():
    from clipft.eval.evaluate import retrieval_ranks
    from clipft.eval.pictures import example_queries
    emb = ranked_toy()
    picks = example_queries(emb, n=2, seed=0)
    assert picks == example_queries(emb, n=2, seed=0)  # seeded: the same command, the same examples
    caps = picks["captions"]
    assert [t for _, t in caps] == ["random (seed 0)"] * 2 + ["best by rank", "worst by rank"]
    random_caps = [j for j, _ in caps[:2]]
    assert random_caps == [j for j, _ in example_queries(emb, n=2, seed=0)["captions"][:2]]
    _, text_rank = retrieval_ranks(emb.image_emb, emb.text_emb, emb.data.caption_to_image)
    rest = [j for j in range(6) if j not in random_caps]
    best, worst = caps[2][0], caps[3][0]
    assert text_rank[best] == min(text_rank[j] for j in rest)
    assert text_rank[worst] == max(text_rank[j] for j in rest)
    if 0 in rest:
        assert best == 0  # rank 0 with cosine 1: wins the tie with the other rank-0 captions
    if 5 in rest:
        assert worst == 5
    # Images: seeded random rows, then the best and worst by the rank of their best own caption.
    imgs = picks["images"]
    assert len(imgs) == 4 and len({r for r, _ in imgs}) == 4
    # The rows drive the pictures' data.
    rows = text_to_image_results(emb, picks=[j for j, _ in caps], k=3)
    assert [r["query"] for r in rows] == [f"cap {j}" for j, _ in caps]
    assert [r["correct_rank"] for r in rows] == [int(text_rank[j]) for j, _ in caps]
    assert [r["path"] for r in image_to_text_results(emb, rows=[r for r, _ in imgs])] == \
        [Path(f"/x/{r}.jpg") for r, _ in imgs]
