"""clipft.cli.ablate: every preset builds, trains a few steps and changes what it claims; the runner
resumes a partial study without rerunning finished runs; the table and charts agree with the
per-run metrics files."""

from __future__ import annotations

import copy
import csv
import json
import statistics

import pytest
import torch
import yaml
from torch import nn

from clipft.cli import ablate
from clipft.train import loop as train_mod
from clipft.cli.ablate import ABLATION_NOTES, ABLATIONS, AblationError
from clipft.cli.commands import main
from clipft.config import Config, save_config, update_from_dict
from clipft.data import build_transform
from clipft.model import AttentionPool2d, build_image_tower
from clipft.train.rundir import read_records
from clipft.train.optim import build_optimizer, build_scheduler, cosine_with_warmup

TINY = {"model": {"backbone": "resnet18", "image_weights": "none", "head_hidden": 32},
        "data": {"image_size": 32, "num_workers": 0},
        "train": {"batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "epochs": 4, "device": "cpu"}}


# --------------------------------------------------------------------------- presets

def test_presets_are_data_with_notes_and_valid_keys():
    assert ABLATIONS["baseline"] == {} and set(ABLATION_NOTES) == set(ABLATIONS)
    for name, overrides in ABLATIONS.items():
        cfg = update_from_dict(Config(), copy.deepcopy(overrides), source=name)  # schema check
        if name != "baseline":
            assert cfg != Config(), f"{name} changes nothing"
    assert set(ablate.QUICK_CONFIGS) <= set(ABLATIONS) and ablate.QUICK_CONFIGS[0] == "baseline"


def _tiny_step_setup(name, **train):
    """What train() does for a config, on random tensors: tower, optimizer, schedule (2 steps an epoch)."""
    cfg = update_from_dict(update_from_dict(Config(), copy.deepcopy(TINY)), copy.deepcopy(ABLATIONS[name]))
    cfg = update_from_dict(cfg, {"train": train})
    torch.manual_seed(0)
    model = build_image_tower(cfg.model, embed_dim=16)
    opt = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_ratio,
                          split_backbone=cfg.train.freeze_backbone_epochs > 0)
    return cfg, model, opt, build_scheduler(opt, cfg, steps_per_epoch=2)


def _steps(cfg, model, opt, sched, epoch=1, n=2):
    """`n` steps of epoch `epoch` through the real `train_one_epoch` (its per-epoch freeze included)."""
    from types import SimpleNamespace
    from clipft import distributed
    from clipft.runtime import select_precision
    from clipft.train.health import HealthMonitor
    from clipft.train.loop import Loop, Runtime, TrainHooks, TrainState, train_one_epoch
    from clipft.train.rundir import RunLog
    from clipft.train.step import StepStats

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(epoch)
    loader = []
    for _ in range(n):  # (images, texts, index, n_skipped) batches, as collate_train gives them
        images = torch.randn(8, 3, 32, 32, generator=g)
        loader.append((images, nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1), None, 0))
    state = TrainState(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), ddp_model=model,
                       global_step=(epoch - 1) * n)
    rt = Runtime(distributed.DistContext(0, 1, 0, cpu, None, False), cpu, select_precision(cpu, "off", False))
    plan = SimpleNamespace(steps_per_epoch=n, accum=1, device_transform=None, data=None)
    never = SimpleNamespace(due=lambda *a: False)
    loop = Loop(cfg, rt, plan, HealthMonitor(cfg.train.warmup_steps, 100.0, False), StepStats(cpu), never,
                TrainHooks(), progress=False)
    ep = train_one_epoch(state, loader, RunLog(SimpleNamespace(), enabled=False), epoch, loop)
    assert ep.steps == n and ep.skipped_steps == 0


def _changed(before, after, prefix):
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return {k: not torch.equal(before[k], after[k]) for k in keys}


