"""TensorBoard mirror (clipft.train.tensorboard): what metrics.jsonl records, read back from the event file."""

from __future__ import annotations

import json

import pytest

from clipft.cli.commands import main
from clipft.train.tensorboard import TensorBoardMirror, read_scalars

pytest.importorskip("tensorboard")


def test_records_become_scalars_with_their_step(tmp_path):
    tb = TensorBoardMirror(tmp_path)
    tb.write({"type": "step", "epoch": 1, "step": 3, "loss": 2.5, "lr": 1e-3, "skipped_steps": 0})
    tb.write({"type": "epoch", "epoch": 1, "step": 4, "train_loss": 2.0, "val_loss": None,
              "val": {"image_to_text": {"R@1": 25.0}}})
    tb.write({"type": "warning", "kind": "chance", "epoch": 1, "step": 4, "message": "still at chance"})
    tb.close()
    s = read_scalars(tmp_path)
    assert s["step/loss"] == [(3, 2.5)] and s["step/lr"] == [(3, pytest.approx(1e-3))]
    assert s["epoch/train_loss"] == [(4, 2.0)] and s["epoch/val/image_to_text/R@1"] == [(4, 25.0)]
    assert "epoch/val_loss" not in s and "step/epoch" not in s and "step/step" not in s


def test_training_with_tensorboard_mirrors_metrics_jsonl(coco_root, tiny_clip_dir, trained_run, tmp_path):
    run = tmp_path / "run"
    args = ["--set", f"text.encoder={tiny_clip_dir}", "--set", "train.epochs=1", "--set", "train.batch_size=8",
            "--set", "train.max_steps_per_epoch=2", "--set", "model.backbone=resnet18", "--set",
            "model.image_weights=none", "--set", "model.head_hidden=32", "--set", "data.image_size=32", "--set",
            "data.num_workers=0", "--set", "train.device=cpu", "--set", "train.log_every=1", "--set",
            "train.tensorboard=true", "--quiet"]
    assert main(["train", "--data", str(coco_root), "--out", str(run), *args]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    s = read_scalars(run)
    steps = [r for r in records if r["type"] == "step"]
    assert steps and s["step/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    epoch = [r for r in records if r["type"] == "epoch"][-1]
    assert s["epoch/train_loss"] == [(epoch["step"], pytest.approx(epoch["train_loss"], rel=1e-6))]
    r5 = epoch["val"]["text_to_image"]["R@5"]
    assert s["epoch/val/text_to_image/R@5"] == [(epoch["step"], pytest.approx(r5, rel=1e-6))]
    assert not (trained_run / "tensorboard").exists()  # off by default
