"""demo.run_demo: the six steps at a tiny size, reporting on held-out validation images."""

import pytest

from clipft.cli.demo import run_demo


@pytest.mark.slow
def test_run_demo_tiny(tmp_path):
    pytest.importorskip("sentence_transformers")
    lines = []
    out = run_demo(tmp_path / "demo", train_images=24, val_images=6, progress=False, say=lines.append,
                   overrides=["train.epochs=1", "train.batch_size=8", "data.image_size=24", "model.head_hidden=32"])
    assert lines[0].startswith("[1/6]") and any(l.startswith("[6/6] wrote") for l in lines)
    assert out["metrics"]["split"] == "val-heldout" and out["metrics"]["num_images"] == 6
    assert out["report"].is_file()
