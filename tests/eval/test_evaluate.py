import math

import pytest
import torch

from clipft.eval.evaluate import (DIRECTIONS, EvaluationError, evaluate_split, format_recall_table, mean_recall,
                             retrieval_ranks, retrieval_recall)


def naive_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10)):
    """Reference: full score matrix, full argsort, explicit loops (the obvious implementation)."""
    s = image_emb @ text_emb.T  # [N, M]
    n, m = s.shape
    i2t = {k: 0 for k in ks}
    queries = 0
    for i in range(n):
        own = {j for j in range(m) if int(text_to_image[j]) == i}
        if not own:
            continue
        queries += 1
        order = torch.argsort(s[i], descending=True).tolist()
        for k in ks:
            i2t[k] += any(j in own for j in order[:k])
    t2i = {k: 0 for k in ks}
    for j in range(m):
        order = torch.argsort(s[:, j], descending=True).tolist()
        for k in ks:
            t2i[k] += int(text_to_image[j]) in order[:k]
    return {"image_to_text": {f"R@{k}": 100 * v / queries for k, v in i2t.items()},
            "text_to_image": {f"R@{k}": 100 * v / m for k, v in t2i.items()}}


def test_hand_written_two_captions_per_image():
    # 3 images, 6 captions (2 each). Scores chosen so the rank of every query is known by hand.
    img = torch.eye(3)
    # caption rows: c0,c1 -> img0; c2,c3 -> img1; c4,c5 -> img2
    txt = torch.tensor([
        [0.9, 0.1, 0.0],   # c0: img0 best -> t2i rank 0
        [0.2, 0.8, 0.0],   # c1: belongs to img0 but img1 scores higher -> rank 1
        [0.0, 0.7, 0.1],   # c2: img1 best -> rank 0
        [0.0, 0.6, 0.0],   # c3: rank 0
        [0.5, 0.0, 0.3],   # c4: img2 (0.3) beaten by img0 (0.5) -> rank 1
        [0.6, 0.4, 0.2],   # c5: beaten by img0, img1 -> rank 2
    ])
    t2i = torch.tensor([0, 0, 1, 1, 2, 2])
    image_rank, text_rank = retrieval_ranks(img, txt, t2i)
    assert text_rank.tolist() == [0, 1, 0, 0, 1, 2]
    # img0 row: c0 .9 c1 .2 c2 0 c3 0 c4 .5 c5 .6 -> best own .9 -> rank 0
    # img1 row: c0 .1 c1 .8 c2 .7 c3 .6 c4 0 c5 .4 -> best own .7, beaten by c1 (.8) -> rank 1
    # img2 row: c0 0 c1 0 c2 .1 c3 0 c4 .3 c5 .2 -> best own .3 -> rank 0
    assert image_rank.tolist() == [0, 1, 0]
    r = retrieval_recall(img, txt, t2i, ks=(1, 2))
    assert r["image_to_text"] == pytest.approx({"R@1": 200 / 3, "R@2": 100.0})
    assert r["text_to_image"] == pytest.approx({"R@1": 50.0, "R@2": 500 / 6})


def test_any_caption_counts_for_image_query():
    # The image's second caption is its best: image->text must count it (COCO protocol), where a
    # 1:1 "diagonal" implementation would only look at the first caption.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # img0 owns c0 (bad) and c1 (good)
    r = retrieval_recall(img, txt, torch.tensor([0, 0, 1]), ks=(1,))
    assert r["image_to_text"]["R@1"] == 100.0


@pytest.mark.parametrize("n,per,d,chunk", [(7, 5, 8, 3), (20, 3, 4, 1), (33, 5, 16, None), (5, 1, 3, 100)])
def test_matches_naive_reference(n, per, d, chunk):
    g = torch.Generator().manual_seed(n * 31 + per)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    t2i = torch.arange(n).repeat_interleave(per)
    txt = torch.nn.functional.normalize(img[t2i] + 0.8 * torch.randn(n * per, d, generator=g), dim=-1)
    ks = (1, 2, 5, 10)
    got = retrieval_recall(img, txt, t2i, ks=ks, chunk_size=chunk)
    want = naive_recall(img, txt, t2i, ks=ks)
    for direction in want:
        assert got[direction] == pytest.approx(want[direction])


