"""clipft.embed: walk a folder, embed it in parallel, skip what cannot be read, write the file."""

import os

import pytest
import torch
from PIL import Image

from clipft.inference import load
from clipft.cli.commands import main
from clipft.embed import IMAGE_EXTENSIONS, embed_folder, embed_paths, list_images, read_folder_embeddings


@pytest.fixture(scope="module")
def model(trained_run):
    return load(trained_run / "best.pt")


@pytest.fixture()
def folder(tmp_path):
    """photos/: a JPEG, a PNG, a GIF in a nested folder, a broken .jpg, a text file, a hidden folder,
    a skipped index folder and a link to an image outside the folder."""
    root = tmp_path / "photos"
    (root / "trips" / "2024").mkdir(parents=True)
    (root / ".thumbs").mkdir()
    (root / ".clipft-index").mkdir()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(root / "a.jpg")
    Image.new("RGBA", (30, 60), (10, 200, 10, 128)).save(root / "B.PNG")
    Image.new("P", (33, 33), 3).save(root / "trips" / "2024" / "c.gif")
    (root / "trips" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(root / ".thumbs" / "a.jpg")
    Image.new("RGB", (8, 8)).save(root / ".clipft-index" / "x.png")
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, root / "link.png")
    os.symlink(root / "a.jpg", root / "trips" / "inside-link.jpg")
    return root


def test_list_images_is_recursive_sorted_relative_and_skips_what_it_should(folder):
    found = list_images(folder)
    # trips/inside-link.jpg is a.jpg again: each file once, by its link-free path
    assert [p.as_posix() for p in found] == ["B.PNG", "a.jpg", "trips/2024/c.gif", "trips/broken.jpg"]
    assert all(not p.is_absolute() for p in found)
    assert ".gif" in IMAGE_EXTENSIONS and ".webp" in IMAGE_EXTENSIONS
    with pytest.raises(FileNotFoundError):
        list_images(folder / "a.jpg")


@pytest.mark.parametrize("workers", [0, 2])
def test_embed_paths_skips_the_broken_file_and_matches_encode_images(model, folder, workers, caplog):
    paths = list_images(folder)
    with caplog.at_level("WARNING", logger="clipft.embed"):
        emb, rows = embed_paths(model, folder, paths, batch_size=2, workers=workers, progress=False)
    assert rows == [0, 1, 2]  # trips/broken.jpg (row 3) skipped
    warnings = [r.getMessage() for r in caplog.records if r.name == "clipft.embed"]
    assert len(warnings) == 1 and "1 unreadable" in warnings[0] and "broken.jpg" in warnings[0]
    want = model.encode_images([folder / paths[r] for r in rows])
    assert emb.shape == (3, model.embed_dim) and torch.allclose(emb, want, atol=1e-6)


def test_embed_folder_writes_paths_sizes_and_mtimes(model, folder, tmp_path):
    out = tmp_path / "out" / "emb.safetensors"
    info = embed_folder(model, folder, out, batch_size=3, workers=0, progress=False)
    assert info["images"] == 3 and info["skipped"] == 1 and info["images_per_s"] > 0
    tensors, paths, meta = read_folder_embeddings(out)
    assert paths == ["B.PNG", "a.jpg", "trips/2024/c.gif"]  # trips/inside-link.jpg is a.jpg: once
    assert tensors["embeddings"].shape == (3, model.embed_dim)
    assert tensors["sizes"].tolist() == [(folder / p).stat().st_size for p in paths]
    assert tensors["mtimes"].tolist() == [(folder / p).stat().st_mtime for p in paths]
    assert meta["fingerprint"] == model.fingerprint and meta["skipped"] == "1"
    assert not list(out.parent.glob("*.tmp"))


def test_cli_embed(trained_run, folder, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["embed", "--model", str(trained_run / "best.pt"), "--images", str(folder), "--out", str(out),
                 "--workers", "0", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "3 images" in text and "1 unreadable" in text and "images/s" in text and str(out) in text
    assert main(["embed", "--model", str(trained_run), "--images", str(folder), "--out", str(out)]) == 2
    assert "best.pt" in capsys.readouterr().err
    assert main(["embed", "--model", str(trained_run / "best.pt"), "--images", str(tmp_path / "nope"),
                 "--out", str(out)]) == 2
    assert "not a directory" in capsys.readouterr().err
