"""Own-data formats (clipft.data): CSV/TSV, JSONL, image folders; separator sniffing, grouping,
splits by image, cache locations, the train/val leak refusal, and a CSV dataset trained end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train.test_loop import small_args as train_small_args
from PIL import Image

from clipft.cli.commands import main
from clipft.config import Config, DataConfig
from clipft.data import (DataError, cache_location, caption_problem, detect_format, load_csv_captions, load_dataset,
                         load_folder_captions, load_jsonl_captions, load_split, sniff_delimiter,
                         split_source, text_cache_file)
from clipft.train.rundir import read_records


def color(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, (i * 53 + 17) % 256)


def write_image(path: Path, i: int, size: int = 16) -> Path:
    """A small solid image whose bytes differ for every i (so no two count as the same image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color(i)).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


# --------------------------------------------------------------------------- CSV / TSV


def test_tsv_relative_paths_grouping_and_ids(tmp_path):
    for i, name in enumerate(["b.jpg", "a.jpg", "sub/c.jpg"]):
        write_image(tmp_path / "imgs" / name, i)
    (tmp_path / "data.tsv").write_text(
        "filepath\tcaption\n"
        "imgs/b.jpg\ta dog, brown, running\n"   # commas inside a TSV caption
        "imgs/a.jpg\tfirst of a\n"
        "imgs/sub/c.jpg\ta cat\n"
        "imgs/b.jpg\tsecond of b\n"
        "./imgs/a.jpg\tsecond of a\n")         # same image, spelled differently
    ds = load_csv_captions(tmp_path / "data.tsv")
    assert [r.path for r in ds.images] == [tmp_path / "imgs" / n for n in ("a.jpg", "b.jpg", "sub/c.jpg")]
    assert ds.image_ids == [0, 1, 2]  # position in the sorted list of image paths
    assert [r.captions for r in ds.images] == [["first of a", "second of a"],
                                               ["a dog, brown, running", "second of b"], ["a cat"]]
    assert [r.caption_ids for r in ds.images] == [[1, 4], [0, 3], [2]]  # row positions in the file
    assert ds.caption_to_image.tolist() == [0, 0, 1, 1, 2]
    assert ds.dropped_captions == 0 and ds.dropped_images == 0
    assert detect_format(tmp_path / "data.tsv") == "csv"


def test_csv_quoted_commas_newlines_absolute_paths(tmp_path):
    a = write_image(tmp_path / "elsewhere" / "a.jpg", 1)
    write_image(tmp_path / "set" / "b.png", 2)
    (tmp_path / "set" / "data.csv").write_text(
        'image,text,source\n'
        f'{a},"a red car, parked\tnear a tree",web\n'      # absolute path; comma and tab inside quotes
        'b.png,"two lines\nof caption",web\n'              # relative to the CSV's folder; quoted newline
        f'"{a}","said ""hello"", twice",web\n')            # quoted path, escaped quotes
    ds = load_csv_captions(tmp_path / "set" / "data.csv")
    assert [r.path for r in ds.images] == [a, tmp_path / "set" / "b.png"]
    assert ds.images[0].captions == ["a red car, parked\tnear a tree", 'said "hello", twice']
    assert ds.images[1].captions == ["two lines\nof caption"]


@pytest.mark.parametrize("sep", [",", "\t", ";", "|"])
def test_separator_sniffing(sep):
    text = sep.join(["id", "filepath", "caption"]) + "\n" + sep.join(["1", "a.jpg", '"x, y; z | w"']) + "\n"
    assert sniff_delimiter(text) == sep


def test_sniffing_prefers_the_separator_that_finds_the_columns():
    # Commas appear in the header row too, but only tab splits it into the image and caption columns.
    text = 'filepath\tcaption, english\nimg.jpg\ta, b, c\n'
    assert sniff_delimiter(text, caption_column="caption, english") == "\t"
    # Default names are found case-insensitively and with surrounding spaces.
    assert sniff_delimiter(" Image ; Text \na.jpg;x\n") == ";"


