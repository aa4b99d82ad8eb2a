"""clipft.train.lock: one writer per run directory (a live holder refuses, a dead one is taken over)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from clipft.cli.commands import main
from clipft.train.lock import LOCK_NAME, RunInUseError, RunLock


def _write_lock(run, pid, host=None):
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                             "started": "2026-01-01 00:00:00 UTC"}))


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: its pid is free (reuse within the test is vanishingly unlikely)
    return p.pid


def test_lock_is_released_on_exit_and_on_errors(tmp_path):
    with RunLock(tmp_path / "r") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "r" / LOCK_NAME).exists()
    with pytest.raises(KeyboardInterrupt), RunLock(tmp_path / "r"):
        raise KeyboardInterrupt
    assert not (tmp_path / "r" / LOCK_NAME).exists()


def test_live_holder_refuses_and_keeps_its_lock(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(tmp_path, holder.pid)
        with pytest.raises(RunInUseError, match=f"in use by pid {holder.pid} on {socket.gethostname()} since"):
            RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    _write_lock(tmp_path, _dead_pid(), host="some-other-node")
    with pytest.raises(RunInUseError, match="on some-other-node"):
        RunLock(tmp_path).acquire()


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_note(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, dead)
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of pid {dead}" in caplog.text


def test_train_into_a_run_in_use_is_refused_in_one_line_before_writing(coco_root, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(run, holder.pid)
        code = main(["train", "--data", str(coco_root), "--out", str(run), "--set", "train.device=cpu", "--quiet"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"clipft: error: {run}: in use by pid {holder.pid} on ")
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written into the held run
