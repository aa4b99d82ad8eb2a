"""clipft.checkpoint: last.pt / best.pt, the RNG stream a resume continues, log truncation."""

from __future__ import annotations

import json

import torch

from clipft.checkpoint import Checkpointer
from clipft.distributed import DistContext
from clipft.runfiles import RunFiles, read_records

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None, created=False)


def test_save_load_resumes_the_rng_stream_and_keeps_best(tmp_path):
    run = RunFiles(tmp_path)
    ckpt = Checkpointer(run, SINGLE)
    assert not ckpt.find_last(resume=True) and ckpt.last_good(1, 0, none="none yet") == "none yet"
    torch.manual_seed(3)
    ckpt.save({"epoch": 1, "step": 4}, is_best=True)
    expected = torch.rand(3)  # what the run draws next after the epoch-1 checkpoint
    ckpt.save({"epoch": 2, "step": 8}, is_best=False)
    assert torch.load(run.best, weights_only=False)["epoch"] == 1  # best.pt kept the better epoch
    assert not list(tmp_path.glob("*.tmp*"))  # atomic: no temporary file left behind
    saved = torch.load(run.last, weights_only=False)
    assert saved["epoch"] == 2 and saved["world_size"] == 1 and len(saved["rng_per_rank"]) == 1
    assert ckpt.find_last(resume=True) and not ckpt.find_last(resume=False)
    torch.save({**torch.load(run.best, weights_only=False)}, run.last)  # back to the epoch-1 state
    torch.manual_seed(99)
    assert ckpt.load_last(torch.device("cpu"), seed=0)["epoch"] == 1
    assert torch.equal(torch.rand(3), expected)
    assert ckpt.last_good(3, 0, none="none yet") == f"{run.last} (epoch 2)"
    assert ckpt.last_good(2, 1, none="none yet") == f"{run.last} (epoch 1)"


def test_truncate_logs_drops_records_after_the_checkpoint(tmp_path):
    run = RunFiles(tmp_path)
    recs = [{"type": "step", "epoch": 1}, {"type": "epoch", "epoch": 1}, {"type": "step", "epoch": 2}]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ckpt = Checkpointer(run, SINGLE)
    ckpt.truncate_logs(1)
    assert read_records(run.metrics) == recs[:2]
    ckpt.truncate_logs(0)  # a fresh run into an old directory
    assert not run.metrics.exists()


def test_truncate_logs_to_a_mid_epoch_checkpoint_keeps_its_steps(tmp_path):
    run = RunFiles(tmp_path)
    recs = [{"type": "step", "epoch": 1, "step": 1}, {"type": "epoch", "epoch": 1, "step": 1},
            {"type": "step", "epoch": 2, "step": 2}, {"type": "step", "epoch": 2, "step": 3}]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in recs))
    Checkpointer(run, SINGLE).truncate_logs(1, step=2)  # saved after step 2, one step into epoch 2
    assert read_records(run.metrics) == recs[:3]
    Checkpointer(run, SINGLE).truncate_logs(0, step=1)  # mid-epoch 1: its step 1 stays, no epoch record
    assert read_records(run.metrics) == recs[:1]
