"""Flickr8k / Flickr30k (clipft.data.flickr): every layout written in its real format with its quirks
(space-separated token lines, caption entries without an image, Kaggle's pipe table with a malformed
row, the nested Kaggle image folder), Karpathy splits, the fallbacks, and each layout validated,
trained a few steps and evaluated on its test split through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipft.cli.commands import main
from clipft.config import Config, DataConfig
from clipft.data import DataError, detect_format, load_split
from clipft.data.flickr import find_layout, load_flickr, seeded_split
from clipft.data.validate import validate_data

# The image of Flickr8k.token.txt that the official Flickr8k zip does not hold.
MISSING_8K = "2258277193_586949ec62.jpg.1"


def write_image(path: Path, i: int, size: int = 16) -> None:
    """A small solid JPEG whose bytes differ for every i (no two count as the same image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (i * 37 % 256, i * 91 % 256, (i * 53 + 17) % 256)).save(path, format="JPEG")


def names_8k(n: int) -> list[str]:
    return [f"{1000268201 + 7919 * i}_{i:04x}b08cb0e.jpg" for i in range(n)]


def names_30k(n: int) -> list[str]:
    return [f"{1000092795 + 104729 * i}.jpg" for i in range(n)]


def caption(name: str, k: int) -> str:
    return f"caption {k} of {name.split('.')[0]} , a dog runs"


def official_8k(root: Path, n: int = 20) -> Path:
    """Flickr8k as the official zips unpack: token file (one line space-separated, one entry whose
    image is not in the zip), the three split lists, images in Flicker8k_Dataset/."""
    names = names_8k(n)
    for i, name in enumerate(names):
        write_image(root / "Flicker8k_Dataset" / name, i)
    lines = [f"{name}#{k}\t{caption(name, k)}" for name in names for k in range(5)]
    lines[3] = lines[3].replace("\t", " ", 1)  # the real file has space-separated lines
    lines.insert(7, f"{MISSING_8K}#0\tA dog whose picture is not in the zip .")
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    cut = {"train": names[:n - 6], "dev": names[n - 6:n - 3], "test": names[n - 3:]}
    for part, ns in cut.items():
        (root / f"Flickr_8k.{part}Images.txt").write_text("\n".join(ns) + "\n")
    return root


def official_30k(root: Path, n: int = 20) -> Path:
    names = names_30k(n)
    for i, name in enumerate(names):
        write_image(root / "flickr30k-images" / name, 100 + i)
    lines = [f"{name}#{k}\t{caption(name, k)}" for name in names for k in range(5)]
    (root / "results_20130124.token").write_text("\n".join(lines) + "\n")
    return root


def kaggle_8k(root: Path, n: int = 20) -> Path:
    """adityajn105/flickr8k: captions.txt (CSV, header image,caption; a caption with an unquoted
    comma, one quoted) and Images/."""
    names = names_8k(n)
    for i, name in enumerate(names):
        write_image(root / "Images" / name, 200 + i)
    rows = ["image,caption"] + [f"{name},{caption(name, k)}" for name in names for k in range(5)]
    rows[2] = f'{names[0]},"A quoted caption, with a comma ."'
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    return root


def kaggle_30k(root: Path, n: int = 20, bad_line: int = 19) -> Path:
    """hsankesara/flickr-image-dataset as downloaded: flickr30k_images/results.csv (pipe-separated,
    spaces after the pipes, one malformed row) and the images one folder further down."""
    names = names_30k(n)
    base = root / "flickr30k_images"
    for i, name in enumerate(names):
        write_image(base / "flickr30k_images" / name, 300 + i)
    rows = ["image_name| comment_number| comment"] + [f"{name}| {k}| {caption(name, k)}"
                                                     for name in names for k in range(5)]
    rows[bad_line - 1] = rows[bad_line - 1].replace(f"| {(bad_line - 2) % 5}|", f"| {(bad_line - 2) % 5}", 1)
    (base / "results.csv").write_text("\n".join(rows) + "\n")
    return root


