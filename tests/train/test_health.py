"""clipft.train.health: the four run-health warnings as pure functions, the monitor's once-per-epoch rule,
and each warning triggered inside a real (tiny) training run by a crafted situation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from clipft.train import loop as train_mod
from clipft.cli.commands import main
from clipft.train.health import (HealthMonitor, chance_warning, collapse_warning, logit_scale_warning,
                           overfitting_warning, pairwise_cosine)
from clipft.train.rundir import read_records


def test_pairwise_cosine():
    def mean_pairwise_cosine(x):
        return float(pairwise_cosine(x))

    assert mean_pairwise_cosine(torch.ones(5, 3)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0, abs=1e-7)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    e = F.normalize(x, dim=-1)
    sims = e @ e.T
    brute = (sims.sum() - sims.diag().sum()) / (7 * 6)
    assert mean_pairwise_cosine(x) == pytest.approx(float(brute), abs=1e-6)
    assert math.isnan(mean_pairwise_cosine(torch.ones(1, 3)))


def test_chance_warning():
    chance = math.log(128)
    assert chance_warning(chance * 0.99, chance, step=200, warmup_steps=200) is not None
    assert chance_warning(chance * 1.10, chance, step=200, warmup_steps=200) is not None  # worse than chance
    assert chance_warning(chance * 0.97, chance, step=200, warmup_steps=200) is None
    assert chance_warning(chance, chance, step=199, warmup_steps=200) is None  # still warming up
    assert "within 2% of chance" in chance_warning(chance, chance, step=5, warmup_steps=0)
    # Far above chance is diverging, not "within 2% of chance" (2.66 x ln 8 was once called that).
    above = chance_warning(5.524, math.log(8), step=500, warmup_steps=200)
    assert "above chance" in above and "diverging" in above and "within" not in above
    assert "above" not in chance_warning(chance, chance, step=5, warmup_steps=0)


def test_collapse_and_logit_scale_warnings():
    assert collapse_warning(0.96) is not None and collapse_warning(0.95) is None
    assert collapse_warning(float("nan")) is None
    assert logit_scale_warning(100.0, 100.0, learnable=True) is not None
    assert logit_scale_warning(99.95, 100.0, learnable=True) is not None
    assert logit_scale_warning(90.0, 100.0, learnable=True) is None
    assert logit_scale_warning(100.0, 100.0, learnable=False) is None  # fixed by choice, not pinned


def ep(epoch, loss, recall):
    return {"type": "epoch", "epoch": epoch, "train_loss": loss, "mean_R@5": recall}


def test_overfitting_warning():
    falling = [ep(1, 3.0, 40), ep(2, 2.5, 38), ep(3, 2.0, 35), ep(4, 1.5, 30)]
    msg = overfitting_warning(falling)
    assert msg and "40.0 -> 38.0 -> 35.0 -> 30.0" in msg and "epoch 1" in msg
    assert overfitting_warning(falling[1:]) is None  # only 2 falls
    assert overfitting_warning(falling, patience=4) is None
    rising_loss = [ep(1, 1.0, 40), ep(2, 1.5, 38), ep(3, 2.0, 35), ep(4, 2.5, 30)]
    assert overfitting_warning(rising_loss) is None  # both getting worse: not overfitting
    recovered = falling[:3] + [ep(4, 1.5, 36)]
    assert overfitting_warning(recovered) is None
    # epochs without evaluation are skipped
    sparse = [ep(1, 3.0, 40), {"epoch": 2, "train_loss": 2.8}, ep(3, 2.5, 38), ep(4, 2.0, 35), ep(5, 1.5, 30)]
    assert overfitting_warning(sparse) is not None


def test_monitor_raises_each_kind_once_per_epoch():
    mon = HealthMonitor(warmup_steps=2, max_logit_scale=100.0, learnable_temperature=True)
    chance = math.log(8)
    assert mon.step(1, 1, chance, chance, 0.99, 100.0) == [
        {"type": "warning", "kind": "logit_scale", "epoch": 1, "step": 1,
         "message": logit_scale_warning(100.0, 100.0, True)}]  # chance/collapse wait for warmup
    kinds = [w["kind"] for w in mon.step(1, 2, chance, chance, 0.99, 100.0)]
    assert kinds == ["chance", "collapse"]
    assert mon.step(1, 3, chance, chance, 0.99, 100.0) == []  # already raised this epoch
    assert [w["kind"] for w in mon.step(2, 4, chance, chance, 0.99, 100.0)] == ["chance", "collapse", "logit_scale"]
    assert mon.step(2, 5, 0.5, chance, 0.1, 10.0) == []
    falling = [ep(1, 3.0, 40), ep(2, 2.5, 38), ep(3, 2.0, 35), ep(4, 1.5, 30)]
    assert [w["kind"] for w in mon.epoch(4, 8, falling)] == ["overfitting"]
    assert mon.epoch(4, 8, falling) == []


# --------------------------------------------------------------------------- in a training run


@pytest.fixture(scope="module")
def crafted_run(coco_root, tiny_clip_dir, tmp_path_factory):
    """One tiny run built to be unhealthy in every way the monitor knows:
    - the image tower outputs one constant vector (collapse; the loss can then not beat chance),
    - a learnable temperature whose clamp (1/tau <= 10) is below its start (1/0.07): pinned,
    - validation recall forced to fall every epoch while the train loss is forced to fall: overfitting.
    """
    run = tmp_path_factory.mktemp("health") / "run"
    real_build, real_loss = train_mod.build_image_tower, train_mod.clip_loss

    def constant_tower(cfg, embed_dim):
        tower = real_build(cfg, embed_dim)
        # 0 * features keeps the graph (and the optimizer) alive; the output never changes.
        tower.encode = lambda images: F.normalize(tower.head(tower.backbone(images)) * 0 + 1.0, dim=-1)
        return tower

    calls = itertools.count()

    def shrinking_loss(img, txt, scale, **kw):  # the train loss falls step after step, by construction
        factor = 1.0 / (1 + next(calls))
        return {k: v * factor for k, v in real_loss(img, txt, scale, **kw).items()}

    recalls = iter([40.0, 30.0, 20.0, 10.0])
    args = ["--set", f"text.encoder={tiny_clip_dir}", "--set", "train.epochs=4", "--set", "train.batch_size=8",
            "--set", "train.max_steps_per_epoch=1", "--set", "train.warmup_steps=1", "--set", "train.log_every=1",
            "--set", "model.backbone=resnet18", "--set", "model.image_weights=none", "--set", "model.head_hidden=16",
            "--set", "model.learnable_temperature=true", "--set", "model.max_logit_scale=10",
            "--set", "data.image_size=32", "--set", "data.num_workers=0", "--set", "data.val_images=8",
            "--set", "train.device=cpu", "--quiet"]
    with train_mod.use_hooks(build_tower=constant_tower, loss=shrinking_loss, metric=lambda val, k: next(recalls)):
        assert main(["train", "--data", str(coco_root), "--out", str(run), *args]) == 0
    return run


def warnings_of(run, kind):
    return [w for w in read_records(run / "metrics.jsonl", "warning") if w["kind"] == kind]


def test_constant_tower_collapse_warning(crafted_run):
    w = warnings_of(crafted_run, "collapse")
    assert w and w[0]["epoch"] == 1 and "mean pairwise cosine" in w[0]["message"] and "1.000" in w[0]["message"]
    steps = read_records(crafted_run / "metrics.jsonl", "step")
    assert all(s["embed_cos"] == pytest.approx(1.0, abs=1e-5) for s in steps)


def test_loss_at_chance_warning(crafted_run):
    w = warnings_of(crafted_run, "chance")
    # step 1 (the end of warmup) has the unscaled loss of a constant tower: >= ln(8)
    assert w and w[0]["step"] == 1 and "not learning" in w[0]["message"]
    assert len(w) == 1  # later the (forced) falling loss is far below chance


def test_pinned_logit_scale_warning(crafted_run):
    w = warnings_of(crafted_run, "logit_scale")
    assert [x["epoch"] for x in w] == [1, 2, 3, 4]  # once per epoch, every epoch
    steps = read_records(crafted_run / "metrics.jsonl", "step")
    assert steps[-1]["logit_scale"] == pytest.approx(10.0, rel=1e-3)


def test_overfitting_warning_in_run_and_report(crafted_run):
    w = warnings_of(crafted_run, "overfitting")
    assert len(w) == 1 and w[0]["epoch"] == 4 and "40.0 -> 30.0 -> 20.0 -> 10.0" in w[0]["message"]
    assert main(["report", str(crafted_run)]) == 0
    report = (crafted_run / "report.md").read_text()
    section = report.split("## Health warnings", 1)[1]
    for kind in ("chance", "collapse", "logit_scale", "overfitting"):
        assert f"**{kind}**" in section
    import json
    assert set(json.loads((crafted_run / "summary.json").read_text())["health_warnings"]) == \
        {"chance", "collapse", "logit_scale", "overfitting"}
