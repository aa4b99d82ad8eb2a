"""Every picture is a valid, non-blank PNG of the expected pixel size, made on the synthetic dataset;
plus the data side of the retrieval pictures (pictures.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipft.eval import pictures as P
from clipft.eval import plots as V
from clipft.cli.commands import main


def assert_png(path: Path, size: tuple[int, int]) -> None:
    """Valid PNG, exactly `size` pixels, and not blank: real contrast and a fair share of ink."""
    path = Path(path)
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert im.size == size, (path.name, im.size, size)
        px = np.asarray(im.convert("RGB"), dtype=float)
    assert px.std() > 20, f"{path.name} looks blank (std {px.std():.1f})"
    ink = (px.min(-1) < 200).mean()
    assert ink > 0.02, f"{path.name} is nearly empty ({ink:.1%} non-white pixels)"


def test_sizes_are_what_the_layout_says():
    assert V.text_to_image_size(4) == (1390, 1100)
    assert V.image_to_text_size(4) == (1200, 1180)
    assert V.zero_shot_size(6) == (1320, 930)
    assert V.confusion_size(5) == (600, 600) and V.confusion_size(40) == (1260, 1260)


@pytest.fixture(scope="module")
def embeddings(trained_run, coco_root):
    from clipft.eval.evaluate import checkpoint_embeddings
    emb, _cfg = checkpoint_embeddings(trained_run / "best.pt", coco_root, "val")
    return emb


def test_text_to_image_rows_mark_the_correct_image(embeddings):
    rows = P.text_to_image_results(embeddings, n=3, seed=1)
    assert len(rows) == 3
    keep, c2r = embeddings.kept_captions()
    for r in rows:
        assert len(r["top"]) == 5 and r["correct_rank"] is not None
        scores = [s for _p, s, _c in r["top"]]
        assert scores == sorted(scores, reverse=True)
        # Marked iff it is the caption's own image (found through the split, not the picture code).
        owner = next(rec.path for rec in embeddings.data.images if r["query"] in rec.captions)
        assert [c for _p, _s, c in r["top"]] == [p == owner for p, _s, _c in r["top"]]
        assert (r["correct_rank"] < 5) == any(c for _p, _s, c in r["top"])
    # Free-text queries: an exact dataset caption (other case/spacing) is recognised, others are not.
    caption = embeddings.data.images[0].captions[0]
    q = torch.nn.functional.normalize(torch.randn(2, embeddings.text_emb.shape[1]), dim=-1)
    rows = P.text_to_image_results(embeddings, ["  " + caption.upper(), "a purple elephant"], q)
    assert rows[0]["correct_rank"] is not None and rows[1]["correct_rank"] is None


def test_image_to_text_rows_and_heatmap_blocks(embeddings):
    for r in P.image_to_text_results(embeddings, n=3, seed=0):
        rec = next(x for x in embeddings.data.images if x.path == r["path"])
        assert [gt for _c, _s, gt in r["top"]] == [c in rec.captions for c, _s, _gt in r["top"]]
        assert (r["gt_rank"] == 0) == r["top"][0][2]
    sim, labels, owner = P.heatmap_data(embeddings, n=4, seed=0)
    assert sim.shape == (4, 20) and len(labels) == 4 and owner == [i for i in range(4) for _ in range(5)]


def test_every_picture_from_the_cli(trained_run, coco_root, tmp_path, capsys):
    ck = ["--checkpoint", str(trained_run / "best.pt"), "--data", str(coco_root), "--quiet"]
    out = tmp_path / "pics"
    assert main(["visualize", "all", *ck, "--out", str(out), "--n", "3", "--heatmap-images", "6"]) == 0
    assert_png(out / P.TEXT_TO_IMAGE_PNG, V.text_to_image_size(3))
    assert_png(out / P.IMAGE_TO_TEXT_PNG, V.image_to_text_size(3))
    assert_png(out / P.HEATMAP_PNG, V.HEATMAP_SIZE)
    assert_png(out / "zeroshot_val_examples.png", V.zero_shot_size(6))
    assert_png(out / "zeroshot_val_confusion.png", V.confusion_size(40))

    one = tmp_path / "t2i.png"
    assert main(["visualize", "text-to-image", *ck, "--queries", "a red circle", "a blue star", "--out", str(one)]) == 0
    assert_png(one, V.text_to_image_size(2))

    curves = tmp_path / "curves.png"
    assert main(["visualize", "curves", "--run", str(trained_run), "--out", str(curves)]) == 0
    assert_png(curves, (1650, 495))  # 15 x 4.5 inches at 110 dpi, three panels

    samples = tmp_path / "samples.png"
    assert main(["inspect-data", "--data", str(coco_root), "--split", "train", "--n", "3", "--out", str(samples)]) == 0
    assert_png(samples, V.data_samples_size(3))
    printed = capsys.readouterr().out
    assert "COCO_train2014_" in printed and "120 captions" in printed

    # Missing inputs: one line, exit 2.
    assert main(["visualize", "heatmap", "--data", str(coco_root)]) == 2
    assert main(["visualize", "curves"]) == 2


def test_plot_functions_directly(coco_root, tmp_path):
    """Each plotting function on hand-made inputs (no model), including edge cases: one row,
    a true class outside the top bars, and an unreadable image shown as a placeholder."""
    imgs = sorted((coco_root / "val2014").glob("*.jpg"))
    probs = torch.softmax(torch.arange(40.0) / 10, 0)
    items = [{"path": imgs[0], "probs": probs, "target": 0}]  # the least likely class
    assert_png(V.plot_zero_shot(items, [f"class {i}" for i in range(40)], tmp_path / "z.png"), V.zero_shot_size(1))
    rows = [{"query": "a query", "top": [(tmp_path / "missing.jpg", 0.5, False), (imgs[1], 0.4, True)],
             "correct_rank": 1}]
    assert_png(V.plot_text_to_image(rows, tmp_path / "t.png"), V.text_to_image_size(1, 2))
    cm = torch.tensor([[3, 1], [0, 2]])
    assert_png(V.plot_confusion_matrix(cm, ["a", "b"], tmp_path / "c.png"), V.confusion_size(2))


def test_comparison_pictures_have_their_fixed_sizes(tmp_path):
    """The report's comparison charts: Recall@K bars of several models, and several runs' curves."""
    m = {"image_to_text": {"R@1": 10.0, "R@5": 40.0}, "text_to_image": {"R@1": 12.0, "R@5": 44.0}}
    z = {d: {k: v / 2 for k, v in m[d].items()} for d in m}
    assert_png(V.plot_recall_comparison({"fine-tuned": m, "zero-shot": z}, tmp_path / "r.png", "title"),
               V.COMPARISON_SIZE)
    epochs = [{"epoch": e, "train_loss": 3.0 - e, "mean_R@5": 10.0 * e} for e in (1, 2, 3)]
    assert_png(V.plot_run_curves({"a": epochs, "b": epochs[:2]}, tmp_path / "c.png"), V.RUN_CURVES_SIZE)