def _train_transform(cfg):
    return [type(t).__name__ for t in build_transform(
        cfg.data.image_size, cfg.data.mean, cfg.data.std, train=True, augment=cfg.data.augment,
        flip=cfg.data.flip == "plain", color_jitter=cfg.data.color_jitter).transforms]


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_preset_builds_trains_and_changes_what_it_claims(name):
    cfg, model, opt, sched = _tiny_step_setup(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _steps(cfg, model, opt, sched)
    after = model.state_dict()
    head_kinds = [type(m).__name__ for m in model.head.net]
    changed_backbone = _changed(before, after, "backbone.")
    assert _changed(before, after, "head.net.0.weight")["head.net.0.weight"]  # the head always learns

    if name == "baseline":
        assert head_kinds == ["Linear", "GELU", "Linear"] and model.pool is None
        assert all(changed_backbone[k] for k in changed_backbone if k.endswith(("weight", "running_mean")))
        assert torch.equal(before["logit_scale"], after["logit_scale"])  # fixed temperature
        assert len(opt.param_groups) == 2
    elif name in ("batchnorm", "layernorm"):
        norm = "BatchNorm1d" if name == "batchnorm" else "LayerNorm"
        assert head_kinds == ["Linear", norm, "GELU", "Linear"]
        assert _changed(before, after, "head.net.1.")["head.net.1.weight"]
        if name == "batchnorm":
            assert _changed(before, after, "head.net.1.running_mean")["head.net.1.running_mean"]
    elif name == "dropout":
        drops = [m for m in model.head.net if isinstance(m, nn.Dropout)]
        assert len(drops) == 1 and drops[0].p == 0.2
        x = torch.randn(4, 3, 32, 32)
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))  # active while training only
    elif name == "deep_head":
        assert [m.out_features for m in model.head.net if isinstance(m, nn.Linear)] == [32, 16, 16]
    elif name == "residual_head":
        assert isinstance(model.head.shortcut, nn.Linear)
        assert _changed(before, after, "head.shortcut.weight")["head.shortcut.weight"]
    elif name == "attention_pool":
        assert isinstance(model.pool, AttentionPool2d)
        assert all(_changed(before, after, "pool.").values())
    elif name == "learnable_temp":
        assert model.logit_scale.requires_grad and not torch.equal(before["logit_scale"], after["logit_scale"])
    elif name == "crop_flip":
        assert _train_transform(cfg) == ["RandomResizedCrop", "ToTensor", "Normalize"]  # flip done by the dataset
        assert cfg.data.flip == "swap"  # caption-aware (tests/data/test_data.py, tests/train/test_loop.py)
    elif name == "crop_noflip":
        assert _train_transform(cfg) == ["RandomResizedCrop", "ToTensor", "Normalize"] and cfg.data.flip == "off"
    elif name == "color_jitter":
        assert _train_transform(cfg) == ["CenterSquareResize", "ColorJitter", "ToTensor", "Normalize"]
    elif name == "no_warmup":
        assert cosine_with_warmup(0, 8, cfg.train.warmup_steps) == 1.0  # full lr from the first step
        assert cosine_with_warmup(0, 8, Config().train.warmup_steps) < 1.0
    elif name == "backbone_lr":
        lrs = {g["name"]: g["initial_lr"] for g in opt.param_groups}
        assert lrs["backbone/decay"] == pytest.approx(0.1 * lrs["head/decay"])
    elif name == "freeze_backbone":
        assert not any(changed_backbone.values())  # weights AND BatchNorm statistics: bit-identical
        assert not any(p.requires_grad for p in model.backbone.parameters())
        mid = {k: v.clone() for k, v in model.state_dict().items()}
        _steps(cfg, model, opt, sched, epoch=3)  # after the frozen epochs: the backbone trains
        assert _changed(mid, model.state_dict(), "backbone.conv1.weight")["backbone.conv1.weight"]
        assert [g["name"] for g in opt.param_groups][:2] == ["head/decay", "head/no_decay"]
    elif name == "last_stages":
        for k, moved in changed_backbone.items():
            if k.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2")):
                assert not moved, k
            elif k.startswith(("backbone.layer3", "backbone.layer4")) and k.endswith(("weight", "running_mean")):
                assert moved, k
    elif name == "frozen_bn":
        for k, moved in changed_backbone.items():
            if "running_" in k or "num_batches" in k:
                assert not moved, k
        assert changed_backbone["backbone.conv1.weight"]
    elif name in ("caption_bank", "image_queue", "siglip", "ema", "clustered_batches"):
        # The recipe levers act in the trainer (tests/train/test_recipe.py checks each); here: the claim is in the config.
        from clipft.train.loop import build_recipe
        t = cfg.train
        assert {"caption_bank": t.text_negatives == "1024", "image_queue": t.image_queue == 1024,
                "siglip": t.loss == "siglip" and cfg.model.learnable_temperature, "ema": t.ema == 0.999,
                "clustered_batches": cfg.data.batch_sampler == "clustered"}[name]
        if name == "ema" or name == "clustered_batches":
            assert build_recipe(cfg, None, None, None) is None  # the loss stays clip_loss
    else:  # pragma: no cover - a new preset needs its claim checked here
        pytest.fail(f"no claim check for preset {name!r}")