def test_column_errors_name_file_columns_and_setting(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("photo,words\na.jpg,hi\n")
    with pytest.raises(DataError) as exc:
        load_csv_captions(f)
    msg = str(exc.value)
    assert msg.startswith(f"{f}: ") and "'photo', 'words'" in msg and "data.image_column" in msg
    ds = load_csv_captions(f, DataConfig(image_column="photo", caption_column="words"))
    assert ds.captions == ["hi"]
    with pytest.raises(DataError, match="no caption column 'label'"):
        load_csv_captions(f, DataConfig(image_column="photo", caption_column="label"))
    f.write_text("just one column\na.jpg\n")
    with pytest.raises(DataError, match="no tab, comma, semicolon"):
        load_csv_captions(f)
    f.write_bytes(b"filepath,caption\na.jpg,caf\xe9\n")
    with pytest.raises(DataError, match=r"not UTF-8 text \(line 2"):
        load_csv_captions(f)


def test_bad_rows_and_captions_are_dropped_and_counted(tmp_path):
    for i, n in enumerate("abcde"):
        write_image(tmp_path / f"{n}.jpg", i)
    f = tmp_path / "d.csv"
    f.write_text("filepath,caption\n"
                 "a.jpg,good one\n"
                 "a.jpg,None\n"                 # placeholder
                 "b.jpg,NA\n"                   # placeholder -> b has no usable caption
                 "c.jpg,\n"                     # empty
                 "c.jpg,   \n"                  # whitespace only
                 "d.jpg,a, unquoted comma\n"    # one field too many
                 "e.jpg\n"                      # caption cell absent
                 ",orphan caption\n"            # no image path
                 "\n"                           # blank lines are skipped silently
                 "e.jpg,nan\n"
                 "e.jpg,fine\n")
    ds = load_csv_captions(f)
    assert [r.path.name for r in ds.images] == ["a.jpg", "e.jpg"]
    assert ds.captions == ["good one", "fine"]
    assert ds.caption_problems == {"placeholder": 3, "empty": 1, "whitespace": 1, "malformed_row": 1,
                                   "missing": 1, "no_image_path": 1}
    assert ds.dropped_captions == 8 and ds.dropped_images == 3  # b, c, d
    assert ds.examples["malformed_row"] == [f"{f}:7: '3 fields, the header has 2'"]
    assert ds.image_ids == [0, 4]  # ids count the images left without captions too
    f.write_text("filepath,caption\na.jpg,None\n")
    with pytest.raises(DataError, match="no image has a usable caption"):
        load_csv_captions(f)


@pytest.mark.parametrize("value, reason", [(None, "missing"), (3, "not_text"), ("", "empty"), (" \t\n", "whitespace"),
                                           ("None", "placeholder"), (" null ", "placeholder"), ("N/A", "placeholder"),
                                           ("NaN", "placeholder"), ("a nan bread", None), ("Nonet", None)])
def test_caption_problem(value, reason):
    assert caption_problem(value) == reason


# --------------------------------------------------------------------------- JSONL


def test_jsonl_keys_caption_lists_and_nulls(tmp_path):
    for i, n in enumerate("abc"):
        write_image(tmp_path / f"{n}.jpg", i)
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(o) for o in [
        {"image": "a.jpg", "caption": "one"},
        {"image": "b.jpg", "captions": ["two", "three", None]},
        {"image": "c.jpg", "caption": None},
        {"image": "a.jpg", "caption": "four"},
    ]) + "\n\n")
    # "caption" and "captions" both exist as keys: the first default found (caption) is used...
    ds = load_jsonl_captions(f)
    assert [r.captions for r in ds.images] == [["one", "four"]]
    # ...unless the caption key is named.
    ds = load_jsonl_captions(f, DataConfig(caption_column="captions"))
    assert [r.captions for r in ds.images] == [["two", "three"]]
    assert ds.caption_problems == {"missing": 4}  # 3 objects without 'captions' + one null in the list
    assert detect_format(f) == "jsonl"


def test_hf_imagefolder_metadata_jsonl(tmp_path):
    for i, n in enumerate(["x/1.jpg", "x/2.jpg", "3.png"]):
        write_image(tmp_path / n, i)
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "x/1.jpg", "text": "first"}\n{"file_name": "x/2.jpg", "text": "second"}\n'
        '{"file_name": "3.png", "text": "third", "extra": 1}\n')
    assert detect_format(tmp_path) == "jsonl"
    ds = load_dataset(tmp_path)
    assert [r.path for r in ds.images] == [tmp_path / "3.png", tmp_path / "x/1.jpg", tmp_path / "x/2.jpg"]
    assert ds.captions == ["third", "first", "second"]


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", caption: "y"}\n')
    with pytest.raises(DataError, match=r"d.jsonl: line 2: not valid JSON"):
        load_jsonl_captions(f)
    f.write_text('{"image": "a.jpg", "caption": "x"}\n["b.jpg", "y"]\n')
    with pytest.raises(DataError, match="line 2: expected a JSON object, got a JSON list"):
        load_jsonl_captions(f)
    f.write_text('{"picture": "a.jpg", "caption": "x"}\n')
    with pytest.raises(DataError, match="no image key"):
        load_jsonl_captions(f)


# --------------------------------------------------------------------------- folder


