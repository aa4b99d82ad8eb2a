"""demo.run_demo: the six steps at a tiny size, reporting on held-out validation images."""

import pytest

from clipft.cli.demo import run_demo


@pytest.mark.slow
def test_run_demo_tiny(tmp_path):
    pytest.importorskip("sentence_transformers")
    from clipft.train.commandlog import record_command
    lines = []
    argv = ["demo", "--out", str(tmp_path / "demo")]
    out = run_demo(tmp_path / "demo", train_images=24, val_images=6, progress=False, say=lines.append,
                   overrides=["train.epochs=1", "train.batch_size=8", "data.image_size=24", "model.head_hidden=32"],
                   before_report=lambda: record_command(tmp_path / "demo", argv, 0))
    assert lines[0].startswith("[1/7]") and any(l.startswith("[6/7] wrote") for l in lines)
    assert any(l.startswith("[7/7]") for l in lines)  # every step numbered, the search too
    report = out["report"].read_text()  # the command was recorded before the report was written
    assert "No `commands.txt`" not in report and "clipft demo --out" in report
    assert out["metrics"]["split"] == "val-heldout" and out["metrics"]["num_images"] == 6
    assert out["report"].is_file()