def karpathy_file(root: Path, dataset: str, names: list[str], test: int = 4, val: int = 3) -> Path:
    """dataset_<dataset>.json in Karpathy's schema (imgid, filename, split, sentences[raw, sentid])."""
    images, sid = [], 0
    for i, name in enumerate(names):
        split = "test" if i < test else "val" if i < test + val else "train"
        sents = []
        for k in range(5):
            sents.append({"raw": caption(name, k), "sentid": sid, "imgid": i, "tokens": []})
            sid += 1
        images.append({"imgid": i, "filename": name, "split": split, "sentids": [s["sentid"] for s in sents],
                       "sentences": sents})
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"dataset": dataset, "images": images}))
    return path


LAYOUTS = {"official-8k": official_8k, "official-30k": official_30k, "kaggle-8k": kaggle_8k,
           "kaggle-30k": kaggle_30k}


# --------------------------------------------------------------------------- layouts and parsing

@pytest.mark.parametrize("layout, dataset, images", [
    ("official-8k", "flickr8k", "Flicker8k_Dataset"), ("official-30k", "flickr30k", "flickr30k-images"),
    ("kaggle-8k", "flickr8k", "Images"), ("kaggle-30k", "flickr30k", "flickr30k_images/flickr30k_images")])
def test_layouts_are_detected(tmp_path, layout, dataset, images):
    root = LAYOUTS[layout](tmp_path)
    lay = find_layout(root)
    assert detect_format(root) == "flickr"
    assert lay.dataset == dataset and lay.images == root / images


def test_official_8k_quirks_parsed_and_reported(tmp_path):
    root = official_8k(tmp_path)
    whole = load_flickr(root, "all")
    assert len(whole) == 20 and len(whole.captions) == 100  # the space-separated line is parsed
    assert whole.caption_problems == {"image_not_found": 1}
    assert f"Flickr8k.token.txt:8 ({MISSING_8K})" in whole.examples["image_not_found"][0]
    test = load_flickr(root, "test")
    assert [r.path.name for r in test.images] == names_8k(20)[17:]
    assert test.dataset == "flickr8k" and test.split_origin == "official test list"
    assert len(load_flickr(root, "val")) == 3 and len(load_flickr(root, "train")) == 14


def test_kaggle_8k_commas_in_captions(tmp_path):
    whole = load_flickr(kaggle_8k(tmp_path), "all")
    caps = whole.images[0].captions
    assert "A quoted caption, with a comma ." in caps
    assert any(c.endswith(", a dog runs") for c in caps)  # the unquoted comma stays in the caption


def test_kaggle_30k_malformed_row_is_one_line_and_skipped(tmp_path, caplog):
    root = kaggle_30k(tmp_path, bad_line=19)
    whole = load_flickr(root, "all")
    assert len(whole.captions) == 99 and whole.caption_problems == {"malformed_row": 1}
    [example] = whole.examples["malformed_row"]
    assert "results.csv" in example and "line 19: expected 3 fields separated by '|' (got 2)" in example
    warned = [r.getMessage() for r in caplog.records if "row skipped" in r.getMessage()]
    assert len(warned) == 1 and "results.csv: line 19: expected 3 fields" in warned[0]


