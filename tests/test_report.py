"""The report is built from the run's files only; `clipft demo` produces the full report; zero-shot
accuracy after a short demo-style training is well above chance."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from clipft.cli import main
from clipft.report import (log_observations, loss_explanation, loss_spikes, retrieval_section, write_report,
                           zero_shot_section)


def test_loss_spikes_and_overfitting_are_found_in_the_logs():
    steps = [{"step": i, "loss": v, "grad_norm": 1.0} for i, v in
             enumerate([4.0, 3.8, 3.6, 3.5, 3.4, 6.0, 3.2, 3.1, float("nan")])]
    spikes = loss_spikes(steps)
    assert [s["step"] for s in spikes] == [5, 8]
    assert spikes[0]["median"] == pytest.approx(3.6)
    epochs = [{"epoch": e, "train_loss": t, "val_loss": v, "mean_R@5": r}
              for e, t, v, r in [(1, 3.0, 3.2, 10.0), (2, 2.0, 2.5, 30.0), (3, 1.0, 2.9, 25.0)]]
    notes = " ".join(log_observations(steps, epochs, log_every=10))
    assert "2 loss spike(s) among 9 logged steps, one record every 10 steps" in notes
    assert "Over-fitting sign: val loss rose +0.400 after epoch 2" in notes
    assert "-5.00 points from its best (epoch 2)" in notes
    calm = [{"epoch": e, "train_loss": 3.0 - e, "val_loss": 3.5 - e} for e in (1, 2)]
    assert "No over-fitting sign" in " ".join(log_observations([], calm))


def test_loss_explanation_uses_the_run_values():
    text = "\n".join(loss_explanation({"train": {"batch_size": 32}, "model": {"temperature": 0.05}}))
    for needle in ("Anchors", "Positive", "other 31 captions", "tau = 0.05", "1/tau = 20.0", "ln(32) = 3.47"):
        assert needle in text


def test_every_protocol_gets_its_own_table(tmp_path):
    def m(split, proto, r):
        return {"split": split, "protocol": proto, "num_images": 1, "num_captions": 5,
                "image_to_text": {"R@1": r, "R@5": r}, "text_to_image": {"R@1": r, "R@5": r}}
    (tmp_path / "metrics_karpathy-test.json").write_text(json.dumps(m("karpathy-test", "PROTO-K", 12.5)))
    both = m("val", "PROTO-V", 50.0)
    both["zero_shot"] = {"model": "openai/clip", **m("val", "", 40.0)}
    (tmp_path / "metrics_val.json").write_text(json.dumps(both))
    text = "\n".join(retrieval_section(tmp_path, {}))
    assert text.index("### `val`") < text.index("### `karpathy-test`")  # training protocol first
    assert "Protocol: PROTO-V." in text and "Protocol: PROTO-K." in text and "| 12.50 |" in text
    assert "zero-shot `openai/clip`" in text and "| 50.00 | 40.00 | +10.00 |" in text
    assert zero_shot_section(tmp_path) == []


DEMO_ARGS = ["--train-images", "64", "--val-images", "16", "--set", "train.epochs=6", "--set", "train.batch_size=16",
             "--set", "train.lr=2e-3", "--set", "train.warmup_steps=2", "--set", "data.image_size=24",
             "--set", "model.head_hidden=64", "--set", "train.log_every=2", "--quiet"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`clipft demo` at a small size (64 train / 16 val images, 6 epochs at 24 px; offline MiniLM text)."""
    pytest.importorskip("sentence_transformers")
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), *DEMO_ARGS]) == 0
    return out


def test_demo_writes_the_full_report(demo_run):
    report = (demo_run / "report.md").read_text()
    cfg = json.loads((demo_run / "config.json").read_text())
    metrics = json.loads((demo_run / "metrics_val.json").read_text())
    zs = json.loads((demo_run / "zeroshot_val.json").read_text())
    summary = json.loads((demo_run / "summary.json").read_text())
    # Hyperparameters, hardware and time, data sizes: the run's values.
    for needle in ("resnet18", "all-MiniLM-L6-v2", "lr 0.002", "6 x 16", "24 px", "AdamW", "temperature",
                   summary["hardware"]["cpu"], "training time", "64 train images", "16 val images"):
        assert needle in report, needle
    # The precision the run chose (train.amp=auto), and why.
    assert summary["precision"]["reason"].startswith("auto: ")
    assert f"| precision | {summary['precision']['dtype']}" in report and summary["precision"]["reason"] in report
    # Recall@K with its protocol, the zero-shot table, stability notes and the loss explanation.
    assert f"Protocol: {metrics['protocol']}." in report
    assert f"| image -> text | {metrics['image_to_text']['R@1']:.2f} |" in report
    assert f"| top-1 | {zs['top1']:.2f} | {zs['chance_top1']:.2f} |" in report
    for needle in ("## Training stability", "loss spike", "Best epoch", "gap", "## How it works", "Negatives",
                   "## Qualitative retrievals", "## Zero-shot classification", "Full resolved configuration"):
        assert needle in report, needle
    # Every picture the report links exists in the run directory, and all the pictures are linked.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert all((demo_run / link).is_file() for link in links)
    assert set(links) >= {"loss_curves.png", "data_samples.png", "retrieval_text_to_image.png",
                          "retrieval_image_to_text.png", "similarity_heatmap.png", "zeroshot_val_examples.png",
                          "zeroshot_val_confusion.png"}
    # Nothing hand-written or missing.
    for bad in ("TODO", "placeholder", "None", "nan", "XX"):
        assert bad not in report, bad
    # Rebuilt from the files alone (a copy elsewhere), the report is identical.
    copy = demo_run.parent / "copy"
    shutil.copytree(demo_run, copy, ignore=shutil.ignore_patterns("data", "*.pt"))
    assert (copy / "report.md").unlink() is None and write_report(copy).read_text().replace("copy", "run") == report


def test_zero_shot_after_demo_style_training_is_well_above_chance(demo_run, capsys):
    """The demo's own figure (val, 40 colour+shape classes) is in the README; here, robustly at test size:
    the colour of the largest object on the 64 training images (8 classes, chance 12.5%)."""
    out = demo_run / "zs_train"
    assert main(["zeroshot", "--checkpoint", str(demo_run / "best.pt"), "--data", str(demo_run / "data"),
                 "--split", "train", "--labels-from", "shapes:color", "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "zeroshot_train.json").read_text())
    assert r["num_images"] >= 30
    assert r["top1"] >= 2 * r["chance_top1"], r["top1"]
    print(capsys.readouterr().out)


def test_learned_temperature_reports_its_final_value():
    cfg = {"train": {"batch_size": 8}, "model": {"temperature": 0.07, "learnable_temperature": True,
                                                 "max_logit_scale": 100.0}}
    text = "\n".join(loss_explanation(cfg, final_logit_scale=25.0))
    assert "learned from this initial value" in text and "ended at 1/tau = 25.0, tau = 0.0400" in text