# --------------------------------------------------------------------------- planning

def test_plan_validates_values_before_anything_runs(tmp_path):
    base = update_from_dict(Config(), copy.deepcopy(TINY))
    with pytest.raises(AblationError, match="configuration bad: model.head_norm"):
        ablate.plan_study(base, {"baseline": {}, "bad": {"model": {"head_norm": "groupnorm"}}}, [0], tmp_path)
    with pytest.raises(AblationError, match="data.flip"):
        ablate.plan_study(base, {"bad": {"data": {"flip": "mirror"}}}, [0], tmp_path)
    with pytest.raises(AblationError, match="repeated seed"):
        ablate.plan_study(base, {"baseline": {}}, [1, 1], tmp_path)
    runs = ablate.plan_study(base, {"baseline": {}, "dropout": ABLATIONS["dropout"]}, [0, 3], tmp_path)
    assert [(r.config, r.seed, r.cfg.train.seed) for r in runs] == [
        ("baseline", 0, 0), ("baseline", 3, 3), ("dropout", 0, 0), ("dropout", 3, 3)]
    assert runs[3].dir == tmp_path / "runs" / "dropout" / "seed_3" and runs[3].cfg.model.head_dropout == 0.2
    assert runs[0].cfg.model.head_dropout == 0.0


def test_a_study_with_a_weights_file_is_resumed_not_refused(tmp_path):
    """The trainer records the weights file's sha256 in the run's config.json; planning the same study
    again must record it too, or every rerun (a resume, the next --seeds pass) is refused as
    'another config'. A file that changed since is still refused."""
    weights = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(2)}, weights)
    base = update_from_dict(Config(), copy.deepcopy(TINY))
    base.model.image_weights = str(weights)
    (run,) = ablate.plan_study(base, {"baseline": {}}, [0], tmp_path / "study")
    trained = copy.deepcopy(run.cfg)
    from clipft.model import fill_weights_sha256
    fill_weights_sha256(trained.model)  # what the trainer writes into config.json
    run.dir.mkdir(parents=True)
    save_config(trained, run.dir / "config.json")
    (again,) = ablate.plan_study(base, {"baseline": {}}, [0], tmp_path / "study")
    assert ablate.run_status(again) == "partial"
    torch.save({"conv1.weight": torch.ones(2)}, weights)  # another file at the same path
    (changed,) = ablate.plan_study(base, {"baseline": {}}, [0], tmp_path / "study")
    with pytest.raises(AblationError, match="image_weights_sha256"):
        ablate.run_status(changed)


