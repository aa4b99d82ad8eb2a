"""Evaluation protocols: the Karpathy split loader (real file format), val vs val-full, and
`clipft evaluate --split karpathy-test` end to end."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from clipft.cli.commands import main
from clipft.config import Config, apply_overrides
from clipft.data import DataError, load_coco_captions
from clipft.eval.protocols import load_karpathy_split, resolve_eval_split


def write_karpathy(root: Path, path: Path) -> dict:
    """A dataset_coco.json in Karpathy's format over the shapes images of `root`: 4 train2014 and
    3 val2014 images in 'test', 2 in 'val', the rest 'train'/'restval'. One test image has an
    all-whitespace extra caption (dropped), one has only an empty caption (image dropped)."""
    train = load_coco_captions(root, "train")
    val = load_coco_captions(root, "val")
    images, sentid = [], 0
    plan = [(r, "train2014", "test") for r in train.images[:4]] + [(r, "val2014", "test") for r in val.images[:3]]
    plan += [(r, "val2014", "val") for r in val.images[3:5]] + [(r, "train2014", "train") for r in train.images[4:8]]
    plan += [(r, "train2014", "restval") for r in train.images[8:9]]
    for k, (rec, folder, split) in enumerate(plan):
        sents = []
        for c in rec.captions:
            sents.append({"tokens": c.lower().split(), "raw": "  " + c + " ", "imgid": k, "sentid": sentid})
            sentid += 1
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sents], "filename": rec.path.name,
                       "imgid": k, "split": split, "sentences": sents, "cocoid": rec.image_id})
    images[0]["sentences"].append({"tokens": [], "raw": "   ", "imgid": 0, "sentid": 99999})
    # One more test image whose only caption is empty: dropped and counted.
    extra = train.images[9]
    images.append({"filepath": "train2014", "filename": extra.path.name, "imgid": 99, "split": "test",
                   "sentences": [{"tokens": [], "raw": "", "imgid": 99, "sentid": 100000}], "cocoid": extra.image_id})
    images.reverse()  # file order must not matter: images come out sorted by cocoid
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return {"train": train, "val": val, "plan": plan}


@pytest.fixture()
def karpathy_file(coco_root, tmp_path):
    path = tmp_path / "dataset_coco.json"
    info = write_karpathy(coco_root, path)
    return path, info


def test_karpathy_loader_reads_the_real_format(coco_root, karpathy_file):
    path, info = karpathy_file
    test = load_karpathy_split(path, coco_root, "test")
    expected = sorted([r for r, _f, s in info["plan"] if s == "test"], key=lambda r: r.image_id)
    assert [r.image_id for r in test.images] == [r.image_id for r in expected]
    assert test.dropped_images == 1 and test.dropped_captions == 2
    for got, want in zip(test.images, expected):
        assert got.path.is_file() and got.path.name == want.path.name
        assert got.path.parent.name in ("train2014", "val2014")
        assert got.captions == want.captions  # raw text, whitespace stripped, file order
    # Images come from both folders, and caption ids are the file's sentids.
    assert {r.path.parent.name for r in test.images} == {"train2014", "val2014"}
    assert len(set(test.caption_ids)) == len(test.caption_ids) == 35
    assert 99999 not in test.caption_ids
    assert len(load_karpathy_split(path, coco_root, "val")) == 2
    assert len(load_karpathy_split(path, coco_root, "restval")) == 1


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.pop("images"), "'images' list"),
    (lambda d: d["images"][0].pop("filename"), "has no string 'filename'"),
    (lambda d: d["images"][0].update(cocoid="x"), "integer 'cocoid'"),
    (lambda d: d["images"][0]["sentences"][0].pop("raw"), "has no string 'raw'"),
    (lambda d: d["images"][0].update(filepath="nope2014"), "nope2014: image directory not found"),
    (lambda d: [im.update(split="train") for im in d["images"]], "no image with split == 'test'"),
])
def test_karpathy_loader_errors_name_the_file(coco_root, karpathy_file, mutate, needle):
    path, _ = karpathy_file
    data = json.loads(path.read_text())
    data["images"].reverse()  # put a 'test' image first (the extra one)
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="dataset_coco.json|nope2014") as e:
        load_karpathy_split(path, coco_root, "test")
    assert needle in str(e.value)


def test_val_is_the_configured_subset_and_val_full_is_everything(coco_root):
    cfg = apply_overrides(Config(), ["data.val_images=5"])
    val = resolve_eval_split(coco_root, "val", cfg)
    full = resolve_eval_split(coco_root, "val-full", cfg)
    assert len(val.data) == 5 and len(full.data) == 12
    assert "subset" in val.protocol and "full validation split" in full.protocol
    assert cfg.data.val_images == 5  # the caller's config is not modified
    with pytest.raises(DataError, match="needs --karpathy"):
        resolve_eval_split(coco_root, "karpathy-test", cfg)
    with pytest.raises(DataError, match="only used with --split karpathy"):
        resolve_eval_split(coco_root, "val", cfg, karpathy="x.json")


def test_evaluate_karpathy_test_end_to_end(coco_root, trained_run, karpathy_file, tmp_path, capsys):
    path, info = karpathy_file
    out = tmp_path / "k.json"
    assert main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(coco_root),
                 "--split", "karpathy-test", "--karpathy", str(path), "--out", str(out), "--quiet"]) == 0
    m = json.loads(out.read_text())
    assert m["split"] == "karpathy-test" and m["num_images"] == 7 and m["num_captions"] == 35
    # 7 images: labelled by its real size, never as the published 5k protocol.
    assert "Karpathy-format test split (7 images" in m["protocol"] and "COCO 5k test split" not in m["protocol"]
    rows = list(csv.DictReader(open(tmp_path / "k.csv")))
    assert len(rows) == 6 and {r["split"] for r in rows} == {"karpathy-test"}
    # Its caption cache has its own name, next to (not replacing) the val cache.
    assert list((coco_root / "cache").glob("karpathy-test_text_embeds_*.safetensors"))
    assert "Karpathy" in capsys.readouterr().out
    # Missing --karpathy: one line, exit 2.
    assert main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(coco_root),
                 "--split", "karpathy-test", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--karpathy" in err[0]


# --------------------------------------------------------------------------- COCO 1K test (5 folds)

def test_consecutive_folds():
    from clipft.eval.protocols import consecutive_folds
    folds = consecutive_folds(5000)
    assert [len(f) for f in folds] == [1000] * 5 and folds[1][0] == 1000 and folds[4][-1] == 4999
    assert [len(f) for f in consecutive_folds(7)] == [1, 2, 1, 2, 1]


def test_fold_metrics_equal_each_fold_scored_alone():
    """evaluate_folds = the mean of retrieval_recall run on each fold's images and captions alone."""
    import torch

    from clipft.data import CaptionedImages, ImageRecord
    from clipft.eval.evaluate import evaluate_folds, retrieval_recall
    g = torch.Generator().manual_seed(0)
    n, per = 10, 3
    data = CaptionedImages([ImageRecord(i, Path(f"{i}.jpg"), [f"c{i}.{k}" for k in range(per)],
                                        [i * per + k for k in range(per)]) for i in range(n)], "t")
    img = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img.repeat_interleave(per, 0) + torch.randn(n * per, 8, generator=g), dim=-1)
    folds = [list(range(0, 5)), list(range(5, 10))]
    m = evaluate_folds(img, torch.arange(n), data, txt, folds, ks=(1, 5))
    ref = [retrieval_recall(img[f[0]:f[-1] + 1], txt[f[0] * per:(f[-1] + 1) * per],
                            torch.arange(len(f)).repeat_interleave(per), ks=(1, 5)) for f in folds]
    for d in ("image_to_text", "text_to_image"):
        for k in ("R@1", "R@5"):
            vals = torch.tensor([r[d][k] for r in ref], dtype=torch.float64)
            assert m[d][k] == pytest.approx(float(vals.mean()))
            assert m["folds"]["std"][d][k] == pytest.approx(float(vals.std()))
            assert m["folds"]["min"][d][k] == pytest.approx(float(vals.min()))
    assert m["num_images"] == n and m["num_captions"] == n * per and m["folds"]["count"] == 2
    # an image that could not be decoded leaves its fold with its captions
    m = evaluate_folds(img[1:], torch.arange(1, n), data, txt, folds, ks=(1,))
    assert [f["num_images"] for f in m["folds"]["per_fold"]] == [4, 5] and m["num_captions"] == (n - 1) * per


