"""clipft.data.caches: the one place that names cache files. The names on disk are part of the contract
(a rename would silently re-embed every user's captions), so each one is spelled out here."""

from __future__ import annotations

from pathlib import Path

from clipft.config import Config
from clipft.data.caches import (dataset_cache_dir, eval_text_cache_file, prepared_dir, prepared_split_dir,
                                swapped_text_cache_file, text_cache_file, text_cache_path)

ENC = "openai_clip-vit-base-patch32"


def test_coco_cache_names(coco_root):
    cfg, cache = Config(), coco_root / "cache"
    assert dataset_cache_dir(coco_root, cfg) == cache
    assert text_cache_file(coco_root, "train", cfg) == cache / f"train_text_embeds_{ENC}.safetensors"
    assert swapped_text_cache_file(coco_root, cfg) == cache / f"train-lrswap_text_embeds_{ENC}.safetensors"
    # Evaluation shares the training splits' files; other protocols get their own, per encoder.
    assert eval_text_cache_file(coco_root, "val", cfg) == text_cache_file(coco_root, "val", cfg)
    assert eval_text_cache_file(coco_root, "karpathy-test", cfg) == cache / f"karpathy-test_text_embeds_{ENC}.safetensors"
    assert eval_text_cache_file(coco_root, "val", cfg, encoder="my/clip") == cache / "val_text_embeds_my_clip.safetensors"
    assert prepared_split_dir(coco_root, "train", cfg) == cache / "images" / "train-224"
    assert prepared_split_dir(coco_root, "val", cfg, 96) == prepared_dir(cache, "val", 96) == cache / "images" / "val-96"


