"""clipft.train.checkpoint: last.pt / best.pt, the RNG stream a resume continues, log truncation."""

from __future__ import annotations

import json

import torch

from clipft.train.checkpoint import Checkpointer
from clipft.distributed import DistContext
from clipft.train.rundir import RunFiles, read_records

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


def test_previous_last_is_kept_and_a_damaged_last_falls_back_to_it(tmp_path, caplog):
    run = RunFiles(tmp_path)
    ckpt = Checkpointer(run, SINGLE)
    ckpt.save({"epoch": 1, "step": 4}, is_best=False)
    assert not run.last_prev.exists()  # nothing older yet
    ckpt.save({"epoch": 2, "step": 8}, is_best=False)
    assert torch.load(run.last_prev, weights_only=False)["epoch"] == 1
    assert Checkpointer(run, SINGLE).open_resume(True)["epoch"] == 2
    data = run.last.read_bytes()
    run.last.write_bytes(data[: len(data) // 2])  # truncated after it was written (a copy cut short, a full disk)
    again = Checkpointer(run, SINGLE)
    with caplog.at_level("WARNING"):
        assert again.open_resume(True)["epoch"] == 1 and again.resumed_from == run.last_prev
    assert "last.pt cannot be read" in caplog.text and "resuming from" in caplog.text
    run.last_prev.write_bytes(b"not a checkpoint")
    try:
        Checkpointer(run, SINGLE).open_resume(True)
    except Exception as e:  # noqa: BLE001
        assert type(e).__name__ == "CheckpointError" and "\n" not in str(e)
        assert "--no-resume" in str(e) and "last.prev.pt" in str(e)
    else:
        raise AssertionError("two unreadable checkpoints must be refused")
    assert Checkpointer(run, SINGLE).open_resume(False) is None  # --no-resume never reads them


def test_a_checkpoint_that_does_not_read_back_keeps_the_previous_one(tmp_path, monkeypatch):
    import clipft.train.checkpoint as ck
    run = RunFiles(tmp_path)
    ckpt = Checkpointer(run, SINGLE)
    ckpt.save({"epoch": 1, "step": 4}, is_best=False)

    def unreadable(path):
        raise ck.CheckpointError(f"{path}: does not read back")
    monkeypatch.setattr(ck, "_readable", unreadable)
    try:
        ckpt.save({"epoch": 2, "step": 8}, is_best=False)
    except ck.CheckpointError:
        pass
    assert torch.load(run.last, weights_only=False)["epoch"] == 1 and not run.last_prev.exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_stale_temp_files_go_and_checkpoint_every_is_due_by_steps_or_clock(tmp_path):
    run = RunFiles(tmp_path)
    (tmp_path / ".last.pt.tmp1234").write_bytes(b"half")  # what a SIGKILL mid-write leaves
    (tmp_path / "notes.tmp").write_text("a user's file")
    (tmp_path / ".eval_val.json.tmp99").write_text("another command's write in flight")
    ckpt = Checkpointer(run, SINGLE)
    ckpt.remove_stale_temp()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".eval_val.json.tmp99", "notes.tmp"]
    assert [s for s in range(1, 10) if ckpt.due(s, ("steps", 3))] == [3, 6, 9]
    assert not ckpt.due(5, ("off", 0)) and not ckpt.due(5, ("minutes", 1.0))
    ckpt.saved_at -= 61
    assert ckpt.due(5, ("minutes", 1.0))
    ckpt.save({"epoch": 1, "step": 5}, is_best=False)  # a save restarts the clock
    assert not ckpt.due(6, ("minutes", 1.0))
