"""clipft.train.resume, driven through `clipft train`: a rerun into a run directory continues the same run
(allowed changes only), falls back from a damaged last.pt, drops a torn log line, and a refused
rerun changes nothing in the directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from clipft.train import loop as train_mod
from clipft.cli.commands import main
from clipft.train.resume import RESUMABLE_KEYS, config_differences
from clipft.config import Config
from clipft.train.rundir import read_records

from train.test_loop import small_args

KEPT = ("config.json", "metrics.jsonl", "epochs.csv", "last.pt", "last.prev.pt", "best.pt", "summary.json")
HINT = "use another --out, or --no-resume to start over"


@pytest.fixture()
def finished(trained_run, tmp_path):
    """A private copy of the shared 2-epoch run (batch 8, lr 1e-3, resnet18 at 32 px)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("commands.txt", "embeddings_*", "eval_*"))
    return run


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """A dataset of the same sizes and layout with other images and captions."""
    from clipft.data.shapes import make_shapes_dataset
    return make_shapes_dataset(tmp_path_factory.mktemp("other"), n_train=24, n_val=12, seed=1, image_size=48)


def snapshot(run):
    return {n: (run / n).read_bytes() for n in KEPT if (run / n).is_file()}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("clipft: error: "), err[-1500:]
    return lines[-1]


def test_the_allowed_list_and_differences():
    a = Config()
    b = Config()
    b.train.epochs, b.train.lr, b.data.num_workers = 30, 5e-4, 1
    diffs = config_differences(json.loads(json.dumps({"train": {"epochs": 15}})), b, RESUMABLE_KEYS)
    assert diffs == [f"train.lr: {a.train.lr!r} -> 0.0005"]
    assert {"train.epochs", "train.log_every", "data.num_workers", "train.device", "train.checkpoint_every"} \
        <= RESUMABLE_KEYS and "train.lr" not in RESUMABLE_KEYS and "model.backbone" not in RESUMABLE_KEYS


CASES = [
    ("other-data", (), "holds a run trained on other data"),
    ("batch", ("--set", "train.batch_size=4"), "train.batch_size: 8 -> 4"),
    ("backbone", ("--set", "model.backbone=resnet34"), "model.backbone: 'resnet18' -> 'resnet34'"),
    # refused by the config check itself, before the stored run is compared (so without the resume hint)
    ("rejected-value", ("--set", "model.backbone=resnet152"), "unknown backbone 'resnet152'"),
    ("preset", ("--config", "demo"), "holds a run with another config"),
    ("edited-config", (), "train.lr: 0.001 -> 0.01"),
]


@pytest.mark.parametrize("case, extra, expect", CASES, ids=[c[0] for c in CASES])
def test_a_rerun_with_other_data_or_settings_is_refused_before_anything_is_written(
        finished, coco_root, other_data, capsys, case, extra, expect):
    if case == "edited-config":  # an lr edited by hand in RUN/config.json: the checkpoint knows better
        cfg = json.loads((finished / "config.json").read_text())
        cfg["train"]["lr"] = 0.01
        (finished / "config.json").write_text(json.dumps(cfg, indent=2))
    before = snapshot(finished)
    capsys.readouterr()
    data = other_data if case == "other-data" else coco_root
    code = main(["train", "--data", str(data), "--out", str(finished), "--quiet", *extra])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and expect in line and (HINT in line or case == "rejected-value"), line
    assert snapshot(finished) == before  # config.json, logs and checkpoints exactly as they were
    assert not [p.name for p in finished.iterdir() if ".tmp" in p.name or p.name == ".lock"]


def test_a_rejected_value_never_reaches_a_new_run_directory(coco_root, tiny_clip_dir, tmp_path, capsys):
    run = tmp_path / "new"
    code = main(["train", "--data", str(coco_root), "--out", str(run),
                 *small_args(tiny_clip_dir, 1, ("--set", "model.backbone=resnet152"))])
    assert code == 2 and "unknown backbone 'resnet152'" in one_error_line(capsys.readouterr().err)
    assert not (run / "config.json").exists()


