"""Kaggle copies (clipft.data.kaggle) against a local stand-in for kagglehub's download function,
passed through download_kaggle's `fetch` argument: layouts as the real copies have them, the
COCO copy trained on, and missing credentials / no network / an unexpected layout as one line each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests
from data.test_flickr import kaggle_8k, kaggle_30k

from clipft.cli.commands import main
from clipft.data import detect_format, load_split
from clipft.config import DataConfig
from clipft.data.download import NetworkError, RemoteFileError
from clipft.data.kaggle import KAGGLE_COPIES, KaggleError, KaggleLayoutError, download_kaggle


def stand_in(folder: Path, calls: list[str] | None = None):
    """A kagglehub.dataset_download replacement: returns `folder` for any handle."""
    def fetch(handle: str) -> str:
        if calls is not None:
            calls.append(handle)
        return str(folder)
    return fetch


def coco_copy(coco_root: Path, out: Path, annotations: bool = True) -> Path:
    """jeffaudi/coco-2014-dataset-for-yolov3 as kagglehub unpacks it: coco2014/images/{train,val}2014,
    coco2014/labels/ (YOLO), coco2014/coco.names, and (when the copy has them) coco2014/annotations/."""
    base = out / "coco2014"
    for s in ("train2014", "val2014"):
        shutil.copytree(coco_root / s, base / "images" / s)
        (base / "labels" / s).mkdir(parents=True)
    (base / "coco.names").write_text("person\nbicycle\n")
    if annotations:
        (base / "annotations").mkdir()
        for s in ("train", "val"):
            shutil.copy(coco_root / "annotations" / f"captions_{s}2014.json", base / "annotations")
    return out


def test_the_copies_named(tmp_path):
    assert KAGGLE_COPIES["coco"].handle == "jeffaudi/coco-2014-dataset-for-yolov3"
    assert KAGGLE_COPIES["flickr8k"].handle == "adityajn105/flickr8k"
    assert KAGGLE_COPIES["flickr30k"].handle == "hsankesara/flickr-image-dataset"


@pytest.mark.parametrize("dataset, write", [("flickr8k", kaggle_8k), ("flickr30k", kaggle_30k)])
def test_flickr_copies_are_linked_and_read(tmp_path, dataset, write):
    src = write(tmp_path / "kagglehub" / dataset)
    calls: list[str] = []
    r = download_kaggle(dataset, tmp_path / "data", fetch=stand_in(src, calls))
    assert calls == [KAGGLE_COPIES[dataset].handle] and r["source"] == str(src)
    root = tmp_path / "data"
    assert detect_format(root) == "flickr"
    assert len(load_split(root, "test", DataConfig())) == 2
    again = download_kaggle(dataset, root, fetch=stand_in(src))  # a rerun links nothing new
    assert again["linked"] == []


def test_coco_copy_laid_out_trains_and_evaluates(coco_root, tiny_clip_dir, tmp_path):
    from data.test_formats import small_args
    src = coco_copy(coco_root, tmp_path / "kagglehub")
    root = tmp_path / "coco"
    r = download_kaggle("coco", root, fetch=stand_in(src))
    assert sorted(Path(p).name for p in r["linked"]) == ["annotations", "train2014", "val2014"]
    assert detect_format(root) == "coco"
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run),
                 *small_args(tiny_clip_dir, 1, ["--set", "train.max_steps_per_epoch=1"])]) == 0
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(root), "--quiet"]) == 0
    assert json.loads((run / "metrics_val.json").read_text())["num_images"] == 12


def test_coco_copy_without_captions_says_what_to_run(coco_root, tmp_path):
    src = coco_copy(coco_root, tmp_path / "kagglehub", annotations=False)
    root = tmp_path / "coco"
    with pytest.raises(KaggleLayoutError) as e:
        download_kaggle("coco", root, fetch=stand_in(src))
    msg = str(e.value)
    assert "\n" not in msg and "no captions_train2014.json" in msg
    assert f"clipft download coco --out {root} --splits annotations" in msg
    assert (root / "train2014").is_symlink()  # the images are linked: no work lost


class UnauthenticatedError(Exception):
    """Named like kagglehub.exceptions.UnauthenticatedError (kagglehub itself is optional)."""


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Client Error", response=response)


def failing(exc: Exception):
    def fetch(handle: str) -> str:
        raise exc
    return fetch


@pytest.mark.parametrize("exc, kind, words", [
    (UnauthenticatedError("no credentials"), KaggleError, "~/.kaggle/kaggle.json"),
    (http_error(403), KaggleError, "KAGGLE_USERNAME and KAGGLE_KEY"),
    (http_error(404), RemoteFileError, "dataset not found"),
    (requests.ConnectionError("Max retries exceeded with url"), NetworkError, "cannot reach kaggle.com")])
def test_failures_are_one_line(tmp_path, exc, kind, words):
    with pytest.raises(kind) as e:
        download_kaggle("flickr8k", tmp_path / "data", fetch=failing(exc))
    assert words in str(e.value) and "\n" not in str(e.value) and "adityajn105/flickr8k" in str(e.value)


def test_unexpected_layout(tmp_path):
    src = tmp_path / "kagglehub"
    (src / "something_else").mkdir(parents=True)
    with pytest.raises(KaggleLayoutError, match="no Flickr caption file and image folder .found something_else/"):
        download_kaggle("flickr30k", tmp_path / "data", fetch=stand_in(src))
    with pytest.raises(KaggleLayoutError, match="expected coco2014/images/train2014/"):
        download_kaggle("coco", tmp_path / "coco", fetch=stand_in(src))


def test_cli_official_flickr_points_to_the_form(tmp_path, capsys):
    assert main(["download", "flickr30k", "--out", str(tmp_path / "f30k")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "https://forms.illinois.edu/sec/229675" in err[0] and "--source kaggle" in err[0]
