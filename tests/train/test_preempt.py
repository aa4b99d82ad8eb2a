"""clipft.train.preempt: SIGTERM / SIGUSR1 save a mid-epoch checkpoint at the next step boundary, and the
rerun of the same command resumes from it exactly."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from clipft.train import loop as train_mod
from clipft.cli.commands import main
from clipft.train.preempt import Preempted, StopFlag
from clipft.train.rundir import read_records

from train.test_loop import small_args

# Random crops, flips and head dropout in the main process: the restored RNG state must matter.
AUGMENT = ["--set", "data.augment=true", "--set", "model.head_dropout=0.2", "--set", "data.prepared=false"]


def test_stop_flag_only_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) is before
    assert Preempted(signal.SIGTERM, 2, 1).exit_code == 143 and Preempted(signal.SIGUSR1, 2, 1).exit_code == 138


# 24 train images / batch 8 = 3 steps per epoch: global step 2 is epoch 1 step 2, step 4 is epoch 2 step 1.
@pytest.mark.parametrize("at_step, sig, extra", [(2, signal.SIGTERM, ()), (4, signal.SIGUSR1, AUGMENT)],
                         ids=["sigterm-epoch1", "sigusr1-epoch2-augment-dropout"])
def test_signal_mid_epoch_saves_and_rerun_resumes_exactly(coco_root, tiny_clip_dir, tmp_path, capsys,
                                                          at_step, sig, extra):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--data", str(coco_root), "--out", str(a), *small_args(tiny_clip_dir, 2, extra)]) == 0
    real, calls = train_mod.train_step, []

    def signalled_at_step(*args, **kwargs):  # a real signal, delivered while the step runs
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    capsys.readouterr()
    with train_mod.use_hooks(step=signalled_at_step):
        code = main(["train", "--data", str(coco_root), "--out", str(b), *small_args(tiny_clip_dir, 2, extra)])
    epoch, in_epoch = (at_step - 1) // 3 + 1, (at_step - 1) % 3 + 1
    assert code == 128 + sig and len(calls) == at_step  # stopped right after the signalled step
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"saved at epoch {epoch} step {in_epoch}; rerun the same command to resume")
    saved = torch.load(b / "last.pt", weights_only=False)
    assert (saved["epoch"], saved["epoch_steps"], saved["step"]) == (epoch - 1, in_epoch, at_step)
    assert not [p.name for p in b.iterdir() if ".tmp" in p.name or p.name == ".lock"]
    # The same command again (config.json is the base): the rest of the epoch, then the rest of the run.
    assert main(["train", "--data", str(coco_root), "--out", str(b), "--quiet"]) == 0
    sa = torch.load(a / "last.pt", weights_only=False)["model"]
    sb = torch.load(b / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = [r["step"] for r in read_records(b / "metrics.jsonl", "step")]
    assert steps == [r["step"] for r in read_records(a / "metrics.jsonl", "step")] == list(range(1, 7))
    assert [r["epoch"] for r in read_records(b / "metrics.jsonl", "epoch")] == [1, 2]


def test_real_sigterm_to_a_cli_process_saves_and_exits_143(coco_root, tiny_clip_dir, tmp_path):
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "clipft", "train", "--data", str(coco_root), "--out", str(run),
                             *small_args(tiny_clip_dir, 50)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # a hang guard, not a timing assertion
    while not read_records_safe(run / "metrics.jsonl") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("saved at epoch ")
    assert torch.load(run / "last.pt", weights_only=False)["epoch_steps"] >= 1
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name or p.name == ".lock"]


def read_records_safe(path):
    try:
        return read_records(path, "step")
    except ValueError:  # a line being written
        return []