def test_list_and_cli_errors(capsys, tmp_path):
    assert main(["ablate", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ABLATIONS) and "model.head_norm=batchnorm" in out
    assert main(["ablate", "--out", str(tmp_path / "s"), "--configs", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipft: error:") and "'nope'" in err[0]
    assert main(["ablate", "--configs", "baseline"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["ablate", "--out", str(tmp_path / "s"), "--base-config", "nosuch"]) == 2
    assert "--base-config" in capsys.readouterr().err


# --------------------------------------------------------------------------- a real (tiny) study

@pytest.fixture
def tiny_study(tmp_path, tiny_clip_dir):
    base = tmp_path / "base.yaml"
    tiny = copy.deepcopy(TINY)
    tiny["train"].update(epochs=2, max_steps_per_epoch=1, log_every=1, lr=1e-3)
    tiny["text"] = {"encoder": str(tiny_clip_dir)}
    base.write_text(yaml.safe_dump(tiny))
    mine = tmp_path / "mine.yaml"
    mine.write_text("wide:\n  model: {head_hidden: 64}\n")
    return base, mine


def test_study_resumes_without_rerunning_and_outputs_agree(coco_root, tiny_study, tmp_path, capsys):
    base, mine = tiny_study
    out = tmp_path / "study"
    argv = ["ablate", "--data", str(coco_root), "--out", str(out), "--base-config", str(base),
            "--configs", "wide", "--configs-file", str(mine), "--seeds", "0", "1", "--quiet"]
    real_loader = train_mod.make_train_loader

    # 1. Interrupted in the third run (wide, seed 0) at the start of its epoch 2.
    def crash(ds, cfg, epoch, device):
        if cfg.model.head_hidden == 64 and cfg.train.seed == 0 and epoch == 2:
            raise KeyboardInterrupt
        return real_loader(ds, cfg, epoch, device)
    with train_mod.use_hooks(make_loader=crash):
        assert main(argv) == 130
    runs = out / "runs"
    assert (runs / "baseline" / "seed_1" / "summary.json").is_file()
    assert not (runs / "wide" / "seed_0" / "summary.json").exists()
    assert torch.load(runs / "wide" / "seed_0" / "last.pt", weights_only=False)["epoch"] == 1
    assert not (runs / "wide" / "seed_1").exists()

    # 2. Rerun: only the unfinished runs train; the partial one continues from its epoch 1.
    calls, epochs_asked = [], []

    def counting_train(cfg, out_dir):
        calls.append((cfg.model.head_hidden, cfg.train.seed))

    def loader(ds, cfg, epoch, device):
        epochs_asked.append((cfg.train.seed, epoch))
        return real_loader(ds, cfg, epoch, device)
    with train_mod.use_hooks(started=counting_train, make_loader=loader):
        assert main(argv) == 0
    assert calls == [(64, 0), (64, 1)]
    assert epochs_asked == [(0, 2), (1, 1), (1, 2)]
    assert [r["epoch"] for r in read_records(runs / "wide" / "seed_0" / "metrics.jsonl", "epoch")] == [1, 2]

    # 3. Rerun again: nothing trains, the outputs are rewritten from the run files.
    calls.clear()
    for name in ("ablation.md", "ablation.csv", "ablation_recall.png", "ablation_curves.png", "ablation.json"):
        (out / name).unlink()
    with train_mod.use_hooks(started=counting_train):
        assert main(argv) == 0
    assert calls == []
    printed = capsys.readouterr().out
    assert "| `wide` |" in printed and "4/4 runs ok" in printed

    # The table agrees with the per-run metrics files.
    per_run = {}
    for cfg_name in ("baseline", "wide"):
        for seed in (0, 1):
            last = read_records(runs / cfg_name / f"seed_{seed}" / "metrics.jsonl", "epoch")[-1]["val"]
            vals = {f"{d}_{k}": v for d in ("image_to_text", "text_to_image") for k, v in last[d].items()}
            vals["mean_recall"] = sum(vals.values()) / 6
            per_run[cfg_name, seed] = vals
    rows = {r["config"]: r for r in csv.DictReader(open(out / "ablation.csv"))}
    assert list(rows) == ["baseline", "wide"]
    for cfg_name, row in rows.items():
        assert row["seeds"] == "0 1" and row["runs_ok"] == "2" and row["status"] == "ok"
        for m in per_run["baseline", 0]:
            vals = [per_run[cfg_name, s][m] for s in (0, 1)]
            assert float(row[m]) == pytest.approx(statistics.mean(vals), abs=1e-4)
            assert float(row[f"{m}_std"]) == pytest.approx(statistics.stdev(vals), abs=1e-4)
            diffs = [per_run[cfg_name, s][m] - per_run["baseline", s][m] for s in (0, 1)]
            assert float(row[f"delta_{m}"]) == pytest.approx(statistics.mean(diffs), abs=1e-4)
        summary = json.loads((runs / cfg_name / "seed_0" / "summary.json").read_text())
        assert int(row["trainable_params"]) == summary["parameters"]["trainable"]
        assert float(row["train_seconds"]) > 0
    assert int(rows["wide"]["trainable_params"]) > int(rows["baseline"]["trainable_params"])
    md = (out / "ablation.md").read_text()
    wide = rows["wide"]
    assert f"{float(wide['mean_recall']):.2f} ± {float(wide['mean_recall_std']):.2f}" in md
    assert f"{float(wide['delta_mean_recall']):+.2f} ± {float(wide['delta_mean_recall_std']):.2f}" in md
    assert "ablation_recall.png" in md and "ablation_curves.png" in md and "model.head_hidden=64" in md

    # The charts are drawn from the same numbers.
    study = json.loads((out / "ablation.json").read_text())
    bars = ablate.recall_delta_bars(study)
    assert bars["configs"] == ["wide"] and len(bars["metrics"]) == 6
    for j, m in enumerate(bars["metrics"]):
        assert bars["values"][j][0] == pytest.approx(float(wide[f"delta_{m}"]), abs=1e-4)
    curves = ablate.recall_curves(study)
    for cfg_name in ("baseline", "wide"):
        last = curves[cfg_name]["image_to_text"][-1]
        assert last["epoch"] == 2
        assert last["mean"] == pytest.approx(statistics.mean(per_run[cfg_name, s]["image_to_text_R@5"] for s in (0, 1)))
    for png in ("ablation_recall.png", "ablation_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 4. A changed budget does not mix with finished runs: refused, naming the directory and key.
    assert main([*argv, "--set", "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: 2 -> 3" in err and str(runs / "baseline" / "seed_0") in err


def test_diverged_run_is_recorded_and_the_study_goes_on(coco_root, tiny_study, tmp_path):
    base, _ = tiny_study
    out = tmp_path / "study"
    real_train = train_mod.train

    def diverge_batchnorm(cfg, data_root, out_dir, **kw):
        if cfg.model.head_norm == "batchnorm":
            raise train_mod.TrainingError("training diverged: test")
        return real_train(cfg, data_root, out_dir, **kw)
    base_cfg = yaml.safe_load(base.read_text())
    base_cfg["train"]["epochs"] = 1
    base.write_text(yaml.safe_dump(base_cfg))
    study = ablate.run_study(out, data_root=coco_root, names=["batchnorm"], base_config=str(base),
                             train_fn=diverge_batchnorm)
    assert [r["status"] for r in study["runs"]] == ["ok", "diverged"]
    assert "diverged" in (out / "runs" / "batchnorm" / "seed_0" / ablate.FAILED_MARK).read_text()
    md = (out / "ablation.md").read_text()
    assert "Failed runs" in md and "`batchnorm` (seed 0 diverged)" in md
    row = next(r for r in study["rows"] if r["config"] == "batchnorm")
    assert row["mean_recall"] is None and row["runs_ok"] == 0  # never ranked
    again = ablate.run_study(out, data_root=coco_root, names=["batchnorm"], base_config=str(base),
                             train_fn=lambda *a, **k: pytest.fail("nothing should rerun"))
    assert [r["status"] for r in again["runs"]] == ["ok", "diverged"]


def test_an_unfrozen_backbone_warms_up_again():
    """AdamW's first update of a parameter is ~lr x sign(gradient) (empty moments): a backbone that
    joins after train.freeze_backbone_epochs at the full rate would move every pretrained weight by
    lr at once. Its groups warm up again over train.warmup_steps steps from the unfreeze step."""
    warm = 10
    cfg, model, opt, sched = _tiny_step_setup("freeze_backbone", warmup_steps=warm, epochs=6)
    for epoch in (1, 2):  # frozen: 2 steps each
        _steps(cfg, model, opt, sched, epoch=epoch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}  # the rates of the next step (step 4)
    assert lrs["backbone/decay"] == pytest.approx(lrs["head/decay"] / warm)
    _steps(cfg, model, opt, sched, epoch=3, n=1)  # the first step with the backbone trainable
    moved = torch.cat([(p.detach() - before[n]).abs().flatten() for n, p in model.named_parameters()
                       if n.startswith("backbone.") and p.ndim >= 2])
    # Adam's first step is at most the rate per weight (|m|/sqrt(v) = 1 where the gradient is well above
    # eps): here at most ~lr/10, where the full rate moved weights by lr.
    assert 0.05 * lrs["head/decay"] < float(moved.max()) < 0.2 * lrs["head/decay"]
    # The head's rate is the run's schedule; the backbone's reaches it `warm` steps after unfreezing.
    from clipft.train.optim import unfreeze_warmup
    assert [unfreeze_warmup(s, 4, warm) for s in (0, 3, 4, 8, 13, 14)] == [1.0, 1.0, 0.1, 0.5, 1.0, 1.0]
    assert unfreeze_warmup(4, 4, 0) == 1.0  # train.warmup_steps=0: no warm-up at all