def test_uneven_captions_and_caption_less_image():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=-1)
    t2i = torch.tensor([0, 0, 0, 1, 2, 2, 4, 4, 4, 4, 4])  # images 3 and 5 own no caption
    txt = torch.nn.functional.normalize(torch.randn(len(t2i), 5, generator=g), dim=-1)
    got = retrieval_recall(img, txt, t2i, ks=(1, 3), chunk_size=2)
    want = naive_recall(img, txt, t2i, ks=(1, 3))
    for direction in want:
        assert got[direction] == pytest.approx(want[direction])


def test_perfect_and_chance():
    img = torch.eye(4)
    r = retrieval_recall(img, img.clone(), torch.arange(4), ks=(1,))
    assert r == {"image_to_text": {"R@1": 100.0}, "text_to_image": {"R@1": 100.0}}
    assert mean_recall(r) == 100.0
    # Reversed matching: every query's positive is last.
    txt = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    r = retrieval_recall(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), txt, torch.tensor([0, 1]), ks=(1, 2))
    assert r["image_to_text"] == {"R@1": 0.0, "R@2": 100.0}
    assert "R@1" in format_recall_table(r)


def test_bad_shapes_rejected():
    with pytest.raises(ValueError):
        retrieval_recall(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        retrieval_recall(torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor([0, 1, 2, 3, 4]))


def pessimistic_ranks(image_emb, text_emb, text_to_image):
    """Reference for ties: rank = number of negatives scoring >= the best positive (full matrix, float64)."""
    s = image_emb.double() @ text_emb.double().T
    n, m = s.shape
    image_rank, text_rank = [], []
    for i in range(n):
        own = [j for j in range(m) if int(text_to_image[j]) == i]
        if own:
            best = max(float(s[i, j]) for j in own)
            image_rank.append(sum(1 for j in range(m) if j not in own and float(s[i, j]) >= best))
    for j in range(m):
        p = int(text_to_image[j])
        text_rank.append(sum(1 for i in range(n) if i != p and float(s[i, j]) >= float(s[p, j])))
    return image_rank, text_rank


def test_ties_count_against_the_query():
    # c0 belongs to img0, but img1 is identical to img0: the tie ranks img1 ahead (rank 1, no R@1 hit).
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image_rank, text_rank = retrieval_ranks(img, txt, torch.tensor([0, 2]))
    assert text_rank.tolist() == [1, 0]
    # Identical captions of two images: each image query sees the other's copy tied with its own.
    txt2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    image_rank, _ = retrieval_ranks(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), txt2, torch.tensor([0, 1]))
    assert image_rank.tolist() == [1, 1]
    r = retrieval_recall(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), txt2, torch.tensor([0, 1]), ks=(1,))
    assert r["image_to_text"]["R@1"] == 0.0


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_constant_tower_is_never_better_than_chance(chunk):
    # A collapsed tower: the same embedding for all 50 images (5 captions each). Strict `>` gave
    # text->image R@1 ~68% depending on the last bit of the scores; pessimistic ties give <= chance.
    g = torch.Generator().manual_seed(0)
    n, per, d = 50, 5, 32
    img = torch.nn.functional.normalize(torch.randn(1, d, generator=g), dim=-1).repeat(n, 1)
    t2i = torch.arange(n).repeat_interleave(per)
    txt = torch.nn.functional.normalize(torch.randn(n * per, d, generator=g), dim=-1)
    ks = (1, 5, 10)
    r = retrieval_recall(img, txt, t2i, ks=ks, chunk_size=chunk)
    for k in ks:
        chance = 100.0 * k / n
        assert r["text_to_image"][f"R@{k}"] <= chance
        # image->text: every image scores the captions alike, so its own captions land at random.
        assert r["image_to_text"][f"R@{k}"] <= 100.0 * (1 - (1 - per / (n * per)) ** (k * per)) + 15
    assert r["text_to_image"]["R@1"] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_ties_match_pessimistic_reference(seed):
    # Quantised embeddings make many exact ties; ranks must match the >= reference exactly.
    g = torch.Generator().manual_seed(seed)
    n, per, d = 9, 3, 4
    img = torch.randint(-1, 2, (n, d), generator=g).float()
    t2i = torch.arange(n).repeat_interleave(per)
    txt = torch.randint(-1, 2, (n * per, d), generator=g).float()
    want_i, want_t = pessimistic_ranks(img, txt, t2i)
    for chunk in (None, 2):
        got_i, got_t = retrieval_ranks(img, txt, t2i, chunk_size=chunk)
        assert got_i.tolist() == want_i and got_t.tolist() == want_t