def test_seeded_split_when_there_is_no_split_file(tmp_path):
    root = official_30k(tmp_path)
    parts = {s: load_flickr(root, s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    paths = [{r.path for r in p.images} for p in parts.values()]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert parts["test"].split_origin == "seeded split, seed 0"
    assert [len(seeded_split(31783)[s]) for s in ("test", "val")] == [1000, 1000]
    assert seeded_split(20) == seeded_split(20)  # fixed seed: the same test images every time


def test_karpathy_file_defines_the_splits(tmp_path):
    root = kaggle_30k(tmp_path)
    karpathy_file(root / "flickr30k_images", "flickr30k", names_30k(20))
    test = load_flickr(root, "test")
    assert test.split_origin == "Karpathy" and len(test) == 4 and len(test.captions) == 20
    assert test.image_ids == [0, 1, 2, 3] and test.caption_ids[:2] == [0, 1]
    assert len(load_flickr(root, "val")) == 3 and len(load_flickr(root, "train")) == 13


def test_karpathy_entries_without_an_image_are_dropped_and_named(tmp_path):
    root = official_8k(tmp_path)
    karpathy_file(root, "flickr8k", [MISSING_8K + ".jpg"] + names_8k(20)[1:])
    test = load_flickr(root, "test")
    assert len(test) == 3 and test.caption_problems == {"image_not_found": 5}
    assert "images[0]" in test.examples["image_not_found"][0] and MISSING_8K in test.examples["image_not_found"][0]


def test_errors_are_one_line_naming_the_file(tmp_path):
    root = kaggle_30k(tmp_path)
    csv_path = root / "flickr30k_images" / "results.csv"
    csv_path.write_text("image| caption\n" + csv_path.read_text().split("\n", 1)[1])
    with pytest.raises(DataError) as e:
        load_flickr(root, "train")
    assert str(e.value).startswith(f"{csv_path}: line 1: expected the header") and "\n" not in str(e.value)
    with pytest.raises(DataError, match="no split 'dev'"):
        load_flickr(kaggle_8k(tmp_path / "k8"), "dev")


def test_forced_format_on_a_non_flickr_folder(tmp_path):
    write_image(tmp_path / "a.jpg", 1)
    with pytest.raises(DataError, match="not a Flickr8k/Flickr30k folder"):
        load_split(tmp_path, "train", DataConfig(format="flickr"))


# --------------------------------------------------------------------------- validate, train, evaluate

def test_validate_reports_entries_without_an_image(tmp_path):
    root = official_8k(tmp_path)
    report = validate_data(root, Config(), check_tokens=False)
    assert report["ok"] and report["format"] == "flickr" and "official lists" in report["split"]
    assert set(report["splits"]) == {"train", "val", "test"}
    dropped = report["splits"]["train"]["captions"]["dropped_examples"]["image_not_found"]
    assert MISSING_8K in dropped[0]
    assert any("not in the image folder" in w for w in report["warnings"])


@pytest.mark.parametrize("layout, karpathy, protocol", [
    ("official-8k", False, "flickr8k-test (official test list, 3 images x 15 captions)"),
    ("official-30k", True, "flickr30k-test (Karpathy, 4 images x 20 captions)"),
    ("kaggle-8k", False, "flickr8k-test (seeded split, seed 0, 2 images x 10 captions)"),
    ("kaggle-30k", False, "flickr30k-test (seeded split, seed 0, 2 images x 10 captions)")])
def test_validate_train_evaluate_each_layout(tmp_path, tiny_clip_dir, layout, karpathy, protocol):
    from data.test_formats import small_args
    root = LAYOUTS[layout](tmp_path / "data")
    if karpathy:
        karpathy_file(root, "flickr30k", names_30k(20))
    assert main(["validate", "--data", str(root), "--no-tokens", "--quiet"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run),
                 *small_args(tiny_clip_dir, 1, ["--set", "train.max_steps_per_epoch=2"])]) == 0
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(root), "--split", "test",
                 "--quiet"]) == 0
    m = json.loads((run / "metrics_test.json").read_text())
    assert m["protocol"] == protocol
    assert m["protocol_name"] == protocol.split(" ")[0]
    counts = protocol.rsplit(", ", 1)[1]  # "3 images x 15 captions)"
    assert f"{m['num_images']} images x {m['num_captions']} captions)" == counts
    assert (run / "metrics_test.csv").read_text().splitlines()[1].startswith("fine-tuned,test,")
    if karpathy:  # the same protocol for a full CLIP model, side by side
        from clipft.eval.clip_baseline import save_tiny_clip_model
        clip_dir = save_tiny_clip_model(tmp_path / "tiny-clip-full", image_size=32)
        out = tmp_path / "zs.json"
        assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(root), "--split", "test",
                     "--compare-zero-shot", str(clip_dir), "--out", str(out), "--quiet"]) == 0
        zs = json.loads(out.read_text())
        assert zs["protocol"] == protocol and zs["zero_shot"]["num_images"] == 4
        assert zs["zero_shot"]["num_captions"] == 20
        assert main(["report", str(run)]) == 0
        assert f"Protocol: {protocol}." in (run / "report.md").read_text()