def test_folder_nested_txt_captions(tmp_path):
    root = tmp_path / "photos"
    write_image(root / "a.jpg", 0)
    (root / "a.txt").write_text("a first\n\na second\n")
    write_image(root / "trip" / "day1" / "b.png", 1)
    (root / "trip" / "day1" / "b.txt").write_text("b only\n")
    write_image(root / "trip" / "c.jpeg", 2)  # no caption file
    (root / "trip" / "orphan.txt").write_text("nobody's caption\n")
    write_image(root / ".hidden" / "h.jpg", 3)  # hidden folders are skipped
    (root / ".hidden" / "h.txt").write_text("hidden\n")
    (root / "d.txt").write_bytes(b"caf\xe9\n")
    write_image(root / "d.jpg", 4)
    assert detect_format(root) == "folder"
    ds = load_folder_captions(root)
    assert [r.path for r in ds.images] == [root / "a.jpg", root / "trip/day1/b.png"]
    assert [r.captions for r in ds.images] == [["a first", "a second"], ["b only"]]
    assert ds.caption_problems == {"empty": 1, "no_image": 1, "not_utf8": 1}
    assert ds.dropped_images == 2  # c.jpeg (no .txt) and d.jpg (unreadable .txt)
    assert sorted(ds.examples["image_without_caption"]) == [str(root / "d.jpg"), str(root / "trip/c.jpeg")]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi\n")
    with pytest.raises(DataError, match="unrecognised dataset layout"):
        detect_format(empty)
    with pytest.raises(DataError, match="no image files"):
        load_folder_captions(empty)


def test_detect_format_errors(tmp_path):
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(DataError, match="unrecognised data file type '.parquet'"):
        detect_format(tmp_path / "d.parquet")
    # a forced format reads a file whatever its extension
    write_image(tmp_path / "a.jpg", 0)
    (tmp_path / "d.txt").write_text("filepath,caption\na.jpg,hello\n")
    assert load_dataset(tmp_path / "d.txt", DataConfig(format="tsv")).captions == ["hello"]
    with pytest.raises(DataError, match="unknown data format 'parquet'"):
        load_dataset(tmp_path / "d.txt", DataConfig(format="parquet"))


# --------------------------------------------------------------------------- splits


def many_images_csv(tmp_path: Path, n: int = 20, caps: int = 3, name: str = "data.csv", start: int = 0) -> Path:
    rows = ["filepath,caption"]
    for i in range(start, start + n):
        write_image(tmp_path / "img" / f"{i:03d}.jpg", i)
        rows += [f"img/{i:03d}.jpg,caption {k} of image {i}" for k in range(caps)]
    (tmp_path / name).write_text("\n".join(rows) + "\n")
    return tmp_path / name


def test_val_fraction_splits_by_image_deterministically(tmp_path):
    f = many_images_csv(tmp_path, 20, 3)
    cfg = DataConfig(val_fraction=0.25, subset_seed=1)
    train, val = load_split(f, "train", cfg), load_split(f, "val", cfg)
    assert len(train) == 15 and len(val) == 5
    tp, vp = {r.path for r in train.images}, {r.path for r in val.images}
    assert not tp & vp and len(tp | vp) == 20
    assert all(len(r.captions) == 3 for r in train.images + val.images)  # never split by caption
    assert not set(train.captions) & set(val.captions)
    assert [r.image_id for r in val.images] == sorted(r.image_id for r in val.images)  # file order kept
    again = load_split(f, "val", cfg)
    assert again.image_ids == val.image_ids
    other = load_split(f, "val", DataConfig(val_fraction=0.25, subset_seed=2))
    assert other.image_ids != val.image_ids
    assert len(load_split(f, "all", cfg)) == 20
    # subsets apply after the split
    assert len(load_split(f, "train", DataConfig(val_fraction=0.25, train_images=4))) == 4
    with pytest.raises(DataError, match="has no split 'test'"):
        load_split(f, "test", cfg)
    with pytest.raises(DataError, match="--val-data"):
        load_split(f, "val", DataConfig(val_fraction=0.0))
    assert len(load_split(f, "train", DataConfig(val_fraction=0.0))) == 20


def test_val_path_gives_the_validation_split(tmp_path):
    train_f = many_images_csv(tmp_path, 6, 1, "train.csv")
    val_f = many_images_csv(tmp_path, 3, 2, "val.csv", start=100)
    cfg = DataConfig(val_path=str(val_f))
    train, val = load_split(train_f, "train", cfg), load_split(train_f, "val", cfg)
    assert len(train) == 6 and len(val) == 3 and len(val.captions) == 6
    assert split_source(train_f, "val", cfg).path == val_f
    assert split_source(train_f, "train", cfg).part == "all"


