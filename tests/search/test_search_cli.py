"""`clipft index`, `clipft search` and `clipft serve` end to end, with a real checkpoint (the trained_run
fixture) and a tiny original CLIP: incremental reruns, the model-change refusal, JSON output, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clipft.cli.commands import main


@pytest.fixture
def folder(coco_root, tmp_path):
    """The 12 val images of the shared synthetic COCO folder, copied so each test indexes its own."""
    return Path(shutil.copytree(coco_root / "val2014", tmp_path / "photos"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from clipft.eval.clip_baseline import save_tiny_clip_model
    return save_tiny_clip_model(tmp_path_factory.mktemp("clip") / "clip", image_size=32)


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_index_then_search_by_text_image_and_duplicates(folder, trained_run, capsys):
    ckpt = trained_run / "best.pt"
    rc, out, _ = _run(capsys, "index", folder, "--model", ckpt, "--quiet")
    assert rc == 0 and "12 images (12 new, 0 changed, 0 removed, 0 unchanged, 0 unreadable); embedded 12" in out
    rc, out, _ = _run(capsys, "index", folder, "--model", ckpt, "--quiet")
    assert rc == 0 and "12 images (0 new, 0 changed, 0 removed, 12 unchanged" in out and "embedded 0" in out
    index = folder / ".clipft-index"
    rc, out, _ = _run(capsys, "search", "a red circle", "--index", index, "--k", 5, "--json")
    body = json.loads(out)
    assert rc == 0 and set(body) == {"results", "model", "took_ms"} and len(body["results"]) == 5
    assert all(set(h) == {"id", "path", "relative_path", "score"} for h in body["results"])
    assert all(h["path"] == str(folder.resolve() / h["relative_path"]) for h in body["results"])  # absolute
    some = sorted(folder.glob("*.jpg"))[3]
    rc, out, _ = _run(capsys, "search", "--image", some, "--index", index, "--k", 3)
    first = out.splitlines()[0].split()
    assert rc == 0 and first[1] == str(some.resolve()) and float(first[0]) > 0.999  # a photo is closest to itself
    shutil.copy(some, folder / "copy.jpg")
    _run(capsys, "index", folder, "--model", ckpt, "--quiet")
    rc, out, _ = _run(capsys, "search", "--duplicates", "--threshold", "0.999", "--index", index, "--json")
    groups = [{f["relative_path"] for f in g} for g in json.loads(out)["groups"]]
    assert rc == 0 and any({"copy.jpg", some.name} <= g for g in groups)  # (a 2-epoch model finds more)


def test_another_model_is_refused_without_rebuild_and_keeps_its_own_index(folder, trained_run, tiny_clip, capsys):
    assert _run(capsys, "index", folder, "--model", trained_run / "best.pt", "--quiet")[0] == 0
    rc, out, err = _run(capsys, "index", folder, "--model", tiny_clip, "--quiet")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("clipft: error: ") and "--rebuild" in err
    rc, out, _ = _run(capsys, "index", folder, "--model", tiny_clip, "--index", folder / ".clipft-index-clip", "--quiet")
    assert rc == 0 and "12 new" in out
    rc, out, _ = _run(capsys, "index", folder, "--model", tiny_clip, "--rebuild", "--quiet")
    assert rc == 0 and "embedded 12" in out
    rc, out, _ = _run(capsys, "search", "a red circle", "--index", folder / ".clipft-index", "--json")
    assert json.loads(out)["model"] == json.loads(
        _run(capsys, "search", "x", "--index", folder / ".clipft-index-clip", "--json")[1])["model"]


def test_search_errors_are_one_line(folder, tmp_path, trained_run, capsys):
    rc, _, err = _run(capsys, "search", "a dog", "--index", tmp_path / "none")
    assert rc == 2 and "no clipft index" in err and err.count("\n") == 1
    assert _run(capsys, "search", "a dog", "--duplicates", "--index", tmp_path)[0] == 2
    _run(capsys, "index", folder, "--model", trained_run / "best.pt", "--quiet")
    (tmp_path / "bad.png").write_bytes(b"nope")
    rc, _, err = _run(capsys, "search", "--image", tmp_path / "bad.png", "--index", folder / ".clipft-index")
    assert rc == 2 and "bad.png: not a readable image" in err
    from PIL import Image
    Image.new("1", (16_000, 16_000)).save(tmp_path / "bomb.png")  # 256 Mpx: over PIL's bomb limit
    rc, out, err = _run(capsys, "search", "--image", tmp_path / "bomb.png", "--index", folder / ".clipft-index")
    assert rc == 2 and err.count("\n") == 1 and "bomb.png" in err and "unexpected" not in err
    for bad in ("nan", "inf", "-inf", "1.5"):
        rc, out, err = _run(capsys, "search", "--duplicates", f"--threshold={bad}", "--index", folder / ".clipft-index")
        assert rc == 2 and err.count("\n") == 1 and "threshold" in err and "no near-duplicates" not in out, bad
    rc, _, err = _run(capsys, "index", tmp_path / "missing", "--model", trained_run / "best.pt")
    assert rc == 2 and "not a folder" in err


def test_serve_warns_when_bound_beyond_loopback(folder, trained_run, capsys):
    """Binds all interfaces for a moment to read the warning; no request is sent anywhere."""
    _run(capsys, "index", folder, "--model", trained_run / "best.pt", "--quiet")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "clipft", "serve", "--index", str(folder / ".clipft-index"),
                             "--host", "0.0.0.0", "--port", "0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        warning = proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait()
    assert warning.startswith("clipft: warning: serving on 0.0.0.0") and "127.0.0.1" in warning
