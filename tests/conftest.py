"""Shared fixtures. Everything is offline: huggingface_hub reads HF_HUB_OFFLINE once, at import, so it
is set here, before any test module imports transformers or sentence-transformers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread count for the whole suite (clipft would otherwise size it to the other work on the machine,
# command by command), so that runs a test compares bit for bit use the same kernels' work split.
os.environ.setdefault("CLIPFT_THREADS", str(max(1, len(os.sched_getaffinity(0)))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised tiny CLIP text tower (hidden 32, 2 layers, projection 16) with OpenAI's
    real BPE tokenizer, saved with save_pretrained: `load_text_encoder(str(tiny_clip_dir))` works offline."""
    from clipft.text import save_random_clip_text_model
    return save_random_clip_text_model(tmp_path_factory.mktemp("text") / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory):
    """A tiny synthetic COCO 2014 folder (24 train / 12 val shapes images, 5 captions each) shared by
    the end-to-end tests; its text caches are built under coco_root/cache by the first run."""
    from clipft.data.shapes import make_shapes_dataset
    return make_shapes_dataset(tmp_path_factory.mktemp("coco"), n_train=24, n_val=12, seed=0, image_size=48)


@pytest.fixture(scope="session")
def trained_run(coco_root, tiny_clip_dir, tmp_path_factory):
    """A 2-epoch run on coco_root (resnet18 from scratch at 32 px, head 32, tiny CLIP text tower): the
    run directory, with best.pt. Evaluation tests write their outputs beside best.pt; a test that needs
    a pristine run directory copies it."""
    from clipft.cli.commands import main
    run = tmp_path_factory.mktemp("trained") / "run"
    args = ["--set", f"text.encoder={tiny_clip_dir}", "--set", "train.epochs=2", "--set", "train.batch_size=8",
            "--set", "train.lr=1e-3", "--set", "train.warmup_steps=2", "--set", "model.backbone=resnet18",
            "--set", "model.image_weights=none", "--set", "model.head_hidden=32", "--set", "data.image_size=32",
            "--set", "data.num_workers=0", "--set", "train.device=cpu", "--set", "train.log_every=1", "--quiet"]
    assert main(["train", "--data", str(coco_root), "--out", str(run), *args]) == 0
    return run


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 2 MB tmpfs: a disk that is full on demand. Skipped where mounting is not permitted."""
    import shutil
    import subprocess
    where = tmp_path / "small-disk"
    where.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command: cannot make a small disk")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here ({r.stderr.strip() or 'not permitted'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture()
def make_read_only():
    """make_read_only(dir): `dir` becomes read-only for this process: a read-only bind mount as root
    (root may write anywhere else), chmod a-w otherwise. Skipped where neither works; undone after."""
    import os
    import subprocess
    undo = []

    def make(path):
        path = str(path)
        if os.geteuid() == 0:
            r = subprocess.run(["mount", "--bind", path, path], capture_output=True, text=True)
            if r.returncode == 0:
                undo.append(["umount", "-l", path])
                r = subprocess.run(["mount", "-o", "remount,ro,bind", path], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot make a read-only folder as root here ({r.stderr.strip() or 'mount failed'})")
        else:
            mode = os.stat(path).st_mode
            os.chmod(path, mode & ~0o222)
            undo.append(lambda: os.chmod(path, mode))
        if os.access(path, os.W_OK):
            pytest.skip(f"{path} is still writable after making it read-only")
        return path

    yield make
    for step in reversed(undo):
        step() if callable(step) else subprocess.run(step, capture_output=True)