def test_allowed_changes_resume_and_are_recorded(finished, coco_root, capsys, caplog):
    with caplog.at_level("INFO"):
        code = main(["train", "--data", str(coco_root), "--out", str(finished), "--quiet", "--set", "train.epochs=3",
                     "--set", "train.log_every=2", "--set", "train.checkpoint_every=5min"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert "resuming with train.checkpoint_every: '10min' -> '5min'; train.epochs: 2 -> 3" in caplog.text
    assert "the learning-rate schedule now spans 3 epochs" in caplog.text
    cfg = json.loads((finished / "config.json").read_text())
    assert (cfg["train"]["epochs"], cfg["train"]["log_every"], cfg["train"]["checkpoint_every"]) == (3, 2, "5min")
    assert [r["epoch"] for r in read_records(finished / "metrics.jsonl", "epoch")] == [1, 2, 3]


def test_no_resume_starts_over_and_removes_the_earlier_checkpoints(finished, coco_root, tiny_clip_dir, capsys):
    code = main(["train", "--data", str(coco_root), "--out", str(finished), "--no-resume",
                 *small_args(tiny_clip_dir, 1, ("--set", "train.batch_size=4"))])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert torch.load(finished / "last.pt", weights_only=False)["epoch"] == 1
    assert not (finished / "last.prev.pt").exists()  # the earlier run's: gone, never a fallback for this one
    assert [r["epoch"] for r in read_records(finished / "metrics.jsonl", "epoch")] == [1]


def test_a_truncated_last_pt_and_a_torn_log_line_resume_from_last_prev_exactly(finished, trained_run, coco_root,
                                                                               caplog):
    assert torch.load(finished / "last.prev.pt", weights_only=False)["epoch"] == 1
    data = (finished / "last.pt").read_bytes()
    (finished / "last.pt").write_bytes(data[: len(data) // 3])
    with open(finished / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "epoch": 3, "lo')  # a write cut short
    with caplog.at_level("WARNING"):
        assert main(["train", "--data", str(coco_root), "--out", str(finished), "--quiet"]) == 0
    err = caplog.text
    assert "last.pt cannot be read" in err and "resuming from" in err and "is incomplete" in err, err[-2000:]
    # Epoch 2 trained again from the epoch-1 checkpoint: the same weights as the original run.
    a = torch.load(trained_run / "last.pt", weights_only=False)["model"]
    b = torch.load(finished / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs = read_records(finished / "metrics.jsonl")
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [1, 2]
    steps = [r["step"] for r in recs if r["type"] == "step"]
    assert steps == sorted(set(steps)) == list(range(1, 7))  # no duplicated or torn records


def test_checkpoint_every_bounds_what_a_kill_loses_and_resumes_exactly(trained_run, coco_root, tiny_clip_dir,
                                                                       tmp_path, capsys):
    run = tmp_path / "killed"
    real, calls = train_mod.train_step, []

    def killed_at_step_5(*args, **kwargs):  # the process dies inside step 5 (no handler runs)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    with train_mod.use_hooks(step=killed_at_step_5):
        code = main(["train", "--data", str(coco_root), "--out", str(run),
                     *small_args(tiny_clip_dir, 2, ("--set", "train.checkpoint_every=2"))])
    assert code == 130
    saved = torch.load(run / "last.pt", weights_only=False)
    assert (saved["step"], saved["epoch"], saved["epoch_steps"]) == (4, 1, 1)  # saved after step 4 (2 x 2)
    assert main(["train", "--data", str(coco_root), "--out", str(run), "--quiet"]) == 0
    a = torch.load(trained_run / "last.pt", weights_only=False)["model"]
    b = torch.load(run / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_records(run / "metrics.jsonl", "step")] == list(range(1, 7))


def test_a_real_sigkill_loses_at_most_the_checkpoint_interval(coco_root, tiny_clip_dir, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = ["train", "--data", str(coco_root), "--out", str(run),
            *small_args(tiny_clip_dir, 40, ("--set", "train.checkpoint_every=1"))]
    proc = subprocess.Popen([sys.executable, "-m", "clipft", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # a hang guard, not a timing assertion
    while proc.poll() is None and time.time() < deadline:
        try:
            if len(read_records(run / "metrics.jsonl", "step")) >= 5:
                break
        except ValueError:
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    steps_logged = max(r["step"] for r in read_records(run / "metrics.jsonl", "step"))
    ckpt = torch.load(run / "last.pt", weights_only=False) if (run / "last.pt").is_file() else \
        torch.load(run / "last.prev.pt", weights_only=False)
    assert ckpt["step"] >= steps_logged - 1  # every step was checkpointed: at most the one in flight is lost
    # Resume, stop at once (epochs may shrink on resume): temp files of the killed write are gone.
    assert main([*args[:5], "--quiet", "--set", f"train.epochs={ckpt['epoch'] + 1}"]) == 0
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name or p.name == ".lock"]
    steps = [r["step"] for r in read_records(run / "metrics.jsonl", "step")]
    assert steps == sorted(set(steps))  # logs were cut back to the checkpoint: no step twice


def test_a_damaged_config_json_is_one_line_and_a_named_config_still_resumes(finished, coco_root, tiny_clip_dir,
                                                                           capsys):
    (finished / "config.json").write_text('{"data": {"image_si')  # cut short by hand or a full disk
    assert main(["train", "--data", str(coco_root), "--out", str(finished), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "config.json: not valid JSON" in line and "--config" in line
    cfg = finished.parent / "run.yaml"  # the run's own settings, written out again: compared with last.pt, accepted
    import yaml
    cfg.write_text(yaml.safe_dump(torch.load(finished / "last.pt", weights_only=False)["config"]))
    assert main(["train", "--data", str(coco_root), "--out", str(finished), "--quiet", "--config", str(cfg),
                 "--set", "train.epochs=3"]) == 0
    assert json.loads((finished / "config.json").read_text())["train"]["epochs"] == 3


def test_refusals_are_training_errors_for_python_callers():
    from clipft.train.checkpoint import CheckpointError
    from clipft.train.resume import ResumeError
    from clipft.train.loop import TrainingError
    assert issubclass(ResumeError, TrainingError) and issubclass(CheckpointError, TrainingError)


def test_a_metrics_record_with_a_string_epoch_is_one_line_naming_the_file_and_line(finished, coco_root, capsys):
    """A hand-edited metrics.jsonl ("epoch": "1") once crashed the resume with an unexpected TypeError."""
    metrics = finished / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if json.loads(line).get("type") == "epoch")
    rec = json.loads(lines[n])
    rec["epoch"] = str(rec["epoch"])
    lines[n] = json.dumps(rec)
    metrics.write_text("\n".join(lines) + "\n")
    assert main(["train", "--data", str(coco_root), "--out", str(finished), "--quiet", "--set", "train.epochs=3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"metrics.jsonl: line {n + 1}" in line and '"epoch"' in line and "unexpected" not in line, line


def test_a_checkpoint_with_other_optimizer_groups_is_one_line():
    """A run written when the frozen backbone shared the head's optimizer group cannot load into the
    split groups this version builds: a TrainingError that says what to do, not a PyTorch ValueError."""
    import torch
    from clipft.train.errors import TrainingError
    from clipft.train.loop import TrainState
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    old = torch.optim.AdamW(model.parameters())  # one group
    new = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters()}])
    sched = torch.optim.lr_scheduler.LambdaLR(new, lambda s: 1.0)
    state = TrainState(model, new, sched, torch.amp.GradScaler("cpu", enabled=False))
    ckpt = {"model": model.state_dict(), "optimizer": old.state_dict()}
    with pytest.raises(TrainingError, match="parameter groups.*--no-resume"):
        state.load_state_dict(ckpt)