def test_subset_and_cache_dir_settings(coco_root, tmp_path):
    cfg = Config()
    cfg.data.train_images, cfg.data.subset_seed = 10, 4
    cfg.text.cache_dir = str(tmp_path / "elsewhere")
    assert swapped_text_cache_file(coco_root, cfg) == \
        tmp_path / "elsewhere" / f"train-subset10-seed4-lrswap_text_embeds_{ENC}.safetensors"
    assert prepared_split_dir(coco_root, "train", cfg) == tmp_path / "elsewhere" / "images" / "train-224"
    assert text_cache_path(Path("/c"), "x", "a b/c") == Path("/c/x_text_embeds_a_b_c.safetensors")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_read_only_dataset_caches_go_to_the_user_cache_dir(tmp_path, tiny_clip_dir, make_read_only, monkeypatch,
                                                           capsys, caplog):
    """A read-only dataset folder: cache-text, validate, prepare-images and train all work, with every
    cache (and the report) in $XDG_CACHE_HOME/clipft/<folder>-<hash>, said in the log; nothing is
    written into the dataset. (cache-text used to embed every caption, then die writing DATA/cache.)"""
    import logging

    from clipft.cli.commands import main
    from clipft.data import caches
    from clipft.data.shapes import make_shapes_dataset
    from train.test_loop import small_args
    root = make_shapes_dataset(tmp_path / "ro", n_train=8, n_val=4, seed=5, image_size=40)
    before = _files(root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    make_read_only(root)
    user = caches.user_cache_dir(root)
    assert user.parent == tmp_path / "xdg" / "clipft" and user.name.startswith("ro-")
    caplog.set_level(logging.INFO)

    assert main(["cache-text", "--data", str(root), "--text-encoder", str(tiny_clip_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"-> {user}/train_text_embeds_" in out and f"-> {user}/val_text_embeds_" in out
    assert f"{root / 'cache'} cannot be written (read-only dataset folder): caches go to {user}" in caplog.text
    assert main(["validate", "--data", str(root), "--no-tokens", "--quiet"]) == 0
    assert "wrote" not in capsys.readouterr().out  # the report is printed; nothing written without --out
    assert main(["prepare-images", "--data", str(root), "--split", "train", "--size", "32", "--workers", "1",
                 "--quiet"]) == 0
    assert (user / "images" / "train-32" / "index.json").is_file()
    caplog.clear()
    args = small_args(tiny_clip_dir, 1, ["--set", "data.prepared_size=32"])
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), *args]) == 0
    assert f"prepared cache {user / 'images' / 'train-32'}" in caplog.text
    assert "embedding" not in caplog.text  # the text caches were found where cache-text put them
    assert _files(root) == before


def test_read_only_cache_dir_is_refused_before_the_work(tmp_path, tiny_clip_dir, make_read_only, capsys):
    """An explicit text.cache_dir that cannot be written: one line, before any caption is embedded
    or any image decoded."""
    from clipft.cli.commands import main
    from clipft.data.shapes import make_shapes_dataset
    root = make_shapes_dataset(tmp_path / "d", n_train=4, n_val=2, seed=6, image_size=40)
    ro = tmp_path / "ro-cache"
    ro.mkdir()
    make_read_only(ro)
    # A failure after the work would name the cache file, not its folder with this advice.
    setting = ["--set", f"text.cache_dir={ro}"]
    assert main(["cache-text", "--data", str(root), "--text-encoder", str(tiny_clip_dir), "--device", "cpu",
                 *setting]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"clipft: error: {ro}: cannot write here (read-only or permission denied); set text.cache_dir " \
                  "to a writable folder"
    assert main(["prepare-images", "--data", str(root), "--split", "train", "--workers", "1", "--quiet", *setting]) == 2
    # prepare-images' default size is what training reads (data.prepared_size, 224), small images included.
    assert capsys.readouterr().err.strip() == f"clipft: error: {ro / 'images' / 'train-224'}: cannot write here " \
                                              "(read-only or permission denied); set text.cache_dir to a writable folder"


def test_caches_are_created_with_the_process_umask(tmp_path, tiny_clip_dir):
    """Text caches were 0600 whatever the umask: no one else on a shared cluster could read them."""
    import os

    from clipft.cli.commands import main
    from clipft.data.shapes import make_shapes_dataset
    root = make_shapes_dataset(tmp_path / "d", n_train=4, n_val=2, seed=7, image_size=40)
    old = os.umask(0o002)
    try:
        assert main(["cache-text", "--data", str(root), "--text-encoder", str(tiny_clip_dir), "--device", "cpu"]) == 0
        assert main(["prepare-images", "--data", str(root), "--size", "32", "--workers", "1", "--quiet"]) == 0
    finally:
        os.umask(old)
    made = [p for p in (root / "cache").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in made) and any(p.name == "images.u8" for p in made)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in made} == {p.name: "0o664" for p in made}


def test_a_read_only_shared_cache_is_read_where_it_is(tmp_path, tiny_clip_dir, make_read_only, monkeypatch, capsys):
    """Caches built by whoever owns a dataset, then shared read-only: used as they are, not rebuilt
    in every user's cache directory."""
    from clipft.cli.commands import main
    from clipft.data.shapes import make_shapes_dataset
    root = make_shapes_dataset(tmp_path / "shared", n_train=4, n_val=2, seed=10, image_size=40)
    args = ["cache-text", "--data", str(root), "--text-encoder", str(tiny_clip_dir), "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    make_read_only(root)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count(f"-> {root / 'cache'}/") == 2 and out.count("up to date (fingerprint matches)") == 2
    assert not (tmp_path / "xdg").exists()


def test_a_prepared_cache_of_another_size_says_why_it_is_unused(tmp_path):
    from clipft.data.caches import prepared_sizes, unused_prepared_note
    from clipft.data.shapes import make_shapes_dataset
    root = make_shapes_dataset(tmp_path / "d", n_train=2, n_val=2, image_size=32)
    cfg = Config()
    cfg.data.image_size = 64
    assert unused_prepared_note(root, "train", cfg) is None  # nothing prepared: nothing to explain
    for size in (32, 96):
        d = prepared_dir(root / "cache", "train", size)
        d.mkdir(parents=True)
        (d / "index.json").write_text("{}")
    assert prepared_sizes(root, "train", cfg) == [32, 96]
    note = unused_prepared_note(root, "train", cfg)
    assert "data.prepared_size is 224" in note and "--set data.prepared_size=96" in note
    cfg.data.image_size = 128
    assert "prepare-images --size 128" in unused_prepared_note(root, "train", cfg)
    cfg.data.prepared_size = 96
    assert unused_prepared_note(root, "train", cfg) is not None  # 32 px is still there, and too small


def test_read_only_dataset_without_root_privileges(tmp_path, tiny_clip_dir):
    """As an ordinary user meets it: a dataset folder owned by another user (uid 65534), readable by
    all, writable by its owner only, used by a process the kernel checks like any user's: uid 0 with
    the capabilities that bypass file permissions dropped (CAP_DAC_OVERRIDE, CAP_FOWNER; `setpriv`),
    since root itself may write anywhere. cache-text and validate put everything in
    $XDG_CACHE_HOME/clipft and write nothing into the dataset."""
    import os
    import shutil
    import subprocess
    import sys

    import pytest

    from clipft.data.shapes import make_shapes_dataset
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (as an ordinary user, the chmod-based test above covers it)")
    root = make_shapes_dataset(tmp_path / "data", n_train=8, n_val=4, seed=5, image_size=40)
    for p in [root, *root.rglob("*")]:
        os.chown(p, 65534, 65534)
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "HF_HUB_OFFLINE": "1"}
    drop = [setpriv, "--inh-caps=-dac_override,-fowner", "--bounding-set=-dac_override,-fowner"]
    probe = subprocess.run([*drop, "touch", str(root / "probe")], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("dropping CAP_DAC_OVERRIDE does not restrict writes here")
    before = _files(root)

    def run(*args):
        return subprocess.run([*drop, sys.executable, "-m", "clipft", *args], env=env, capture_output=True,
                              text=True, timeout=600)
    r = run("cache-text", "--data", str(root), "--text-encoder", str(tiny_clip_dir), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{root / 'cache'} cannot be written (read-only dataset folder): caches go to" in r.stderr
    assert str(tmp_path / "xdg" / "clipft") in r.stdout
    r = run("validate", "--data", str(root), "--no-tokens", "--quiet")
    assert r.returncode == 0 and "wrote" not in r.stdout, r.stderr[-2000:]
    assert _files(root) == before