def test_evaluate_karpathy_test_1k(coco_root, trained_run, karpathy_file, tmp_path, capsys):
    path, info = karpathy_file
    cfg = Config()
    es = resolve_eval_split(coco_root, "karpathy-test-1k", cfg, path)
    file_order = [im["cocoid"] for im in json.loads(path.read_text())["images"]
                  if im["split"] == "test" and im["sentences"][0]["raw"].strip()]
    assert es.data.image_ids == file_order  # folds are cut in the file's order, not by id
    out = tmp_path / "k1.json"
    assert main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(coco_root),
                 "--split", "karpathy-test-1k", "--karpathy", str(path), "--out", str(out), "--quiet"]) == 0
    m = json.loads(out.read_text())
    assert m["split"] == "karpathy-test-1k" and m["folds"]["count"] == 5 and len(m["folds"]["per_fold"]) == 5
    assert "5 folds" in m["protocol"] and m["num_images"] == 7 and m["num_captions"] == 35
    per_fold = [f["text_to_image"]["R@1"] for f in m["folds"]["per_fold"]]
    assert m["text_to_image"]["R@1"] == pytest.approx(sum(per_fold) / 5)
    rows = list(csv.DictReader(open(tmp_path / "k1.csv")))
    assert {"folds", "recall_std", "recall_min", "recall_max"} <= set(rows[0]) and rows[0]["folds"] == "5"
    assert "per-fold spread" in capsys.readouterr().out
    run = shutil.copytree(trained_run, tmp_path / "run")  # the shared run stays as it was
    shutil.copy(out, run / "metrics_karpathy-test-1k.json")
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "### `karpathy-test-1k`" in report and "Mean over 5 folds" in report


def test_protocol_labels_come_from_the_real_counts():
    from clipft.data import CaptionedImages, ImageRecord
    from clipft.eval.protocols import protocol_description

    def split(n):
        return CaptionedImages([ImageRecord(i, Path(f"{i}.jpg"), [f"c{i}"], [i]) for i in range(n)], name="k")
    assert "Karpathy COCO 5k test split" in protocol_description("karpathy-test", split(5000))
    small = protocol_description("karpathy-test", split(40))
    assert "5k test split" not in small and "40 images" in small and "not comparable" in small
    assert "5k validation" not in protocol_description("karpathy-val", split(40))


def test_unknown_split_lists_the_protocols(coco_root):
    from clipft.eval.protocols import PROTOCOLS
    with pytest.raises(DataError) as e:
        resolve_eval_split(coco_root, "valfull", Config())
    assert "valfull" in str(e.value) and all(p in str(e.value) for p in PROTOCOLS)