@pytest.mark.parametrize("where,value", [("image", float("nan")), ("text", float("nan")),
                                         ("image", float("inf")), ("text", float("-inf"))])
def test_non_finite_embeddings_are_refused(where, value):
    img, txt = torch.eye(4), torch.eye(4)
    (img if where == "image" else txt)[1, 2] = value
    with pytest.raises(EvaluationError, match=f"1 of 4 {where} embeddings"):
        retrieval_recall(img, txt, torch.arange(4))


def test_nan_tower_does_not_score_perfect_recall_in_evaluate_split():
    from clipft.data import CaptionedImages, ImageRecord
    from pathlib import Path
    split = CaptionedImages(images=[ImageRecord(image_id=i, path=Path(f"{i}.jpg"), captions=[f"c{i}"],
                                                caption_ids=[i]) for i in range(3)], name="coco:x:val")
    img = torch.full((3, 4), float("nan"))
    with pytest.raises(EvaluationError, match="split 'coco:x:val': 3 of 3 image embeddings"):
        evaluate_split(img, torch.arange(3), split, torch.eye(3, 4), logit_scale=10.0)


def test_mean_recall_k():
    r = {"image_to_text": {"R@1": 10.0, "R@5": 30.0}, "text_to_image": {"R@1": 20.0, "R@5": 50.0}}
    assert mean_recall(r, 5) == 40.0
    assert math.isclose(mean_recall(r), 27.5)


# --------------------------------------------------------------------------- checkpoint evaluation files

def test_evaluate_writes_metrics_by_split_csv_and_embeddings(coco_root, trained_run, capsys):
    import csv
    import json

    from clipft.cli.commands import main
    from clipft.eval.evaluate import load_split_embeddings

    ckpt = trained_run / "best.pt"
    for f in ("metrics.json", "metrics_val.json", "metrics_val.csv", "embeddings_val.safetensors"):
        (trained_run / f).unlink(missing_ok=True)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(coco_root), "--save-embeddings",
                 "--quiet"]) == 0
    m = json.loads((trained_run / "metrics_val.json").read_text())
    # The default val protocol also keeps writing metrics.json (what older readers use).
    assert json.loads((trained_run / "metrics.json").read_text()) == m
    assert m["split"] == "val" and "validation" in m["protocol"]
    rows = list(csv.DictReader(open(trained_run / "metrics_val.csv")))
    assert [(r["direction"], r["k"]) for r in rows] == [(d, k) for d in DIRECTIONS for k in ("1", "5", "10")]
    for r in rows:
        assert float(r["recall"]) == pytest.approx(m[r["direction"]][f"R@{r['k']}"], abs=1e-4)
        assert r["model"] == "fine-tuned" and int(r["num_images"]) == m["num_images"]

    t, meta = load_split_embeddings(trained_run / "embeddings_val.safetensors")
    assert set(t) == {"image_emb", "text_emb", "image_ids", "caption_ids", "caption_to_image"}
    n, mcap = m["num_images"], m["num_captions"]
    assert t["image_emb"].shape[0] == n and t["text_emb"].shape[0] == mcap
    assert t["image_ids"].shape == (n,) and t["caption_ids"].shape == (mcap,)
    assert meta["split"] == "val" and meta["checkpoint"] == str(ckpt)
    # The file alone reproduces the reported recall.
    again = retrieval_recall(t["image_emb"], t["text_emb"], t["caption_to_image"])
    for d in DIRECTIONS:
        assert again[d] == pytest.approx(m[d])
    # caption_to_image pairs each caption id with its image id, as in the annotations.
    ann = json.loads((coco_root / "annotations" / "captions_val2014.json").read_text())["annotations"]
    owner = {a["id"]: a["image_id"] for a in ann}
    for c, r in zip(t["caption_ids"].tolist(), t["caption_to_image"].tolist()):
        assert owner[c] == int(t["image_ids"][r])
    assert "metrics_val.csv" in capsys.readouterr().out