def test_text_cache_files_do_not_collide(tmp_path, coco_root):
    a = many_images_csv(tmp_path, 4, 1, "a.csv")
    b = many_images_csv(tmp_path, 4, 1, "b.csv")
    cfg = Config()
    cfg.text.encoder = "my/enc"
    paths = {text_cache_file(f, s, cfg) for f in (a, b) for s in ("train", "val")}
    assert len(paths) == 4 and all(p.parent == tmp_path / "cache" for p in paths)
    assert text_cache_file(a, "val", cfg).name == "a-val_text_embeds_my_enc.safetensors"
    assert cache_location(a, "val", cfg) == (tmp_path / "cache", "a-val")  # also for prepare-images
    cfg.data.val_path = str(b)
    assert text_cache_file(a, "train", cfg).name.startswith("a-all_")
    assert text_cache_file(a, "val", cfg).name.startswith("b-all_")
    # COCO keeps its layout: ROOT/cache/<split>_text_embeds_...
    assert text_cache_file(coco_root, "val", Config()) == coco_root / "cache" / \
        "val_text_embeds_openai_clip-vit-base-patch32.safetensors"
    # Seeded subsets of one split get their own files: runs on different subsets do not evict each other.
    sub = Config()
    sub.data.val_images, sub.data.subset_seed = 500, 3
    assert text_cache_file(coco_root, "val", sub).name.startswith("val-subset500-seed3_text_embeds_")
    sub.data.val_images = 400
    assert text_cache_file(coco_root, "val", sub) != text_cache_file(coco_root, "val", Config())
    assert text_cache_file(coco_root, "train", sub) == text_cache_file(coco_root, "train", Config())


# --------------------------------------------------------------------------- training


def small_args(text_dir, epochs=1, extra=()):
    """test_train's tiny settings, one warmup step (these runs are one or two steps long)."""
    return train_small_args(text_dir, epochs, ["--set", "train.warmup_steps=1", *extra])


def coco_as_csv(coco_root: Path, out: Path) -> Path:
    """The tiny shapes COCO train split rewritten as a CSV: images copied beside it, one row per caption."""
    ann = json.loads((coco_root / "annotations" / "captions_train2014.json").read_text())
    files = {i["id"]: i["file_name"] for i in ann["images"]}
    (out / "images").mkdir(parents=True)
    for name in files.values():
        shutil.copy(coco_root / "train2014" / name, out / "images" / name)
    import csv
    with open(out / "shapes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        for a in ann["annotations"]:
            w.writerow([f"images/{files[a['image_id']]}", a["caption"]])
    return out / "shapes.csv"


def test_train_evaluate_report_on_a_csv_dataset(coco_root, tiny_clip_dir, tmp_path, capsys):
    data = coco_as_csv(coco_root, tmp_path / "mydata")
    run = tmp_path / "run"
    args = small_args(tiny_clip_dir, 1, ["--set", "data.val_fraction=0.25", "--set", "train.max_steps_per_epoch=2"])
    assert main(["train", "--data", str(data), "--out", str(run), *args]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"]["train_images"] == 18 and summary["dataset"]["val_images"] == 6
    assert summary["dataset"]["train_captions"] == 90
    assert summary["dataset"]["source"].startswith(f"csv:{data}")
    caches = sorted(p.name for p in (data.parent / "cache").glob("*.safetensors"))
    assert [c.split("_text_embeds_")[0] for c in caches] == ["shapes-train", "shapes-val"]
    steps = read_records(run / "metrics.jsonl", "step")
    assert {"skipped_steps", "embed_cos", "chance_loss", "logit_scale"} <= set(steps[0])
    epochs = read_records(run / "metrics.jsonl", "epoch")
    assert [r["epoch"] for r in epochs] == [1] and "R@5" in epochs[-1]["val"]["text_to_image"]

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(data), "--quiet"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["num_images"] == 6 and m["num_captions"] == 30  # the same held-out 6 images
    assert main(["report", str(run)]) == 0
    assert "Health warnings" in (run / "report.md").read_text()


def test_train_refuses_a_leaking_split(tmp_path, tiny_clip_dir, capsys):
    train_f = many_images_csv(tmp_path, 6, 1, "train.csv")
    # the validation file names a copy of a training image under another name
    shutil.copy(tmp_path / "img" / "002.jpg", tmp_path / "img" / "copy_of_two.jpg")
    write_image(tmp_path / "img" / "v.jpg", 50)
    (tmp_path / "val.csv").write_text("filepath,caption\nimg/copy_of_two.jpg,a copy\nimg/v.jpg,its own\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(train_f), "--val-data", str(tmp_path / "val.csv"), "--out", str(run),
                 *small_args(tiny_clip_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipft: error: ")
    assert "1 validation image(s)" in err[0] and "copy_of_two.jpg" in err[0] and "002.jpg" in err[0]
    assert not (run / "last.pt").exists()