def test_split_embeddings_round_trip_through_the_file(coco_root, trained_run, tmp_path):
    import torch

    from clipft.eval.evaluate import checkpoint_embeddings, save_split_embeddings, split_embeddings_from_file
    emb, cfg = checkpoint_embeddings(trained_run / "best.pt", coco_root, "val")
    save_split_embeddings(tmp_path / "e.safetensors", emb)
    back, _ = split_embeddings_from_file(tmp_path / "e.safetensors", trained_run / "best.pt", coco_root, "val")
    assert torch.equal(back.rows, emb.rows) and torch.equal(back.image_emb, emb.image_emb)
    assert torch.equal(back.text_emb, emb.text_emb) and back.logit_scale == pytest.approx(emb.logit_scale)


def test_compare_zero_shot_clip_side_by_side(coco_root, trained_run, tmp_path, capsys):
    import csv
    import json

    from clipft.eval.clip_baseline import save_tiny_clip_model
    from clipft.cli.commands import main

    clip_dir = save_tiny_clip_model(tmp_path / "tiny-clip-full", image_size=32)
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(coco_root),
                 "--compare-zero-shot", str(clip_dir), "--out", str(out), "--quiet"]) == 0
    m = json.loads(out.read_text())
    zs = m["zero_shot"]
    assert zs["model"] == str(clip_dir) and zs["num_images"] == m["num_images"]
    assert zs["num_captions"] == m["num_captions"] and set(zs["image_to_text"]) == {"R@1", "R@5", "R@10"}
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert len(rows) == 12 and {r["model"] for r in rows} == {"fine-tuned", f"zero-shot {clip_dir}"}
    printed = capsys.readouterr().out
    assert "fine-tuned" in printed and "zero-shot" in printed and "delta" in printed
    # Its captions were cached under the CLIP model's own name, not the checkpoint's encoder.
    assert any("tiny-clip-full" in p.name for p in (coco_root / "cache").glob("val_text_embeds_*"))

    # A directory that is not a full CLIP model: one line, exit 2.
    assert main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(coco_root),
                 "--compare-zero-shot", str(tmp_path), "--out", str(tmp_path / "x.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compare-zero-shot" in err[0]


@pytest.mark.parametrize("command", ["evaluate", "zeroshot"])
def test_nan_checkpoint_is_refused_by_every_entry_point(coco_root, trained_run, tmp_path, capsys, command):
    """A checkpoint whose weights hold NaN: evaluate and zero-shot each say so in one line, exit 2,
    and write no metrics (a NaN tower would otherwise score 100% recall)."""
    from clipft.cli.commands import main
    bad = tmp_path / "bad.pt"
    ckpt = torch.load(trained_run / "best.pt", weights_only=False)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and "head" in k)
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))
    from clipft.checkpoint_file import add_checksum
    torch.save(add_checksum(ckpt), bad)  # as training writes it: its checksum matches, the content is the problem
    args = {"evaluate": ["evaluate", "--checkpoint", str(bad), "--data", str(coco_root)],
            "zeroshot": ["zeroshot", "--checkpoint", str(bad), "--data", str(coco_root), "--labels-from", "shapes"]}
    assert main([*args[command], "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not finite" in err[0] and str(bad) in err[0]
    assert not list(tmp_path.glob("metrics_*.json")) and not list(tmp_path.glob("zeroshot_*.json"))
